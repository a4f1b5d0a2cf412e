"""motion_score: how much each clip moves, with a minimum and a maximum."""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from curate.stage import ScoreFilter, StageParams, Threshold


class MotionParams(StageParams):
    min_score: float | None = Field(None, ge=0, description="drop clips moving less than this "
                                    "(static slideshows); mean change per frame, 0-255")
    max_score: float | None = Field(None, ge=0, description="drop clips moving more than this "
                                    "(shaky footage, flashes)")


class MotionScore(ScoreFilter):
    """Motion of each clip as `motion_score`: the mean absolute change between consecutive
    frames, on grey frames 64 px wide, over every frame of the clip (measured by
    split_clips while it decodes, so it costs no second decode)."""

    type = "motion_score"
    Params = MotionParams
    params: MotionParams
    verdict_column = "motion_reason"
    threshold_params = ("min_score", "max_score")
    takes_clips = True

    def reads(self) -> tuple[str, ...]:
        return ("motion",)

    def writes(self) -> dict[str, pa.DataType]:
        return {"motion_score": pa.float32(), "motion_reason": pa.string()}

    def score(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        import numpy as np

        values = batch["motion"].to_numpy(zero_copy_only=False).astype(np.float32)
        return {"motion_score": pa.array(values, pa.float32(), mask=np.isnan(values))}

    def thresholds(self):
        return [Threshold("motion_score", "motion", self.params.min_score,
                          self.params.max_score)]
