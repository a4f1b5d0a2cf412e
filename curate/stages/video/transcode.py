"""transcode: each kept clip written as a video file of its own."""

from __future__ import annotations

import os
from typing import Literal

import pyarrow as pa
from pydantic import Field

from curate.media.clips import Clip
from curate.media.decode import MediaError
from curate.stage import RowStage, StageParams


class TranscodeParams(StageParams):
    directory: str = Field(description="where the clip files go (local; one file per clip, "
                           "named by sample_id)")
    codec: Literal["h264", "vp9"] = Field("h264", description="h264: MP4; vp9: WebM")
    max_side: int | None = Field(1080, ge=16, description="longest side of the clip files "
                                 "(None: the source's)")


class Transcode(RowStage):
    """Write each clip that earlier row filters kept as a video file of its own (H.264 MP4
    or VP9 WebM) under `directory`, as `clip_path`; clips stay references until then.
    Rows dropped later (dedup) keep their file: dedup runs after the row stages."""

    type = "transcode"
    Params = TranscodeParams
    params: TranscodeParams
    takes_clips = True
    skips_dropped = True
    local_path_params = ("directory",)

    def extras(self):
        return ("video",)  # PyAV, PySceneDetect, TransNetV2

    def reads(self) -> tuple[str, ...]:
        return ("sample_id", "fps")

    def writes(self) -> dict[str, pa.DataType]:
        return {"clip_path": pa.string(), "transcode_error": pa.string()}

    def needs_pixels(self) -> bool:
        return True  # it works on the clips in the pool that cuts them

    def process(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        from curate.media.video import cut

        p = self.params
        suffix = {"h264": ".mp4", "vp9": ".webm"}[p.codec]
        paths: list[str | None] = []
        errors: list[str | None] = []
        for sample_id, fps, clip in zip(batch["sample_id"].to_pylist(),
                                        batch["fps"].to_pylist(), images):
            if not isinstance(clip, Clip) or clip.source is None:
                paths.append(None)
                errors.append(None)
                continue
            folder = os.path.join(p.directory, sample_id[:2])
            path = os.path.join(folder, sample_id + suffix)
            try:
                if not os.path.exists(path):  # a resumed run keeps what is written
                    os.makedirs(folder, exist_ok=True)
                    partial = path + ".part"
                    cut(clip.source, clip.start_s, clip.end_s, partial, p.codec, p.max_side,
                        fps)
                    os.replace(partial, path)
                paths.append(path)
                errors.append(None)
            except (MediaError, OSError) as exc:
                paths.append(None)
                errors.append(f"transcode_failed: {exc}"[:500])
        return {"clip_path": pa.array(paths, pa.string()),
                "transcode_error": pa.array(errors, pa.string())}
