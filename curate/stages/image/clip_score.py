"""clip_score: image-text similarity of CLIP embeddings, with a minimum or a top fraction."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.algos.quantile import kth_largest
from curate.algos.vectors import to_matrix
from curate.parts import ROWADDR, GlobalResult, num_rows
from curate.stage import GlobalStage, ScoreFilter, StageParams, Threshold


class ClipScoreParams(StageParams):
    image_column: str = Field("clip_embedding", description="image embedding column")
    text_column: str = Field("clip_text_embedding", description="text embedding column")
    min_score: float | None = Field(None, ge=-1, le=1, description="drop rows below this "
                                    "cosine similarity (DataComp uses 0.28 with ViT-L/14)")
    top_fraction: float | None = Field(None, gt=0, le=1, description="keep only this fraction "
                                       "of the scored rows, best first")


class ClipScore(ScoreFilter, GlobalStage):
    """Cosine similarity of image and text embeddings (DataComp's CLIP-score filter) as
    `clip_score`. Keeps rows above `min_score` and/or within the best `top_fraction`.
    Rows without a text embedding get no score and are not judged. `min_score` is decided
    as each row is scored, so the expensive stages after it (captions, VLM scores) skip
    the rows it drops; `top_fraction` needs every score and is decided over the table
    (the stages after it then compute every row)."""

    type = "clip_score"
    Params = ClipScoreParams
    verdict_column = "clip_score_reason"
    # both only judge the stored scores: changing them decides verdicts again
    threshold_params = ("min_score", "top_fraction")

    @property
    def verdict_at_row_time(self) -> bool:
        return self.params.top_fraction is None

    def reads(self):
        return (self.params.image_column, self.params.text_column)

    def writes(self):
        return {"clip_score": pa.float32(), "clip_score_reason": pa.string()}

    def score(self, batch, images):
        image, image_ok = to_matrix(batch[self.params.image_column])
        text, text_ok = to_matrix(batch[self.params.text_column])
        valid = image_ok & text_ok
        scores = np.einsum("ij,ij->i", image, text)
        return {"clip_score": pa.array(scores, pa.float32(), mask=~valid)}

    def thresholds(self):
        return [Threshold("clip_score", "clip_score", minimum=self.params.min_score)]

    def global_part(self, ex) -> GlobalResult:
        p = self.params
        schema = pa.schema([("clip_score_reason", pa.string())])
        if p.top_fraction is None:  # decided in the row phase: nothing to add
            return GlobalResult([], schema, keep=True)
        parts = ex.scan(["clip_score"], _scored)
        scored = sum(ex.gather(ex.map(parts, num_rows)))
        cutoff = None
        if scored:
            cutoff = kth_largest(ex, parts, "clip_score", max(1, round(p.top_fraction * scored)))
            limit = cutoff if p.min_score is None else max(cutoff, p.min_score)
            self.report = {"threshold": round(limit, 4), "scored": scored}
        return GlobalResult(ex.map(parts, _below, p.min_score, cutoff,
                                   f" (top {p.top_fraction:.0%})"), schema)


def _scored(part: pa.Table) -> pa.Table:
    return part.filter(pc.is_valid(part["clip_score"]))


def _below(part: pa.Table, minimum: float | None, cutoff: float | None,
           label: str) -> pa.Table:
    """The reasons of the rows under `minimum` (as the row phase words them) or, above
    it, under the top fraction's `cutoff`: worded one by one for those rows only."""
    limits = [v for v in (minimum, cutoff) if v is not None]
    scores = part["clip_score"].to_numpy(zero_copy_only=False)
    low = np.flatnonzero(scores < max(limits)) if limits else np.zeros(0, np.int64)
    reasons = [f"clip_score {value:.4g} < {minimum:g}"
               if minimum is not None and value < minimum else
               f"clip_score {value:.4g} < {cutoff:.4g}{label}" for value in scores[low].tolist()]
    return pa.table({ROWADDR: part[ROWADDR].take(pa.array(low)),
                     "clip_score_reason": pa.array(reasons, pa.string())})
