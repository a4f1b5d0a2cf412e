"""What semantic_dedup and diversity_sample share: global stages over an embedding column.

Both see only the rows that are still alive and have a usable embedding (not null, finite,
not all zeros). They run as tasks: k-means is trained on a seeded sample inside one task,
rows are assigned to centroids part by part, and the work inside a cluster runs on one
partition holding the whole cluster. Rows are put in sample_id order wherever order could
matter, so the output depends on the table's content, not on the order or split of rows.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.algos.kmeans import ASSIGN_CHUNK
from curate.algos.vectors import from_matrix, list_values, one_array, to_matrix
from curate.stage import GlobalStage

#: upper bound of the automatic cluster count
MAX_AUTO_CLUSTERS = 10_000


def auto_clusters(rows: int, cap: int | None = None) -> int:
    """About sqrt(rows) clusters (at least 1, at most MAX_AUTO_CLUSTERS and `cap`)."""
    k = min(max(1, round(math.sqrt(rows))), MAX_AUTO_CLUSTERS)
    return max(1, min(k, cap)) if cap is not None else k


def _bools(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def check_embedding_type(kind: pa.DataType, column: str) -> None:
    if not pa.types.is_fixed_size_list(kind) or not (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)
    ):
        raise ValueError(f"column {column!r} must be a fixed_size_list of floats, got {kind}")


def unit_vectors(part: pa.Table, column: str) -> pa.Table:
    """The part with `usable` (a finite, non-zero embedding) and `_vector` (the embedding
    scaled to unit length, float32; null where not usable), in sample_id order."""
    values = one_array(part[column]) if part.num_rows else pa.array(
        [], part.schema.field(column).type)
    check_embedding_type(values.type, column)
    matrix = list_values(values)  # a view where Arrow allows: no copy of the column
    order = pc.sort_indices(part, [("sample_id", "ascending")]).to_numpy()
    usable = _bools(pc.is_valid(values))
    # one (rows, dim) float32 array, filled block by block straight in sample_id order
    unit = np.zeros((len(order), matrix.shape[1]), dtype=np.float32)
    for start in range(0, len(order), ASSIGN_CHUNK):
        rows = order[start:start + ASSIGN_CHUNK]
        block = matrix[rows].astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            squared = np.einsum("ij,ij->i", block, block)
        ok = usable[rows] & np.isfinite(squared) & (squared > 0)
        usable[rows] = ok
        unit[start:start + len(rows)][ok] = block[ok] / np.sqrt(squared[ok])[:, None]
    out = part.drop_columns([column]).take(pa.array(order))
    out = out.append_column("usable", pa.array(usable[order]))
    return out.append_column("_vector", from_matrix(unit, usable[order]))


def _usable_count(part: pa.Table) -> int:
    return int(np.count_nonzero(_bools(part["usable"]))) if part.num_rows else 0


def _train_candidates(part: pa.Table, limit: int, seed: int) -> pa.Table:
    """At most `limit` usable rows of the part: those of smallest seeded hash (together over
    all parts: a seeded sample that does not depend on how rows are split)."""
    rows = np.flatnonzero(_bools(part["usable"])) if part.num_rows else np.zeros(0, np.int64)
    if len(rows) > limit:  # as _seeded_sample on the usable rows, without copying them all
        key = seeded_uniform(part["sample_id"].take(pa.array(rows)), seed)
        rows = rows[np.argsort(key, kind="stable")[:limit]]
    return part.select(["sample_id", "_vector"]).take(pa.array(rows))


def _seeded_sample(table: pa.Table, limit: int, seed: int) -> pa.Table:
    """The `limit` rows of smallest seeded hash (all rows when there are no more)."""
    if table.num_rows <= limit:
        return table
    key = seeded_uniform(table["sample_id"], seed)
    return table.take(pa.array(np.argsort(key, kind="stable")[:limit]))


def _training_sample(limit: int, seed: int, candidates) -> np.ndarray:
    table = pa.concat_tables([c for c in candidates if c.num_rows] or candidates[:1])
    table = _seeded_sample(table, limit, seed)
    order = pc.sort_indices(table, [("sample_id", "ascending")]).to_numpy()
    return to_matrix(table["_vector"])[0][order]  # sample_id order, without an Arrow copy


def seeded_uniform(ids: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """A value in [0, 1) for each sample_id, fixed by the seed (the same in every process
    and for every split of the rows)."""
    out = np.empty(len(ids), dtype=np.float64)
    salt = str(seed).encode()
    for i, sample_id in enumerate(ids.to_pylist()):
        digest = hashlib.blake2b(sample_id.encode(), digest_size=8, key=salt).digest()
        out[i] = (int.from_bytes(digest, "big") >> 11) / float(1 << 53)
    return out


def _priority(part: pa.Table, score_column: str | None, highest: bool, seed: int) -> np.ndarray:
    """Smaller first: by score (nulls and NaN last) or, without a score, seeded random."""
    if score_column is None:
        return seeded_uniform(part["sample_id"], seed)
    score = pc.cast(part[score_column], pa.float64()).to_numpy(zero_copy_only=False)
    priority = -score if highest else score
    return np.where(np.isnan(priority), np.inf, priority)


def _cluster_sizes(part: pa.Table, column: str, k: int) -> np.ndarray:
    labels = pc.drop_null(part[column]).to_numpy() if part.num_rows else np.zeros(0, int)
    return np.bincount(labels, minlength=k)


def _embedding_field():
    return Field(
        "clip_embedding",
        description="fixed_size_list<float32> column of embeddings (null for failed rows)",
    )


def _iterations_field():
    return Field(20, ge=1, description="k-means iterations")


def _max_train_field():
    return Field(
        100_000, ge=1, description="rows sampled to train k-means (every row is then assigned)"
    )


class _EmbeddingStage(GlobalStage):
    """A global stage over an embedding column, optionally ranked by a score column."""

    def reads(self) -> tuple[str, ...]:
        extra = (self.params.score_column,) if self.params.score_column else ()
        return ("sample_id", self.params.embedding_column, *extra)
