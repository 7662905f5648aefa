"""Graph assembly: a kNN graph becomes a full, multi-level HNSW over the index's own storage.

The input is any graph of candidate neighbours (the GPU's CAGRA graph, an exact
kNN graph computed by GEMM): ``n x k`` ids, ``k >= 2 m``. The output is the
index the standard CPU build writes (``IndexHNSWFlat`` / ``IndexHNSWSQ`` /
``IndexBinaryHNSW``, or the CAGRA-typed HNSW of a skip-storage build), same
layout, same tags, so the data node cannot tell the two apart:

1. **levels**: drawn by the HNSW's own generator (``prepare_level_tab``), as
   ``add`` would draw them;
2. **level 0**: each node's candidates, ordered by their distance to it as the
   storage computes it, go through HNSW's neighbour-selection rule (a candidate
   is dropped when a nearer kept neighbour is closer to it than the node is),
   keeping at most ``2 m``;
3. **reverse edges**: each node's list plus every node pointing to it, kept
   whole when they fit in ``2 m`` slots, else the nearest ``4 m`` selected again
   by the same rule;
4. **upper levels**: the ~1/m nodes drawn above level 0 are inserted, and only
   they, into a small HNSW whose level 0 has ``m`` slots (it is our level 1); its
   lists become our upper lists and its entry point ours; its level-0 links
   (long links between distant regions) fill free level-0 slots;
5. **repair**: a kNN graph of strongly clustered data splits into its clusters
   (insertion gets long links for free, a kNN graph has none), so search has to
   be helped across: every node is searched for with its own vector at a small
   ef, and each one the search misses is linked from the nearest node it found
   (rounds until none is missed or ``NAVIGATION_ROUNDS``); then level 0 is
   walked from the entry point and each part not reached is linked the same
   way, until every node is reached.

The selection rule sees the distances the index's own search computes, over
its stored values (``core.neighbour_selection``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from remote_vector_index_builder.core.errors import BuildError
from remote_vector_index_builder.core.index_builder import FaissIndex, checked_m
from remote_vector_index_builder.core.knn_graph import KnnGraph, StoredRows
from remote_vector_index_builder.core.neighbour_selection import Selector, compact, nearest

log = logging.getLogger(__name__)

# efConstruction of the small HNSW over the upper-level nodes only (~n / m of
# them): their lists steer the descent to the right region, not the final hops.
UPPER_EF_CONSTRUCTION = 40
# ef of the searches that find each unreached part's nearest reached node.
REPAIR_EF = 64
# The navigation check: each node searched for at this ef, found if among the
# first SELF_RESULTS results or if a duplicate of it comes first; rounds of
# linking the missed ones. On 300 tight clusters (18k x 32) without it 7
# clusters had no upper-level node and queries there found recall 0.87 at ef 16.
SELF_SEARCH_EF = 16
SELF_RESULTS = 4
NAVIGATION_ROUNDS = 6
# Repair rounds before giving up (each round links every unreached part found).
REPAIR_ROUNDS = 32
# Level-0 selection runs in up to this many slices of the nodes (progress between
# them), each of at least SELECT_MIN_ROWS: a slice is one pass of Faiss's OpenMP
# team over every node, whose start costs more than a small slice's work.
SELECT_STEPS = 16
SELECT_MIN_ROWS = 8192

# Progress units handed to the callback, split by the measured share of each
# step in an assembly (exact 30k x 384 kNN graph, k 64, m 16: selection 0.6,
# reverse edges 0.25, upper levels and repair 0.15).
_SHARES = {"select": 0.6, "reverse": 0.25, "upper": 0.05, "navigation": 0.08, "repair": 0.02}


@dataclass
class AssemblyStats:
    """What the assembly did, for logs and the quality report."""

    nodes: int = 0
    candidates: int = 0
    upper_nodes: int = 0
    reselected: int = 0  # nodes whose list plus reverse edges overflowed 2 m
    missed_by_search: int = 0  # nodes a search for their own vector missed, before repair
    unreached_before_repair: int = 0
    repair_links: int = 0
    repair_rounds: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "candidates": self.candidates,
            "upper_nodes": self.upper_nodes,
            "reselected": self.reselected,
            "missed_by_search": self.missed_by_search,
            "unreached_before_repair": self.unreached_before_repair,
            "repair_links": self.repair_links,
        }


class _Graph:
    """Numpy views of an HNSW's link table (``hnsw.neighbors``), by node and level."""

    def __init__(self, hnsw: Any, n: int) -> None:
        self.hnsw = hnsw
        self.n = n
        self.offsets = faiss.vector_to_array(hnsw.offsets).astype(np.int64)
        self.cum = faiss.vector_to_array(hnsw.cum_nneighbor_per_level).astype(np.int64)
        self.levels = faiss.vector_to_array(hnsw.levels).astype(np.int64)  # level + 1
        size = int(hnsw.neighbors.size())
        self.links = faiss.rev_swig_ptr(hnsw.neighbors.data(), size)
        self.width0 = int(self.cum[1])

    def level0_slots(self, nodes: np.ndarray) -> np.ndarray:
        slots: np.ndarray = self.offsets[nodes][:, None] + np.arange(self.width0)
        return slots

    def level0(self, nodes: np.ndarray) -> np.ndarray:
        links: np.ndarray = self.links[self.level0_slots(nodes)]
        return links

    def set_level0(self, nodes: np.ndarray, lists: np.ndarray) -> None:
        self.links[self.level0_slots(nodes)] = lists

    def slots(self, node: int, level: int) -> slice:
        begin = int(self.offsets[node] + self.cum[level])
        return slice(begin, int(self.offsets[node] + self.cum[level + 1]))


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _reverse_merge(
    select: Selector,
    graph: _Graph,
    lists: np.ndarray,
    stats: AssemblyStats,
    report: Callable[[float], None],
) -> None:
    """Level 0 := each node's list plus the nodes pointing to it (step 3 of the module doc)."""
    n, width = lists.shape
    src = np.repeat(np.arange(n, dtype=np.int32), width)
    dst = lists.ravel()
    keep = dst >= 0
    src, dst = src[keep], dst[keep]
    by_dst = np.argsort(dst, kind="stable")
    rev_node, rev_from = dst[by_dst], src[by_dst]
    del src, dst, keep, by_dst
    bounds = np.searchsorted(rev_node, np.arange(n + 1, dtype=np.int64))
    indegree = np.diff(bounds)
    # Rows of [own list | reverse edges], -1 padded, for a chunk of nodes at a time, at
    # most 2 x 2m reverse edges wide: a node pointed to by more ("hubs": duplicates and
    # dense spots of real text, up to thousands on man-page LSA, where full-width rows
    # took 23 s of a 33 s assembly) overflows anyway and is merged on its own below.
    wide = int(min(indegree.max(), 2 * width)) if n else 0
    chunk = max(1, min((32 << 20) // max(1, 4 * (width + wide)), -(-n // SELECT_STEPS)))
    share = _SHARES["reverse"] / 2  # half for the merge, half for the overflow's selection
    overflow: list[np.ndarray] = []
    for start, stop in _chunks(n, chunk):
        nodes = np.arange(start, stop)
        merged = np.full((stop - start, width + wide), -1, dtype=np.int32)
        merged[:, :width] = lists[start:stop]
        lo, hi = int(bounds[start]), int(bounds[stop])
        if hi > lo:
            owner = rev_node[lo:hi] - start
            rank = np.arange(lo, hi) - bounds[start:stop][owner]
            inside = rank < wide
            merged[owner[inside], width + rank[inside]] = rev_from[lo:hi][inside]
        merged = compact(nodes, merged)
        report(share * (stop - start) / max(1, n))
        fits = (merged[:, width:] < 0).all(axis=1) & (indegree[start:stop] <= wide)
        graph.set_level0(nodes[fits], merged[fits, :width])
        overflow.append(nodes[~fits])
    nodes = np.concatenate(overflow) if overflow else np.zeros(0, dtype=np.int64)
    stats.reselected = len(nodes)
    for part in np.array_split(nodes, max(1, -(-len(nodes) // 4096))):
        if len(part) == 0:
            continue
        # Own list and every reverse edge, as wide as this part's largest in-degree.
        most = int(indegree[part].max())
        cands = np.full((len(part), width + most), -1, dtype=np.int32)
        cands[:, :width] = lists[part]
        for row, node in enumerate(part.tolist()):
            sources = rev_from[bounds[node] : bounds[node + 1]]
            cands[row, width : width + len(sources)] = sources
        chosen = select(part, nearest(select.rows, part, cands, 2 * width), width)
        graph.set_level0(part, chosen)
    report(share)


def _upper_levels(
    inner: FaissIndex, rows: StoredRows, graph: _Graph, m: int, stats: AssemblyStats
) -> None:
    """Step 4 of the module doc: upper lists, entry point, long links into level 0."""
    hnsw = inner.hnsw
    m = checked_m(m)
    upper = np.flatnonzero(graph.levels >= 2)
    stats.upper_nodes = len(upper)
    if len(upper) == 0:
        hnsw.entry_point = 0
        hnsw.max_level = 0
        return
    if rows.binary:
        small: Any = faiss.IndexBinaryHNSW(int(inner.d), m)
    else:
        small = faiss.IndexHNSWFlat(int(inner.d), m, int(inner.metric_type))
    small.hnsw.set_nb_neighbors(0, m)
    small.hnsw.efConstruction = UPPER_EF_CONSTRUCTION
    faiss.copy_array_to_vector((graph.levels[upper] - 1).astype(np.int32), small.hnsw.levels)
    small.add(rows.queries(upper))
    small_graph = _Graph(small.hnsw, len(upper))
    hnsw.entry_point = int(upper[int(small.hnsw.entry_point)])
    hnsw.max_level = int(small.hnsw.max_level) + 1
    links = graph.links
    for t, node in enumerate(upper.tolist()):
        for level in range(int(small_graph.levels[t])):
            theirs = small_graph.links[small_graph.slots(t, level)]
            mapped = np.where(theirs >= 0, upper[np.maximum(theirs, 0)], -1)
            links[graph.slots(node, level + 1)] = mapped
        # The long links: free level-0 slots take the node's level-1 neighbours.
        level0 = graph.slots(node, 0)
        own = links[level0]
        free = np.flatnonzero(own < 0)
        if len(free) == 0:
            continue
        extra = links[graph.slots(node, 1)]
        extra = extra[(extra >= 0) & ~np.isin(extra, own)]
        take = min(len(free), len(extra))
        if take:
            own[free[:take]] = extra[:take]
            links[level0] = own


def unreached(graph: _Graph, start: int) -> np.ndarray:
    """Nodes that no walk along level-0 links from ``start`` reaches."""
    seen = np.zeros(graph.n, dtype=bool)
    seen[start] = True
    frontier = np.array([start], dtype=np.int64)
    while len(frontier):
        nxt = graph.level0(frontier).ravel()
        nxt = nxt[nxt >= 0]
        nxt = np.unique(nxt[~seen[nxt]])
        seen[nxt] = True
        frontier = nxt
    return np.flatnonzero(~seen)


def _navigation_repair(
    inner: FaissIndex,
    rows: StoredRows,
    graph: _Graph,
    stats: AssemblyStats,
    report: Callable[[float], None],
) -> None:
    """Step 5, first half: link each node that a search for its own vector misses."""
    probe = np.arange(graph.n)
    left = _SHARES["navigation"]
    for round_no in range(NAVIGATION_ROUNDS):
        missed: list[np.ndarray] = []
        nearest_found: list[np.ndarray] = []
        for start, stop in _chunks(len(probe), 16384):
            nodes = probe[start:stop]
            distances, found = _search_with_distances(
                inner, rows.queries(nodes), SELF_SEARCH_EF, SELF_RESULTS
            )
            miss = ~_found_itself(rows, nodes, distances, found) & (found[:, 0] >= 0)
            missed.append(nodes[miss])
            nearest_found.append(found[miss, 0])
            if round_no == 0:  # later rounds search only the few missed
                report(left * 0.9 * (stop - start) / max(1, graph.n))
        heads = np.concatenate(missed)
        if round_no == 0:
            stats.missed_by_search = len(heads)
        if len(heads) == 0:
            return
        near = np.concatenate(nearest_found)
        # One new link per source node and round: its slots are few.
        _, first = np.unique(near, return_index=True)
        indegree = indegrees(graph)
        for head, source in zip(heads[first].tolist(), near[first].tolist(), strict=True):
            _link(graph, int(head), np.array([source]), indegree)
            stats.repair_links += 1
        probe = heads


def _repair(inner: FaissIndex, rows: StoredRows, graph: _Graph, stats: AssemblyStats) -> None:
    """Step 5, second half: link every part of level 0 the entry point does not reach."""
    start = int(inner.hnsw.entry_point)
    for round_no in range(REPAIR_ROUNDS):
        missing = unreached(graph, start)
        if round_no == 0:
            stats.unreached_before_repair = len(missing)
        if len(missing) == 0:
            stats.repair_rounds = round_no
            return
        heads = _heads(graph, missing)
        found = _search(inner, rows.queries(heads), REPAIR_EF, REPAIR_EF)
        # The search descends through the upper levels, so it can end among nodes that
        # level 0 does not reach from the entry point: a link from one of those joins
        # two unreached parts and makes no progress (clustered 6000 x 768 at m 8 kept
        # 181 nodes unreached for every round). Only reached nodes may link a head in;
        # the entry point when the search found none.
        reached = np.ones(graph.n, dtype=bool)
        reached[missing] = False
        indegree = indegrees(graph)
        for head, near in zip(heads.tolist(), found, strict=True):
            near = near[near >= 0]
            near = near[reached[near]]
            _link(graph, head, near if len(near) else np.array([start]), indegree)
            stats.repair_links += 1
    missing = unreached(graph, start)
    stats.repair_rounds = REPAIR_ROUNDS
    if len(missing):
        raise BuildError(
            f"graph assembly left {len(missing)} of {graph.n} vectors unreachable after "
            f"{REPAIR_ROUNDS} repair rounds"
        )


def _heads(graph: _Graph, missing: np.ndarray) -> np.ndarray:
    """Unreached nodes no other unreached node links to (one per unreached part, roughly)."""
    inside = np.zeros(graph.n, dtype=bool)
    inside[missing] = True
    targets = graph.level0(missing).ravel()
    targets = targets[targets >= 0]
    pointed = np.zeros(graph.n, dtype=bool)
    pointed[targets[inside[targets]]] = True
    heads: np.ndarray = missing[~pointed[missing]]
    if len(heads) == 0:  # only cycles left: one entry per cycle is enough, any will do
        heads = missing[:: max(1, len(missing) // 64)]
    return heads


def _search(inner: FaissIndex, queries: np.ndarray, ef: int, k: int) -> np.ndarray:
    return _search_with_distances(inner, queries, ef, k)[1]


def _search_with_distances(
    inner: FaissIndex, queries: np.ndarray, ef: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, int(inner.ntotal))
    if isinstance(inner, faiss.IndexBinary):
        saved = inner.hnsw.efSearch
        inner.hnsw.efSearch = ef
        try:
            distances, found = inner.search(queries, k)
        finally:
            inner.hnsw.efSearch = saved
        return np.asarray(distances, dtype=np.float32), np.asarray(found)
    params = faiss.SearchParametersHNSW()
    params.efSearch = ef
    distances, found = inner.search(queries, k, params=params)
    return np.asarray(distances), np.asarray(found)


def _found_itself(
    rows: StoredRows, nodes: np.ndarray, distances: np.ndarray, found: np.ndarray
) -> np.ndarray:
    """The search for each node's vector returned it, or a duplicate of it (a result as
    near as the node itself: searching finds that vector, whichever copy answers)."""
    hit: np.ndarray = (found == nodes[:, None]).any(axis=1)
    if rows.similarity:
        vectors = rows.take(nodes)
        own = np.einsum("ij,ij->i", vectors, vectors)
        close = distances[:, 0] >= own - 1e-5 * np.abs(own) - 1e-6
    else:
        close = distances[:, 0] <= 1e-6
    result: np.ndarray = hit | (close & (found[:, 0] >= 0))
    return result


def indegrees(graph: _Graph) -> np.ndarray:
    """How many level-0 lists hold each node."""
    targets = graph.level0(np.arange(graph.n)).ravel()
    counts: np.ndarray = np.bincount(targets[targets >= 0], minlength=graph.n)
    return counts


def _link(graph: _Graph, head: int, candidates: np.ndarray, indegree: np.ndarray) -> None:
    """An edge into ``head`` from one of the reached ``candidates`` (nearest first): a free
    slot of the nearest that has one; else, among their lists, the slot whose target the
    most other lists hold (it stays linked from elsewhere: replacing a list's last slot
    instead made every repair of 200 identical vectors overwrite the one before).
    ``head`` links back where it has a free slot. ``indegree`` is kept up to date."""
    links = graph.links
    nodes = candidates[candidates >= 0]
    if len(nodes) == 0:
        return
    lists = graph.level0(nodes)
    if (lists == head).any():
        return
    free = np.flatnonzero((lists < 0).any(axis=1))
    if len(free):
        row = int(free[0])
        col = int(np.flatnonzero(lists[row] < 0)[0])
    else:
        held = indegree[lists]
        row, col = (int(i) for i in np.unravel_index(int(np.argmax(held)), held.shape))
        indegree[lists[row, col]] -= 1
    source = int(nodes[row])
    links[graph.offsets[source] + col] = head
    indegree[head] += 1
    back = links[graph.slots(head, 0)]
    if source not in back:
        empty = np.flatnonzero(back < 0)
        if len(empty):
            links[graph.slots(head, 0).start + int(empty[0])] = source
            indegree[source] += 1


def assemble(
    inner: FaissIndex,
    knn: KnnGraph,
    m: int,
    *,
    progress: Callable[[float], None] | None = None,
) -> AssemblyStats:
    """Turn ``knn`` into ``inner``'s HNSW; ``inner``'s storage must already hold the rows.

    ``inner`` is a freshly constructed HNSW (no levels yet) of ``m``; on return
    its ``ntotal`` is the storage's and every level is linked. ``progress`` gets
    the share of the assembly done (0..1), a few dozen times.
    """
    stats = AssemblyStats()
    rows = StoredRows(inner)
    n = rows.n
    if knn.n != n:
        raise BuildError(f"the kNN graph has {knn.n} rows for {n} stored vectors")
    if knn.k < min(2 * m, n - 1):
        raise BuildError(f"the kNN graph has {knn.k} neighbours per node; at least 2 m is needed")
    hnsw = inner.hnsw
    if int(hnsw.levels.size()) != 0:
        raise BuildError("graph assembly needs an HNSW without levels")
    stats.nodes, stats.candidates = n, knn.k
    done = 0.0

    def report(share: float) -> None:
        nonlocal done
        done = min(1.0, done + share)
        if progress is not None:
            progress(done)

    began = time.perf_counter()
    hnsw.prepare_level_tab(n, False)
    inner.ntotal = n
    graph = _Graph(hnsw, n)
    width = graph.width0
    select = Selector(inner, rows)
    lists = np.empty((n, width), dtype=np.int32)
    step = max(1, SELECT_MIN_ROWS, -(-n // SELECT_STEPS))
    for start, stop in _chunks(n, step):
        nodes = np.arange(start, stop)
        lists[start:stop] = select(nodes, knn.ids[start:stop], width)
        report(_SHARES["select"] * (stop - start) / max(1, n))
    stats.seconds["select"] = time.perf_counter() - began

    began = time.perf_counter()
    _reverse_merge(select, graph, lists, stats, report)
    del lists
    stats.seconds["reverse"] = time.perf_counter() - began

    began = time.perf_counter()
    _upper_levels(inner, rows, graph, m, stats)
    report(_SHARES["upper"])
    stats.seconds["upper"] = time.perf_counter() - began
    began = time.perf_counter()
    _navigation_repair(inner, rows, graph, stats, report)
    stats.seconds["navigation"] = time.perf_counter() - began
    began = time.perf_counter()
    _repair(inner, rows, graph, stats)
    report(1.0)
    stats.seconds["repair"] = time.perf_counter() - began
    log.info(
        "assembled an HNSW from a %d-NN graph of %d vectors: %d upper-level nodes, %d lists "
        "reselected after reverse edges, %d unreached before repair (%d links added)",
        knn.k,
        n,
        stats.upper_nodes,
        stats.reselected,
        stats.unreached_before_repair,
        stats.repair_links,
    )
    return stats
