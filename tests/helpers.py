"""Helpers shared by several test files (not part of the package)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import load_config
from curate.parts import concat
from curate.plan import build_stages
from curate.stage import RowStage
from curate.stages.table.phash_dedup import PHASH, PHASH_FLIPS, near_pairs


def hamming_groups(hashes: np.ndarray, max_distance: int,
                   flips: np.ndarray | None = None) -> np.ndarray:
    """Connected components of the graph 'Hamming distance <= max_distance' over uint64
    hashes, in this process: a label per hash. With `flips` ((n, 3) `flip_hashes` of the
    same images), the distance is the least Hamming distance between one image's pHash
    and the other's 8 orientations, either way round. The path PhashDedup takes on the
    cluster (band buckets, then large-star / small-star), on one partition."""
    from curate.algos.components import connected_components
    from curate.parts import MemoryExecutor

    hashes = np.asarray(hashes, dtype=np.uint64)
    unique, inverse = np.unique(hashes, return_inverse=True)
    if unique.size <= 1 or (max_distance == 0 and flips is None):
        return inverse.astype(np.int64)
    ex = MemoryExecutor(pa.table({}), pa.array([], pa.bool_()))
    if flips is None:
        parts = [pa.table({PHASH: pa.array(unique, pa.uint64())})]
    else:
        flat = pa.array(np.asarray(flips, np.uint64).reshape(-1))
        parts = [pa.table({PHASH: pa.array(hashes, pa.uint64()),
                           PHASH_FLIPS: pa.FixedSizeListArray.from_arrays(flat, 3)})]
    labels = concat(connected_components(ex, near_pairs(ex, parts, max_distance)).labels)
    component = unique.copy()
    if labels.num_rows:
        where = np.searchsorted(unique, labels["vertex"].to_numpy())
        component[where] = labels["component"].to_numpy()
    return np.unique(component, return_inverse=True)[1][inverse].astype(np.int64)


def table_differences(got, fresh, raw: dict) -> list[str]:
    """The columns of `fresh` (a fresh run of config `raw`, sorted like `got`) that `got`
    does not equal row for row, except where the fresh run skipped a row in a stage that
    skips dropped rows: an earlier run's values stay there (history), where a fresh run
    has nulls."""
    skipping = {s.stamp_column: (s.stamp_column, *s.written_names())
                for s in build_stages(load_config(raw))
                if isinstance(s, RowStage) and s.skips_dropped}
    if not got["sample_id"].equals(fresh["sample_id"]):
        return ["sample_id"]
    differ = []
    for name in fresh.column_names:
        if name not in got.column_names:
            differ.append(name)
            continue
        mine, theirs = got[name], fresh[name]
        for stamp, columns in skipping.items():
            if name in columns:
                ran = pc.is_valid(fresh[stamp])
                mine, theirs = mine.filter(ran), theirs.filter(ran)
        if not mine.equals(theirs):
            differ.append(name)
    return differ


def assert_same_table(got, fresh, raw: dict) -> None:
    differ = table_differences(got, fresh, raw)
    assert not differ, f"columns that differ from a fresh run's: {differ}"
