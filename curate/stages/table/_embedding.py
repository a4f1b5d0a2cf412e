"""semantic_dedup and diversity_sample: global stages over an embedding column.

Both see only the rows that are still alive and have a usable embedding (not null, finite,
not all zeros). They run as tasks: k-means is trained on a seeded sample inside one task,
rows are assigned to centroids part by part, and the work inside a cluster runs on one
partition holding the whole cluster. Rows are put in sample_id order wherever order could
matter, so the output depends on the table's content, not on the order or split of rows.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from curate.algos.kmeans import (
    assign,
    choose_by_quota,
    cluster_quotas,
    cluster_tree,
    kmeans,
    semantic_duplicates,
)
from curate.algos.vectors import from_matrix, list_values, to_matrix
from curate.parts import ROWADDR, GlobalResult
from curate.registry import register
from curate.stage import Stage, StageParams
from curate.stages.dedup import check_score_column

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
    values = part[column].combine_chunks() if part.num_rows else pa.array(
        [], part.schema.field(column).type)
    check_embedding_type(values.type, column)
    matrix = list_values(values).astype(np.float32, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        squared = np.einsum("ij,ij->i", matrix, matrix)
    usable = _bools(pc.is_valid(values)) & np.isfinite(squared) & (squared > 0)
    unit = np.zeros_like(matrix)
    unit[usable] = matrix[usable] / np.sqrt(squared[usable])[:, None]
    out = part.drop_columns([column]).append_column("usable", pa.array(usable))
    out = out.append_column("_vector", from_matrix(unit, usable))
    return out.sort_by("sample_id")


def _usable_count(part: pa.Table) -> int:
    return int(np.count_nonzero(_bools(part["usable"]))) if part.num_rows else 0


def _train_candidates(part: pa.Table, limit: int, seed: int) -> pa.Table:
    """At most `limit` usable rows of the part: those of smallest seeded hash (together over
    all parts: a seeded sample that does not depend on how rows are split)."""
    part = part.filter(pa.array(_bools(part["usable"]))) if part.num_rows else part
    return _seeded_sample(part, limit, seed).select(["sample_id", "_vector"])


def _seeded_sample(table: pa.Table, limit: int, seed: int) -> pa.Table:
    """The `limit` rows of smallest seeded hash (all rows when there are no more)."""
    if table.num_rows <= limit:
        return table
    key = seeded_uniform(table["sample_id"], seed)
    return table.take(pa.array(np.argsort(key, kind="stable")[:limit]))


def _train_kmeans(k: int, limit: int, iterations: int, seed: int, *candidates) -> np.ndarray:
    """Centroids of k-means on the training sample (every usable row when there are at
    most `limit`), in sample_id order so the result never depends on the split."""
    sample = _training_sample(limit, seed, candidates)
    centroids, _ = kmeans(sample, k, iterations=iterations, seed=seed, max_train=limit)
    return centroids


def _training_sample(limit: int, seed: int, candidates) -> np.ndarray:
    table = pa.concat_tables([c for c in candidates if c.num_rows] or candidates[:1])
    table = _seeded_sample(table, limit, seed).sort_by("sample_id")
    return to_matrix(table["_vector"])[0]


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


def _spread(sizes: np.ndarray) -> str:
    if sizes.size == 0:
        return "-"
    return f"min {int(sizes.min())} / median {float(np.median(sizes)):g} / max {int(sizes.max())}"


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

    def global_part(self, ex) -> GlobalResult:
        p = self.params
        parts = ex.scan(list(self.reads()), unit_vectors, p.embedding_column)
        m = sum(ex.gather(ex.map(parts, _usable_count)))
        k = min(p.clusters or auto_clusters(m), max(m, 1))
        candidates = ex.map(parts, _train_candidates, p.max_train, p.seed)
        centroids = ex.task(_train_kmeans, k, p.max_train, p.iterations, p.seed, *candidates)
        assigned = ex.map(parts, _assign_semantic, centroids, p)
        found = ex.shuffle(assigned, "cluster_id", _semantic_duplicates, p.eps)
        sizes = sum(ex.gather(ex.map(assigned, _cluster_sizes, "cluster_id", k)),
                    np.zeros(k, dtype=np.int64))
        duplicates = sum(ex.gather(ex.map(found, _valid_count, "semantic_duplicate_of")))
        self.report = {
            "rows": m,
            "clusters": int(np.count_nonzero(sizes)),
            "largest_cluster": int(sizes.max()) if m else 0,
            "duplicates": int(duplicates),
        }
        schema = pa.schema([("cluster_id", pa.int32()), ("semantic_duplicate_of", pa.string())])
        return GlobalResult(found, schema)


def _valid_count(part: pa.Table, column: str) -> int:
    return int(pc.sum(pc.is_valid(part[column])).as_py() or 0) if part.num_rows else 0


def _assign_semantic(part: pa.Table, centroids: np.ndarray,
                     p: SemanticDedupParams) -> pa.Table:
    """Usable rows with their cluster and priority (smaller is kept first)."""
    part = part.filter(pa.array(_bools(part["usable"]))) if part.num_rows else part
    vectors = to_matrix(part["_vector"])[0] if part.num_rows else np.zeros((0, 1), np.float32)
    labels = assign(vectors, centroids) if part.num_rows else np.zeros(0, np.int32)
    if p.keep in ("closest", "farthest"):
        similarity = np.einsum("ij,ij->i", vectors, centroids[labels]).astype(np.float64)
        priority = -similarity if p.keep == "closest" else similarity
    else:
        priority = _priority(part, p.score_column, p.keep == "highest", p.seed)
    return pa.table({ROWADDR: part[ROWADDR], "sample_id": part["sample_id"],
                     "_vector": part["_vector"], "cluster_id": pa.array(labels, pa.int32()),
                     "_priority": pa.array(priority, pa.float64())})


def _semantic_duplicates(part: pa.Table, eps: float) -> pa.Table:
    """Duplicates inside each cluster of the partition (all of a cluster's rows are here)."""
    if part.num_rows == 0:
        return pa.table({ROWADDR: pa.array([], pa.uint64()), "cluster_id": pa.array([], pa.int32()),
                         "semantic_duplicate_of": pa.array([], pa.string())})
    part = part.sort_by("sample_id")  # ties go by row index: sample_id order
    vectors = to_matrix(part["_vector"])[0]
    labels = part["cluster_id"].to_numpy()
    duplicate_of = semantic_duplicates(vectors, labels, eps, part["_priority"].to_numpy())
    is_dup = duplicate_of >= 0
    keeper = pa.array(np.maximum(duplicate_of, 0), pa.int64(), mask=~is_dup)
    verdict = pc.take(part["sample_id"], keeper)
    return pa.table({ROWADDR: part[ROWADDR], "cluster_id": part["cluster_id"],
                     "semantic_duplicate_of": verdict.cast(pa.string())})


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

    def global_part(self, ex) -> GlobalResult:
        p = self.params
        parts = ex.scan(list(self.reads()), unit_vectors, p.embedding_column)
        m = sum(ex.gather(ex.map(parts, _usable_count)))
        levels = self.levels(m)
        k = min(levels[0], max(m, 1))
        candidates = ex.map(parts, _train_candidates, p.max_train, p.seed)
        trained = ex.task(_train_hierarchy, k, levels, p.max_train, p.iterations, p.seed,
                          *candidates)
        centroids, tree = ex.gather([trained])[0]
        assigned = ex.map(parts, _assign_diversity, ex.put(centroids), p)
        before = sum(ex.gather(ex.map(assigned, _cluster_sizes, "diversity_cluster", k)),
                     np.zeros(k, dtype=np.int64))
        quota = cluster_quotas(before, tree, p.target) if m else np.zeros(k, np.int64)
        chosen = ex.shuffle(assigned, "diversity_cluster", _choose, ex.put(quota))
        present = before > 0
        self.report = {"rows": m, "clusters": int(present.sum())}
        if len(levels) > 1:
            self.report["hierarchy"] = " > ".join(str(k) for k in levels)
        self.report.update(sampled=int(quota.sum()), sizes_before=_spread(before[present]),
                           sizes_after=_spread(quota[present]))
        schema = pa.schema([("diversity_cluster", pa.int32()),
                            ("diversity_reason", pa.string())])
        return GlobalResult(chosen, schema)


def _train_hierarchy(k: int, levels: list[int], limit: int, iterations: int, seed: int,
                     *candidates) -> tuple[np.ndarray, list[np.ndarray]]:
    """Finest centroids from the training sample, and the coarser levels above them."""
    sample = _training_sample(limit, seed, candidates)
    if len(sample) == 0:
        return np.zeros((0, 1), np.float32), []
    centroids, _ = kmeans(sample, k, iterations=iterations, seed=seed, max_train=limit)
    return centroids, cluster_tree(centroids, levels, seed=seed, iterations=iterations,
                                   max_train=limit)


def _assign_diversity(part: pa.Table, centroids: np.ndarray, p: DiversityParams) -> pa.Table:
    usable = _bools(part["usable"]) if part.num_rows else np.zeros(0, bool)
    labels = np.zeros(part.num_rows, dtype=np.int32)
    if usable.any():
        vectors = to_matrix(part["_vector"].filter(pa.array(usable)))[0]
        labels[usable] = assign(vectors, centroids)
    priority = _priority(part, p.score_column, p.order == "highest", p.seed) \
        if part.num_rows else np.zeros(0)
    return pa.table({ROWADDR: part[ROWADDR], "sample_id": part["sample_id"],
                     "diversity_cluster": pa.array(labels, pa.int32(), mask=~usable),
                     "_priority": pa.array(priority, pa.float64())})


def _choose(part: pa.Table, quota: np.ndarray) -> pa.Table:
    """Each cluster's quota of rows, smallest priority first (ties by sample_id); the others
    are not sampled."""
    if part.num_rows == 0:
        return pa.table({ROWADDR: pa.array([], pa.uint64()),
                         "diversity_cluster": pa.array([], pa.int32()),
                         "diversity_reason": pa.array([], pa.string())})
    part = part.sort_by("sample_id")
    usable = _bools(pc.is_valid(part["diversity_cluster"]))
    finest = pc.fill_null(part["diversity_cluster"], 0).to_numpy().astype(np.int64)
    chosen = np.zeros(part.num_rows, dtype=bool)
    rows = np.flatnonzero(usable)
    chosen[rows] = choose_by_quota(finest[rows], part["_priority"].to_numpy()[rows], quota)
    # 0: embedded, not chosen; 1: without a usable embedding; -1: passes
    code = np.where(usable, np.where(chosen, -1, 0), 1)
    reasons = pa.array(["not_sampled", "not_sampled: no usable embedding"], pa.string())
    verdict = pc.take(reasons, pa.array(code, pa.int64(), mask=code < 0))
    return pa.table({ROWADDR: part[ROWADDR], "diversity_cluster": part["diversity_cluster"],
                     "diversity_reason": verdict})
