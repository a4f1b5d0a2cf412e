"""clip_score: image-text similarity of CLIP embeddings, with a minimum or a top fraction."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.algos.quantile import kth_largest
from curate.algos.vectors import to_matrix
from curate.parts import ROWADDR, GlobalResult, num_rows
from curate.stage import GlobalStage, RowStage, StageParams


class ClipScoreParams(StageParams):
    image_column: str = Field("clip_embedding", description="image embedding column")
    text_column: str = Field("clip_text_embedding", description="text embedding column")
    min_score: float | None = Field(None, ge=-1, le=1, description="drop rows below this "
                                    "cosine similarity (DataComp uses 0.28 with ViT-L/14)")
    top_fraction: float | None = Field(None, gt=0, le=1, description="keep only this fraction "
                                       "of the scored rows, best first")


class ClipScore(RowStage, GlobalStage):
    """Cosine similarity of image and text embeddings (DataComp's CLIP-score filter) as
    `clip_score`. Keeps rows above `min_score` and/or within the best `top_fraction`.
    Rows without a text embedding get no score and are not judged."""

    type = "clip_score"
    Params = ClipScoreParams
    verdict_column = "clip_score_reason"

    def reads(self):
        return (self.params.image_column, self.params.text_column)

    def writes(self):
        return {"clip_score": pa.float32(), "clip_score_reason": pa.string()}

    def row_fingerprint(self):
        # the cut is decided by the global part, over the stored scores, on every run
        fingerprint = super().row_fingerprint()
        fingerprint.pop("min_score", None)
        fingerprint.pop("top_fraction", None)
        return fingerprint

    def process(self, batch, images):
        image, image_ok = to_matrix(batch[self.params.image_column])
        text, text_ok = to_matrix(batch[self.params.text_column])
        valid = image_ok & text_ok
        scores = np.einsum("ij,ij->i", image, text)
        return {"clip_score": pa.array(scores, pa.float32(), mask=~valid)}

    def global_part(self, ex) -> GlobalResult:
        p = self.params
        schema = pa.schema([("clip_score_reason", pa.string())])
        parts = ex.scan(["clip_score"], _scored)
        scored = sum(ex.gather(ex.map(parts, num_rows)))
        limit, label = p.min_score, ""
        if p.top_fraction is not None and scored:
            keep = max(1, round(p.top_fraction * scored))
            cutoff = kth_largest(ex, parts, "clip_score", keep)
            if limit is None or cutoff > limit:
                limit, label = cutoff, f" (top {p.top_fraction:.0%})"
        if limit is None:
            return GlobalResult([], schema)
        self.report = {"threshold": round(limit, 4), "scored": scored}
        return GlobalResult(ex.map(parts, _below, limit, label), schema)


def _scored(part: pa.Table) -> pa.Table:
    return part.filter(pc.is_valid(part["clip_score"]))


def _below(part: pa.Table, limit: float, label: str) -> pa.Table:
    scores = part["clip_score"]
    low = pc.less(scores, limit)
    text = pc.binary_join_element_wise(
        "clip_score ", pc.cast(pc.round(scores, 4), pa.string()), f" < {limit:.4g}{label}", "")
    return pa.table({ROWADDR: pc.filter(part[ROWADDR], low),
                     "clip_score_reason": pc.filter(text, low)})
