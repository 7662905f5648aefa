"""The PNG: the job's stage breakdown beside the raw build, and memory per data type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STAGE_COLOURS = {
    "download": "#4c72b0",
    "parse": "#8172b3",
    "build": "#55a868",
    "serialize": "#ccb974",
    "serialize+upload": "#dd8452",
    "upload": "#c44e52",
}


def chart(sections: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("e2e", "memory", "transfers") if name in sections]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        {"e2e": _stages, "memory": _memory, "transfers": _transfers}[name](ax, sections[name])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _stages(ax: Any, result: dict[str, Any]) -> None:
    labels = {"raw": "raw faiss build", "memory": "job (memory mode)", "disk": "job (disk mode)"}
    summary = result["summary"]
    kinds = [k for k in ("raw", "memory", "disk") if k in summary]
    seen: set[str] = set()
    for row, kind in enumerate(kinds):
        left = 0.0
        for stage, seconds in summary[kind]["stages"].items():
            ax.barh(
                row,
                seconds,
                left=left,
                color=STAGE_COLOURS.get(stage, "#999999"),
                label=None if stage in seen else stage,
            )
            seen.add(stage)
            left += seconds
        ax.text(left, row, f" {summary[kind]['wall_s']:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(kinds)), [labels[k] for k in kinds])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median)")
    ax.set_title(f"Stage breakdown, {result['n']:,} x {result['dim']} float")
    ax.legend(fontsize=7, loc="lower right")


def _memory(ax: Any, result: dict[str, Any]) -> None:
    rows = result["per_type"]
    x = range(len(rows))
    width = 0.27
    data = [(r["vector_blob_bytes"] + r["index_bytes"]) / 1e6 for r in rows]
    ax.bar([i - width for i in x], data, width, label="vector blob + index", color="#8c8c8c")
    ax.bar(
        list(x),
        [r["peak_over_baseline"] / 1e6 for r in rows],
        width,
        label="measured peak - baseline",
        color="#4c72b0",
    )
    ax.bar(
        [i + width for i in x],
        [r["estimate_bytes"] / 1e6 for r in rows],
        width,
        label="core.memory estimate",
        color="#dd8452",
    )
    labels = [f"{r['data_type']}\n{r.get('mode', 'memory')}" for r in rows]
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("MB")
    ax.set_title(f"Job memory, {result['n']:,} x {result['dim']}")
    ax.legend(fontsize=7)


def _transfers(ax: Any, result: dict[str, Any]) -> None:
    rows = [(name, row) for name, row in result["summary"].items() if "mb_per_s" in row]
    ax.barh(range(len(rows)), [row["mb_per_s"] for _, row in rows], color="#55a868")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MB/s (median)")
    ax.set_title(f"S3 transfers, {result['bytes'] / 2**30:.2f} GiB object")
