"""semantic_dedup and diversity_sample: global stages over an embedding column.

Both see only the rows that are still alive and have a usable embedding (not null, finite,
not all zeros). Those rows are put in sample_id order before anything is computed, so the
output depends on the table's content, not on the order of its rows.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from curate.cluster import (
    ASSIGN_CHUNK,
    balanced_sample,
    kmeans,
    semantic_duplicates,
)
from curate.registry import register
from curate.stage import Stage, StageParams
from curate.stages.dedup import check_score_column
from curate.vectors import list_values

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


def _chunk_matrix(chunk: pa.FixedSizeListArray) -> np.ndarray:
    """The (rows, dim) float32 view of one chunk (zero-copy for float32 without nulls)."""
    return list_values(chunk).astype(np.float32, copy=False)


def load_embeddings(
    table: pa.Table, column: str, alive: pa.Array | pa.ChunkedArray
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, unit vectors (m, dim) float32) of the alive rows with a usable
    embedding, in sample_id order. No per-row Python; one copy of the used vectors."""
    values = table[column]
    kind = values.type
    if not pa.types.is_fixed_size_list(kind) or not (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)
    ):
        raise ValueError(f"column {column!r} must be a fixed_size_list of floats, got {kind}")
    dim = kind.list_size
    n = table.num_rows
    usable = _bools(alive) & _bools(pc.is_valid(values))
    squared = np.zeros(n, dtype=np.float32)
    start = 0
    for chunk in values.chunks:
        matrix = _chunk_matrix(chunk)
        for lo in range(0, len(matrix), ASSIGN_CHUNK):
            block = matrix[lo:lo + ASSIGN_CHUNK]
            with np.errstate(over="ignore", invalid="ignore"):
                squared[start + lo:start + lo + len(block)] = np.einsum("ij,ij->i", block, block)
        start += len(chunk)
    usable &= np.isfinite(squared) & (squared > 0)
    by_id = pc.sort_indices(table["sample_id"]).to_numpy()
    rows = by_id[usable[by_id]]
    position = np.full(n, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    vectors = np.empty((len(rows), dim), dtype=np.float32)
    start = 0
    for chunk in values.chunks:
        matrix = _chunk_matrix(chunk)
        for lo in range(0, len(matrix), ASSIGN_CHUNK):
            stop = start + min(lo + ASSIGN_CHUNK, len(matrix))
            local = lo + np.flatnonzero(usable[start + lo:stop])
            if local.size:
                vectors[position[start + local]] = matrix[local]
        start += len(chunk)
    for lo in range(0, len(rows), ASSIGN_CHUNK):
        norms = np.sqrt(squared[rows[lo:lo + ASSIGN_CHUNK]])
        vectors[lo:lo + ASSIGN_CHUNK] /= norms[:, None]
    return rows, vectors


def _scores(table: pa.Table, column: str, rows: np.ndarray) -> np.ndarray:
    """Scores of `rows` as float64; null and NaN become NaN."""
    values = pc.cast(table[column], pa.float64())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.to_numpy(zero_copy_only=False)[rows]


def _centroid_similarity(vectors: np.ndarray, centroids: np.ndarray,
                         labels: np.ndarray) -> np.ndarray:
    out = np.empty(len(vectors), dtype=np.float64)
    for lo in range(0, len(vectors), ASSIGN_CHUNK):
        block = vectors[lo:lo + ASSIGN_CHUNK]
        out[lo:lo + len(block)] = np.einsum(
            "ij,ij->i", block, centroids[labels[lo:lo + ASSIGN_CHUNK]])
    return out


def _spread(sizes: np.ndarray) -> str:
    if sizes.size == 0:
        return "-"
    return f"min {int(sizes.min())} / median {float(np.median(sizes)):g} / max {int(sizes.max())}"


def _int32_column(n: int, rows: np.ndarray, values: np.ndarray) -> pa.Array:
    out = np.zeros(n, dtype=np.int32)
    valid = np.zeros(n, dtype=bool)
    out[rows] = values
    valid[rows] = True
    return pa.array(out, pa.int32(), mask=~valid)


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


class SemanticDedupParams(StageParams):
    embedding_column: str = _embedding_field()
    eps: float = Field(
        0.05, gt=0, lt=1,
        description="cosine distance under which two rows of a cluster are duplicates "
        "(similarity > 1 - eps)",
    )
    clusters: int | None = Field(
        None, ge=1, description="k-means clusters (default: about sqrt(rows))"
    )
    keep: Literal["closest", "farthest", "highest", "lowest"] = Field(
        "closest",
        description="which copy is kept: closest/farthest to its cluster centroid, or "
        "highest/lowest by score_column",
    )
    score_column: str | None = Field(
        None, description="column ranking copies when keep is highest or lowest"
    )
    iterations: int = _iterations_field()
    max_train: int = _max_train_field()
    seed: int = Field(0, description="seed of k-means")

    @model_validator(mode="after")
    def _score_column(self):
        check_score_column(self.keep, self.score_column)
        return self


class _EmbeddingStage(Stage):
    """A global stage over an embedding column, optionally ranked by a score column."""

    def reads(self) -> tuple[str, ...]:
        extra = (self.params.score_column,) if self.params.score_column else ()
        return ("sample_id", self.params.embedding_column, *extra)


@register("semantic_dedup")
class SemanticDedup(_EmbeddingStage):
    """Mark semantic near-duplicates: rows of one k-means cluster within eps cosine distance."""

    Params = SemanticDedupParams
    params: SemanticDedupParams
    verdict_column = "semantic_duplicate_of"
    verdict_prefix = "semantic duplicate of "
    marks_duplicates = True

    def writes(self) -> dict[str, pa.DataType]:
        return {"cluster_id": pa.int32(), "semantic_duplicate_of": pa.string()}

    def run_global(self, table: pa.Table, alive: pa.Array) -> dict[str, pa.Array]:
        p = self.params
        n = table.num_rows
        rows, vectors = load_embeddings(table, p.embedding_column, alive)
        m = len(rows)
        k = min(p.clusters or auto_clusters(m), max(m, 1))
        centroids, labels = kmeans(vectors, k, iterations=p.iterations, seed=p.seed,
                                   max_train=p.max_train)
        if p.keep in ("closest", "farthest"):
            similarity = _centroid_similarity(vectors, centroids, labels)
            priority = -similarity if p.keep == "closest" else similarity
        else:
            score = _scores(table, p.score_column, rows)
            priority = -score if p.keep == "highest" else score
            priority = np.where(np.isnan(priority), np.inf, priority)
        duplicate_of = semantic_duplicates(vectors, labels, p.eps, priority)
        del vectors
        is_dup = duplicate_of >= 0
        keeper = np.full(n, -1, dtype=np.int64)
        keeper[rows[is_dup]] = rows[duplicate_of[is_dup]]
        verdict = pc.take(table["sample_id"], pa.array(keeper, pa.int64(), mask=keeper < 0))
        if isinstance(verdict, pa.ChunkedArray):
            verdict = verdict.combine_chunks()
        sizes = np.bincount(labels) if m else np.zeros(0, dtype=np.int64)
        self.report = {
            "rows": m,
            "clusters": int(np.count_nonzero(sizes)),
            "largest_cluster": int(sizes.max()) if m else 0,
            "duplicates": int(is_dup.sum()),
        }
        return {
            "cluster_id": _int32_column(n, rows, labels),
            "semantic_duplicate_of": verdict.cast(pa.string()),
        }


class DiversityParams(StageParams):
    target: int = Field(ge=1, description="rows to keep")
    embedding_column: str = _embedding_field()
    clusters: int | list[int] | None = Field(
        None,
        description="k-means clusters, or cluster counts finest to coarsest for hierarchical "
        "balancing (default: about sqrt(rows), at most target)",
    )
    score_column: str | None = Field(
        None, description="column choosing rows inside a cluster (default: a seeded random order)"
    )
    order: Literal["highest", "lowest"] = Field(
        "highest", description="with score_column: keep the highest or the lowest scores"
    )
    iterations: int = _iterations_field()
    max_train: int = _max_train_field()
    seed: int = Field(0, description="seed of k-means and of the random order")

    @field_validator("clusters")
    @classmethod
    def _levels(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("clusters: give at least one cluster count")
            if any(k < 1 for k in value):
                raise ValueError("clusters: every cluster count must be >= 1")
            if any(b >= a for a, b in itertools.pairwise(value)):
                raise ValueError("clusters: list the counts finest to coarsest, each level "
                                 "with fewer clusters than the one before")
        elif value is not None and value < 1:
            raise ValueError("clusters must be >= 1")
        return value

    @model_validator(mode="after")
    def _order(self):
        # Only a non-default order is refused: a saved config lists every default.
        if self.order != "highest" and not self.score_column:
            raise ValueError("order is only used with score_column")
        return self


@register("diversity_sample")
class DiversitySample(_EmbeddingStage):
    """Keep `target` rows spread evenly over embedding clusters (hierarchical if asked)."""

    Params = DiversityParams
    params: DiversityParams
    verdict_column = "diversity_reason"

    def writes(self) -> dict[str, pa.DataType]:
        return {"diversity_cluster": pa.int32(), "diversity_reason": pa.string()}

    def levels(self, rows: int) -> list[int]:
        clusters = self.params.clusters
        if clusters is None:
            return [auto_clusters(rows, self.params.target)]
        return list(clusters) if isinstance(clusters, list) else [clusters]

    def run_global(self, table: pa.Table, alive: pa.Array) -> dict[str, pa.Array]:
        p = self.params
        n = table.num_rows
        rows, vectors = load_embeddings(table, p.embedding_column, alive)
        m = len(rows)
        if p.score_column:
            score = _scores(table, p.score_column, rows)
            priority = -score if p.order == "highest" else score
            priority = np.where(np.isnan(priority), np.inf, priority)
        else:
            priority = np.random.default_rng(p.seed).random(m)
        levels = self.levels(m)
        chosen, finest = balanced_sample(vectors, p.target, levels, priority, p.seed,
                                         iterations=p.iterations, max_train=p.max_train)
        del vectors
        # 0: alive, embedded, not chosen; 1: alive without a usable embedding; -1: passes
        code = np.where(_bools(alive), 1, -1).astype(np.int64)
        code[rows] = np.where(chosen, -1, 0)
        reasons = pa.array(["not_sampled", "not_sampled: no usable embedding"], pa.string())
        verdict = pc.take(reasons, pa.array(code, pa.int64(), mask=code < 0))
        before = np.bincount(finest) if m else np.zeros(0, dtype=np.int64)
        after = np.bincount(finest[chosen], minlength=len(before))
        present = before > 0
        self.report = {"rows": m, "clusters": int(present.sum())}
        if len(levels) > 1:
            self.report["hierarchy"] = " > ".join(str(k) for k in levels)
        self.report.update(sampled=int(chosen.sum()), sizes_before=_spread(before[present]),
                           sizes_after=_spread(after[present]))
        return {
            "diversity_cluster": _int32_column(n, rows, finest),
            "diversity_reason": verdict,
        }
