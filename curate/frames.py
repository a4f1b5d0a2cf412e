"""Image stages on clips: a clip's sampled frames go through a stage as rows of their own,
and the stage's columns come back as one value per clip.

How a column comes back: a vector (an embedding) as the normalised mean of its frames';
a number by the stage's `reduction` (min, mean or max); anything else (a hash, a text) as
the key frame's, the middle one. A verdict is recomputed from the reduced scores where the
stage can (`Stage.verdicts`); otherwise a clip fails when any of its frames fails.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.stage import Stage


def frame_counts(media: list | None, n: int) -> np.ndarray:
    """Frames per row: a clip's sampled frames, 1 for an image, 0 for nothing."""
    if media is None:
        return np.zeros(n, np.int64)
    return np.array([len(m.frames) if hasattr(m, "frames") else (0 if m is None else 1)
                     for m in media], np.int64)


def frames_of(media: list) -> list:
    """The frames in row order (an image is its own single frame)."""
    out = []
    for m in media:
        if m is None:
            continue
        out.extend(m.frames if hasattr(m, "frames") else [m])
    return out


def owners(counts: np.ndarray) -> np.ndarray:
    """For each frame, the row it belongs to."""
    return np.repeat(np.arange(len(counts)), counts)


def key_frames(counts: np.ndarray) -> np.ndarray:
    """Position (among all frames) of each row's key frame; -1 for rows without frames."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    return np.where(counts > 0, starts + (counts - 1) // 2, -1)


def reduce(stage: Stage, rows: pa.Table, columns: dict[str, pa.Array],
           counts: np.ndarray) -> dict[str, pa.Array]:
    """A stage's per-frame columns as one value per row of `rows`."""
    owner = owners(counts)
    keys = key_frames(counts)
    how = stage.reduction()
    out: dict[str, pa.Array] = {}
    for name, values in columns.items():
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if name == stage.verdict_column:
            continue
        kind = values.type
        if pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type):
            out[name] = _mean_vectors(values, owner, len(counts))
        elif pa.types.is_floating(kind):
            out[name] = _reduce_numbers(values, owner, len(counts), how)
        else:
            take = pa.array(np.where(keys >= 0, keys, 0), mask=keys < 0)
            out[name] = values.take(take) if len(values) else pa.nulls(len(counts), kind)
    if stage.verdict_column in columns:
        recomputed = stage.verdicts(rows, out)
        out[stage.verdict_column] = recomputed if recomputed is not None else \
            _any_verdict(columns[stage.verdict_column], owner, len(counts))
    return out


def _reduce_numbers(values: pa.Array, owner: np.ndarray, n: int, how: str) -> pa.Array:
    data = values.to_numpy(zero_copy_only=False).astype(np.float64)
    valid = ~np.isnan(data)
    out = np.full(n, np.nan)
    for row in np.unique(owner[valid]):
        picked = data[(owner == row) & valid]
        out[row] = {"min": picked.min, "max": picked.max, "mean": picked.mean}[how]()
    return pa.array(out, values.type, mask=np.isnan(out)) if n else pa.array([], values.type)


def _mean_vectors(values: pa.Array, owner: np.ndarray, n: int) -> pa.Array:
    from curate.algos.vectors import from_matrix, to_matrix

    matrix, valid = to_matrix(values)
    dim = values.type.list_size
    sums = np.zeros((n, dim), np.float64)
    np.add.at(sums, owner[valid], matrix[valid])
    norms = np.linalg.norm(sums, axis=1)
    has = norms > 0
    sums[has] /= norms[has, None]
    return from_matrix(sums.astype(np.float32), has)


def _any_verdict(values: pa.Array, owner: np.ndarray, n: int) -> pa.Array:
    """The first frame's verdict of each row that has one (any failing frame fails it)."""
    texts = values.to_pylist()
    out: list[str | None] = [None] * n
    for row, text in zip(owner, texts):
        if text and out[row] is None:
            out[row] = text
    return pa.array(out, pa.string())


def as_lists(values: pa.Array, counts: np.ndarray) -> pa.Array:
    """Per-frame values grouped into one list per row (null where a row has no frames)."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    mask = pa.array(counts == 0)
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def flatten_lists(batch: pa.Table, list_columns: list[str]) -> tuple[pa.Table, np.ndarray]:
    """Rows repeated once per element of their lists in `list_columns` (all of the same
    lengths per row), those columns flattened: the frame rows of a later pool."""
    first = batch[list_columns[0]].combine_chunks()
    counts = pc.fill_null(pc.list_value_length(first), 0).to_numpy().astype(np.int64)
    frames = batch.take(pa.array(owners(counts)))
    for name in list_columns:
        column = batch[name].combine_chunks()
        index = frames.column_names.index(name)
        frames = frames.set_column(index, name, pc.list_flatten(column))
    return frames, counts
