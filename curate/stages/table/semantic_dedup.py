"""semantic_dedup: mark rows of one k-means cluster within eps cosine distance of each other
(see curate.stages.table._embedding for how the stages over embeddings run)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.algos.kmeans import ASSIGN_CHUNK, assign, kmeans, semantic_duplicates
from curate.algos.vectors import to_matrix
from curate.parts import ROWADDR, GlobalResult
from curate.stage import StageParams
from curate.stages._common import check_score_column
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


def _train_kmeans(k: int, limit: int, iterations: int, seed: int, *candidates) -> np.ndarray:
    """Centroids of k-means on the training sample (every usable row when there are at
    most `limit`), in sample_id order so the result never depends on the split."""
    sample = _training_sample(limit, seed, candidates)
    centroids, _ = kmeans(sample, k, iterations=iterations, seed=seed, max_train=limit)
    return centroids


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


#: The columns semantic_dedup writes: each row's cluster, the kept copy it duplicates,
#: and its most similar other row of the cluster with the cosine distance to it.
OUTPUT = pa.schema([("cluster_id", pa.int32()), ("semantic_duplicate_of", pa.string()),
                    ("semantic_nearest", pa.string()),
                    ("semantic_nearest_distance", pa.float32())])


class SemanticDedup(_EmbeddingStage):
    """Mark semantic near-duplicates: rows of one k-means cluster within eps cosine distance."""

    type = "semantic_dedup"
    Params = SemanticDedupParams
    params: SemanticDedupParams
    verdict_column = "semantic_duplicate_of"
    verdict_prefix = "semantic duplicate of "
    marks_duplicates = True

    def writes(self) -> dict[str, pa.DataType]:
        return dict(zip(OUTPUT.names, OUTPUT.types))

    def nearest_columns(self) -> tuple[str, str]:
        return "semantic_nearest", "semantic_nearest_distance"

    def pair_columns(self) -> tuple[str, ...]:
        return (self.params.embedding_column,)

    def pair_limit(self) -> float:
        return self.params.eps

    def pair_distances(self, rows: pa.Table, kept: pa.Table) -> np.ndarray:
        """Cosine distance of the embeddings."""
        column = self.params.embedding_column
        a, a_ok = to_matrix(rows[column])
        b, b_ok = to_matrix(kept[column])
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        distance = 1.0 - np.einsum("ij,ij->i", a, b).astype(np.float64)
        distance[~(a_ok & b_ok)] = np.nan
        return distance

    def global_part(self, ex) -> GlobalResult:
        p = self.params
        parts = ex.scan(list(self.reads()), unit_vectors, p.embedding_column)
        m = sum(ex.gather(ex.map(parts, _usable_count)))
        k = min(p.clusters or auto_clusters(m), max(m, 1))
        candidates = ex.map(parts, _train_candidates, p.max_train, p.seed)
        centroids = ex.task(_train_kmeans, k, p.max_train, p.iterations, p.seed, *candidates)
        del candidates
        assigned = ex.map(parts, _assign_semantic, centroids, p)
        del parts  # assigned carries the vectors on
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
        return GlobalResult(found, OUTPUT)


def _valid_count(part: pa.Table, column: str) -> int:
    return int(pc.sum(pc.is_valid(part[column])).as_py() or 0) if part.num_rows else 0


def _assign_semantic(part: pa.Table, centroids: np.ndarray,
                     p: SemanticDedupParams) -> pa.Table:
    """Usable rows with their cluster and priority (smaller is kept first)."""
    usable = _bools(part["usable"]) if part.num_rows else np.zeros(0, bool)
    if not usable.all():
        part = part.filter(pa.array(usable))
    vectors = to_matrix(part["_vector"])[0] if part.num_rows else np.zeros((0, 1), np.float32)
    labels = assign(vectors, centroids) if part.num_rows else np.zeros(0, np.int32)
    if p.keep in ("closest", "farthest"):
        similarity = np.empty(len(vectors), dtype=np.float64)
        for start in range(0, len(vectors), ASSIGN_CHUNK):  # not a (rows, dim) centroids[labels]
            stop = start + ASSIGN_CHUNK
            similarity[start:stop] = np.einsum("ij,ij->i", vectors[start:stop],
                                               centroids[labels[start:stop]])
        priority = -similarity if p.keep == "closest" else similarity
    else:
        priority = _priority(part, p.score_column, p.keep == "highest", p.seed)
    return pa.table({ROWADDR: part[ROWADDR], "sample_id": part["sample_id"],
                     "_vector": part["_vector"], "cluster_id": pa.array(labels, pa.int32()),
                     "_priority": pa.array(priority, pa.float64())})


def _semantic_duplicates(part: pa.Table, eps: float) -> pa.Table:
    """Duplicates inside each cluster of the partition (all of a cluster's rows are here)."""
    if part.num_rows == 0:
        return pa.schema([(ROWADDR, pa.uint64()), *zip(OUTPUT.names, OUTPUT.types)]
                         ).empty_table()
    # ties go by sample_id order (a rank, not a sorted copy of the vectors)
    rank = np.empty(part.num_rows, dtype=np.int64)
    rank[pc.sort_indices(part, [("sample_id", "ascending")]).to_numpy()] = np.arange(part.num_rows)
    vectors = to_matrix(part["_vector"])[0]
    labels = part["cluster_id"].to_numpy()
    duplicate_of, nearest, distance = semantic_duplicates(
        vectors, labels, eps, part["_priority"].to_numpy(), tiebreak=rank, nearest=True)

    def ids(index: np.ndarray) -> pa.Array:
        return pc.take(part["sample_id"], pa.array(np.maximum(index, 0), pa.int64(),
                                                   mask=index < 0)).cast(pa.string())

    return pa.table({ROWADDR: part[ROWADDR], "cluster_id": part["cluster_id"],
                     "semantic_duplicate_of": ids(duplicate_of),
                     "semantic_nearest": ids(nearest),
                     "semantic_nearest_distance": pa.array(distance, pa.float32(),
                                                           mask=np.isnan(distance))})
