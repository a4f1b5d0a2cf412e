"""ingest_videos: one row per input video, probed (duration, fps, frames, codec, ...)."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

import pyarrow as pa
from pydantic import Field

from curate.media import objstore
from curate.media.decode import HttpOptions, MediaError, file_size, read_http
from curate.media.video import VIDEO_SUFFIXES, VideoInfo, VideoSource, file_hash, probe
from curate.stage import ObjectStoreParams, Resources
from curate.stages._common import CAPTION_COLUMNS, _is_url
from curate.stages.image.ingest_images import (
    IngestImages,
    listed_again,
    unread_reasons,
)


class IngestVideosParams(ObjectStoreParams):
    paths: list[str] = Field(
        min_length=1,
        description="files, directories (recursive), globs, manifests (.parquet/.csv/.jsonl "
        "with a uri column), WebDataset .tar shards (.mp4/.webm/.mkv/.mov members), "
        "http(s) URLs, or objects and prefixes in object storage (s3://bucket/prefix/, "
        "gs://, az://; read in place by range requests)",
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


class IngestVideos(IngestImages):
    """Probe every input video into one row: duration, fps, frames, codec, size, bitrate,
    audio, content hash, or an error."""

    type = "ingest_videos"
    Params = IngestVideosParams
    params: IngestVideosParams
    member_suffixes = VIDEO_SUFFIXES
    media_kind = "video"

    def extras(self):
        return ("video",)  # PyAV, PySceneDetect, TransNetV2

    @property
    def reloads_rows(self) -> bool:
        return False  # a row is a clip (split_clips reads it again) or a failed video

    def reload(self, rows: pa.Table) -> tuple[list, list[str | None]]:
        raise NotImplementedError("a video's rows are clips: split_clips reads them again")

    @property
    def reopens_videos(self) -> bool:
        """Whether `reopen` finds a stored row's video as `load` read it (a subclass that
        loads otherwise must say how to open a video again)."""
        return type(self).load is IngestVideos.load

    def reopen(self, rows: pa.Table) -> tuple[list, list[str | None]]:
        """Worker side: the video of each stored row (a clip: its `source_hash` names the
        bytes it was cut from), opened and probed again, each input once however many of
        its rows are here; and why a row's video cannot be read again (None where it
        can, or where the row has an error)."""
        uris, had = rows["uri"].to_pylist(), rows["error"].to_pylist()
        first: dict[str, int] = {}
        for i, uri in enumerate(uris):
            if not had[i]:
                first.setdefault(uri, i)
        n = rows.num_rows
        if not first:
            return [None] * n, [None] * n
        inputs = rows.select(["input_id", "uri"]).take(pa.array(list(first.values()),
                                                                  pa.int64()))
        inputs = inputs.append_column("error", pa.nulls(inputs.num_rows, pa.string()))
        items = listed_again(inputs, self.params.storage_options)
        loaded, media = self.load(items.append_column("alt_text", pa.nulls(items.num_rows,
                                                                           pa.string())))
        slot = {uri: k for k, uri in enumerate(first)}  # each input's place in `loaded`
        errors, hashes = loaded["error"].to_pylist(), loaded["content_hash"].to_pylist()
        unread = unread_reasons(had, [errors[slot[u]] if u in slot else None for u in uris],
                                rows["source_hash"].to_pylist(),
                                [hashes[slot[u]] if u in slot else None for u in uris])
        videos = [None if had[i] or unread[i] else media[slot[u]] for i, u in enumerate(uris)]
        return videos, unread

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
                source, digest, size = _source(uri, offsets[i], sizes[i], p.max_bytes, http,
                                               p.storage_options)
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


def _source(uri: str, offset: int, size: int, max_bytes: int, http: HttpOptions,
            options: dict | None = None) -> tuple[VideoSource, str, int]:
    """Where to read a video, its content hash and size. Local files, tar members and
    objects are read in place (hashed in chunks, an object streamed by ranges); a URL's
    bytes are held in memory, up to max_bytes."""
    if _is_url(uri):
        data = read_http(uri, max_bytes, http)
        return VideoSource(data=data), hashlib.sha256(data).hexdigest(), len(data)
    path = uri.partition("#")[0] if offset >= 0 else uri
    if objstore.is_object_uri(path):
        whole, tag = objstore.head(path, options)
        if offset < 0:
            size = whole
        if size > max_bytes:
            raise MediaError("too_large", f"{size} bytes > max_bytes {max_bytes}")
        source = VideoSource(path, offset, size, options=objstore.normalized(options))
        try:
            digest = _object_hash(source, tag)
        except OSError as exc:  # a read failed midway, after the store's retries
            raise objstore.media_error(exc, "unreadable", f"{uri}: {exc}") from None
        return source, digest, size
    if offset >= 0:
        if size > max_bytes:
            raise MediaError("too_large", f"{size} bytes > max_bytes {max_bytes}")
        try:
            stat = os.stat(path)
            digest = _member_hash(path, offset, size, stat.st_mtime_ns)
        except OSError as exc:
            raise MediaError("unreadable", f"{uri}: {exc.strerror or exc}") from None
        return VideoSource(path, offset, size), digest, size
    on_disk = file_size(uri)
    if on_disk > max_bytes:
        raise MediaError("too_large", f"{on_disk} bytes > max_bytes {max_bytes}")
    try:
        stat = os.stat(uri)
        digest, read = _file_hash(uri, stat.st_mtime_ns, stat.st_size)
    except OSError as exc:
        raise MediaError("unreadable", f"{uri}: {exc.strerror or exc}") from None
    return VideoSource(uri), digest, read


@functools.lru_cache(maxsize=64)
def _member_hash(path: str, offset: int, size: int, mtime_ns: int) -> str:
    """A tar member's hash, read once per process while its shard is unchanged."""
    return file_hash(VideoSource(path, offset, size))[0]


@functools.lru_cache(maxsize=64)
def _object_hash(source: VideoSource, tag: str) -> str:
    """An object's (or a member of a shard in object storage) hash, streamed once per
    process while the object keeps its version tag; one written again while it was read
    is refused (and nothing is cached)."""
    digest = file_hash(source, chunk=8 << 20)[0]
    if objstore.head(source.path, dict(source.options))[1] != tag:
        raise MediaError("changed", f"{source.path} was written again while it was read; "
                         "the next run reads it again")
    return digest


@functools.lru_cache(maxsize=16)
def _file_hash(path: str, mtime_ns: int, size: int) -> tuple[str, int]:
    """A local video's hash, read once per process while the file is unchanged (the clips
    of one video that a stage computes again come in several batches)."""
    return file_hash(path)
