"""The k-th largest value of a column spread over parts, without gathering the column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.parts import Part


def _float_keys(part: pa.Table, column: str) -> np.ndarray:
    """float32 values as uint32 keys in the same order (nulls and NaN left out)."""
    values = pc.drop_null(part[column]).to_numpy(zero_copy_only=False).astype(np.float32)
    values = values[~np.isnan(values)]
    bits = values.view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint32)


def _key_histogram(part: pa.Table, column: str, high: int | None) -> np.ndarray:
    keys = _float_keys(part, column) if part.num_rows else np.zeros(0, np.uint32)
    if high is None:
        return np.bincount(keys >> 16, minlength=1 << 16)
    return np.bincount(keys[(keys >> 16) == high] & 0xFFFF, minlength=1 << 16)


def kth_largest(ex, parts: list[Part], column: str, k: int) -> float:
    """The k-th largest float32 value of `column` over all parts, exactly, from two rounds
    of 65,536-bin histograms (no process sees the column whole)."""
    def pick(counts: np.ndarray, wanted: int) -> tuple[int, int]:
        from_top = np.cumsum(counts[::-1])
        index = int(np.searchsorted(from_top, wanted))
        above = int(from_top[index - 1]) if index else 0
        return len(counts) - 1 - index, wanted - above

    high_counts = sum(ex.gather(ex.map(parts, _key_histogram, column, None)))
    high, rest = pick(high_counts, k)
    low_counts = sum(ex.gather(ex.map(parts, _key_histogram, column, high)))
    low, _ = pick(low_counts, rest)
    key = np.uint32((high << 16) | low)
    bits = key & np.uint32(0x7FFFFFFF) if key >> 31 else ~key
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])
