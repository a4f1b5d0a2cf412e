"""aesthetic_score: the LAION aesthetic predictor over CLIP embeddings, with a minimum."""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from curate.stage import ScoreFilter, Threshold
from curate.stages.image._head import HeadParams, _HeadStage


class AestheticParams(HeadParams):
    weights: str = Field(description="path or URL of the LAION improved aesthetic predictor "
                         "weights (e.g. sac+logos+ava1-l14-linearMSE.pth, for ViT-L/14)")
    sha256: str = Field(description="sha256 of the weights file; checked before use")
    min_score: float | None = Field(None, description="drop rows scoring below this (1-10 "
                                    "scale; 5 to 6 is common)")


class AestheticScore(_HeadStage, ScoreFilter):
    """The LAION improved aesthetic predictor (a linear MLP over L2-normalised CLIP
    ViT-L/14 image embeddings) as `aesthetic_score`, with an optional minimum."""

    type = "aesthetic_score"
    Params = AestheticParams
    verdict_column = "aesthetic_reason"
    threshold_params = ("min_score",)
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

    def score(self, batch, images):
        scores, valid = self.head_scores(batch)
        return {"aesthetic_score": pa.array(scores, pa.float32(), mask=~valid)}

    def thresholds(self):
        return [Threshold("aesthetic_score", "aesthetic", minimum=self.params.min_score)]
