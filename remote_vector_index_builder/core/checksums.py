"""S3's CRC32 checksums: the one uploads carry, and the check of a download against the stored one.

A *full-object* CRC32 (a single PUT, or a multipart upload of the full-object
type) is the CRC32 of the object; a *composite* one (S3's default for multipart
uploads, "<base64>-<parts>") the CRC32 of the parts' CRC32s, so it needs the
part boundaries: the first part's size, all parts but the last being equal
(what SDKs upload), or else every part's size; of one part, the CRC32 of the
object's CRC32. Some stores report neither the type nor the suffix (moto): a
multipart object is then checked both ways.

The download computes the CRC32 of each range while its bytes are still in
the cache (``RangeCrcs``), in its transfer threads; the object's and the
parts' CRC32s are combined from those (``crc32_combine``), without another
pass over the buffer, wherever the ranges were cut at the part boundaries
(``plan_ranges``).
"""

from __future__ import annotations

import base64
import bisect
import logging
from dataclasses import dataclass

import numpy as np
from zlib_ng import zlib_ng

from remote_vector_index_builder.core.errors import ObjectStoreError
from remote_vector_index_builder.core.s3_calls import ObjectInfo, S3Calls

log = logging.getLogger(__name__)


def b64(crc: int) -> str:
    """S3's spelling of a CRC32: its four big-endian bytes, base64-encoded."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def crc32_b64(data: bytes | bytearray | memoryview) -> str:
    """S3's ``ChecksumCRC32`` of ``data``."""
    return b64(zlib_ng.crc32(data))


# A byte range of an object, both ends included (as in an HTTP Range header).
Range = tuple[int, int]


def plan_ranges(size: int, step: int, parts: list[int] | None = None) -> list[Range]:
    """Ranges of at most ``step`` bytes; none crosses a boundary of ``parts`` (their sizes)."""
    ranges: list[Range] = []
    start = 0
    for part in parts or [size]:
        end = start + part
        ranges += [(first, min(first + step, end) - 1) for first in range(start, end, step)]
        start = end
    return ranges


@dataclass
class RangeCrcs:
    """The CRC32 of each downloaded range (in order, tiling the object), filled in by the
    transfer threads."""

    ranges: list[Range]

    def __post_init__(self) -> None:
        self.crcs = [0] * len(self.ranges)
        self._starts = [first for first, _ in self.ranges]

    def of(self, first: int, last: int) -> int | None:
        """The CRC32 of bytes ``first..last`` if they are whole ranges, else None."""
        if last < first:
            return 0
        index = bisect.bisect_left(self._starts, first)
        crc = 0
        while index < len(self.ranges) and self.ranges[index][0] == first:
            end = self.ranges[index][1]
            if end > last:
                return None
            crc = zlib_ng.crc32_combine(crc, self.crcs[index], end - first + 1)
            if end == last:
                return crc
            first, index = end + 1, index + 1
        return None


@dataclass(frozen=True)
class StoredCrc32:
    """The CRC32 S3 stored with an object, and what it says about the object's parts."""

    value: str  # base64, without "-<parts>"
    parts: int  # 0: not a multipart object (or not known to be one)
    suffixed: bool  # S3 said "-<parts>": a composite checksum
    checksum_type: str | None  # "FULL_OBJECT", "COMPOSITE" or not reported

    @classmethod
    def of(cls, info: ObjectInfo) -> StoredCrc32 | None:
        stored = (info.checksums or {}).get("CRC32")
        if stored is None:
            return None
        value, _, suffix = stored.partition("-")
        etag_parts = info.etag.strip('"').rpartition("-")[2]
        parts = int(suffix or (etag_parts if "-" in info.etag else 0) or 0)
        return cls(value, parts, bool(suffix), info.checksum_type)

    @property
    def may_be_composite(self) -> bool:
        return self.parts >= 2 and self.checksum_type != "FULL_OBJECT"


class Crc32Check:
    """Checks a downloaded object against the CRC32 S3 stored with it."""

    def __init__(
        self, s3: S3Calls, bucket: str, key: str, info: ObjectInfo, stored: StoredCrc32
    ) -> None:
        self._s3, self._bucket, self._key = s3, bucket, key
        self._size = info.size
        self.stored = stored
        self._guess: list[int] | None = None

    def part_sizes(self) -> list[int] | None:
        """The parts' sizes if all but the last are equal (what SDKs upload), asked of S3
        before the download so that its ranges can follow them; None if not known."""
        if not self.stored.may_be_composite:
            return None
        try:
            first = self._part_size(1)
        except ObjectStoreError:
            return None  # asked again (and reported) by the check
        last = self._size - first * (self.stored.parts - 1)
        if not 0 < last <= first:
            return None
        self._guess = [first] * (self.stored.parts - 1) + [last]
        return self._guess

    def mismatch(self, buffer: np.ndarray, crcs: RangeCrcs) -> str | None:
        """How the buffer's CRC32 differs from the one S3 stored, or None if it does not."""
        stored, value = self.stored, self.stored.value
        whole = crcs.of(0, self._size - 1)
        full = b64(whole if whole is not None else zlib_ng.crc32(buffer.data))
        if full == value and stored.checksum_type != "COMPOSITE" and not stored.suffixed:
            return None
        if stored.parts == 0 or stored.checksum_type == "FULL_OBJECT":
            return f"CRC32 of the object {full}, S3 stored {value}"
        if stored.parts == 1:
            # One part (a client that always uploads multipart): S3 stores the CRC32 of
            # that part's CRC32, which is the object's; no part sizes needed.
            composite = crc32_b64(base64.b64decode(full))
            if composite == value:
                return None
            return f"composite CRC32 of the one part {composite}, S3 stored {value}"
        try:
            composite = self._composite(buffer, crcs)
        except ObjectStoreError as exc:
            # Not evidence of corruption: the store would not say where its parts are.
            log.warning("%s: cannot check the composite CRC32 (%s)", self._key, exc)
            return None
        if composite == value:
            return None
        return f"composite CRC32 of the {stored.parts} parts {composite}, S3 stored {value}"

    def _composite(self, buffer: np.ndarray, crcs: RangeCrcs) -> str:
        parts = self.stored.parts
        guess = self._guess
        if guess is None:
            first = self._part_size(1)
            guess = [first] * (parts - 1) + [self._size - first * (parts - 1)]
        composite = _composite_crc32(buffer, guess, crcs)
        if composite != self.stored.value:
            # Perhaps parts of different sizes: ask for each one's.
            exact = [self._part_size(number) for number in range(1, parts + 1)]
            if sum(exact) == self._size and exact != guess:
                composite = _composite_crc32(buffer, exact, crcs)
        return composite

    def _part_size(self, number: int) -> int:
        return self._s3.head("checksum check", self._bucket, self._key, part=number).size


def _composite_crc32(buffer: np.ndarray, sizes: list[int], crcs: RangeCrcs) -> str:
    """S3's composite CRC32 (without "-<parts>") of ``buffer`` cut into parts of ``sizes``.

    Each part's CRC32 is combined from the ranges' where the ranges tile it, else
    computed over the buffer.
    """
    view, digests, start = buffer.data.cast("B"), bytearray(), 0
    for size in sizes:
        crc = crcs.of(start, start + size - 1) if size > 0 else None
        if crc is None:
            crc = zlib_ng.crc32(view[start : start + size])
        digests += crc.to_bytes(4, "big")
        start += size
    return crc32_b64(digests)
