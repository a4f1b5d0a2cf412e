"""What aesthetic_score and nsfw_score share: a head over CLIP embeddings, given by a weights
file and its sha256, and the verdicts of a score column."""

from __future__ import annotations

import re
from functools import cached_property

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curate.algos.vectors import to_matrix
from curate.models import ModelError, in_fixed_batches, stand_in_notice
from curate.stage import FrameScoreParams, ObjectStoreParams, RowStage


class HeadParams(FrameScoreParams, ObjectStoreParams):
    """A head over CLIP embeddings, by weights file, URL or object and its sha256."""

    embedding_column: str = Field("clip_embedding", description="CLIP image embedding column")
    weights: str | None = Field(None, description="path, http(s) URL or object (s3://...) of the "
                                "head's weights (.pth/.pt state dict or .safetensors)")
    sha256: str | None = Field(None, description="sha256 of the weights file; checked "
                               "before use")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError(f"must be the 64 hex digits of the file's sha256 (`sha256sum "
                             f"FILE`), got {value!r}")
        return value


class _HeadStage(RowStage):
    """Shared by the stages that score CLIP embeddings with a LinearHead."""

    hidden: str = "none"
    output: str = "none"
    local_path_params = ("weights",)

    def _fetch(self):
        from curate.models.heads import fetch_weights

        return fetch_weights(self.params.weights, self.params.sha256,
                             self.params.storage_options)

    @cached_property
    def _checked(self):
        """The weights as checked where the run starts (preflight, then notices): fetched
        and hashed once there. Workers fetch their own copy in setup."""
        return self._fetch()

    def extras(self):
        return ("models",)  # safetensors, or torch for a .pth state dict

    def head_preflight(self) -> list[tuple[str, str]]:
        if self.resources.gpus:
            return [("resources.gpus", "the head runs in numpy on the CPU, beside the stage "
                     "before it: GPUs reserved for it would sit idle; set resources.gpus: 0")]
        try:
            self._checked  # noqa: B018 (fetches and checks the sha256)
        except ModelError as exc:
            return [("weights", str(exc))]
        return []

    def head_notices(self) -> list[str]:
        label = stand_in_notice(str(self._checked))
        return [f"{self.name}: {self.params.weights} is a {label}"] if label else []

    def head_models(self) -> list[dict[str, str]]:
        return [{"stage": self.name, "model": self.params.weights,
                 "revision": f"sha256:{self.params.sha256.lower()}"}]

    def load_head(self):
        from curate.models.heads import LinearHead, load_linear_layers

        return LinearHead(load_linear_layers(self._fetch()), self.hidden, self.output)

    def head_scores(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        matrix, valid = to_matrix(batch[self.params.embedding_column])
        scores = np.zeros(len(valid), np.float32)
        if valid.any():
            rows = matrix[valid]
            scores[valid] = in_fixed_batches(self.head, rows, self.resources.batch_size)
        return scores, valid
