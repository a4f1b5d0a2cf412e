"""diversity_sample: keep `target` rows spread evenly over embedding clusters (see
curate.stages.table._embedding for how the stages over embeddings run)."""

from __future__ import annotations

import itertools
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
)
from curate.algos.vectors import to_matrix
from curate.parts import ROWADDR, GlobalResult
from curate.stage import StageParams
from curate.stages.table._embedding import (
    _bools,
    _cluster_sizes,
    _embedding_field,
    _EmbeddingStage,
    _iterations_field,
    _max_train_field,
    _priority,
    _train_candidates,
    _training_sample,
    _usable_count,
    auto_clusters,
    unit_vectors,
)


def _spread(sizes: np.ndarray) -> str:
    if sizes.size == 0:
        return "-"
    return f"min {int(sizes.min())} / median {float(np.median(sizes)):g} / max {int(sizes.max())}"


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


class DiversitySample(_EmbeddingStage):
    """Keep `target` rows spread evenly over embedding clusters (hierarchical if asked)."""

    type = "diversity_sample"
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
