"""Safe probing, streaming decoding and cutting of videos with PyAV (FFmpeg inside).

Every container is opened in a `with` block, so it is closed on every path, errors
included. Decoding streams frame by frame: nothing here holds more than a few frames, so
memory does not grow with a video's length. Failures are `MediaError`s, as for images.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

from curate.media import objstore
from curate.media.decode import MediaError, Window
from curate.media.objstore import media_error as failed

#: WebDataset members and file suffixes that hold a video.
VIDEO_SUFFIXES = ("mp4", "webm", "mkv", "mov", "avi", "m4v")


def _av():
    try:
        import av
    except ImportError:
        raise MediaError("unsupported", "video needs PyAV: pip install 'curate[video]'") from None
    # PyAV's default drops FFmpeg's log lines (failures raise instead). A log level would
    # route every line through a Python callback, which can deadlock FFmpeg's threads
    # against the GIL in a threaded server: leave it unset.
    return av


class TarMember(Window):
    """A read-only, seekable view of one member of a tar file (PyAV reads it in place)."""

    def __init__(self, path: str, offset: int, size: int):
        super().__init__(offset, size)
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())

    def _read_at(self, offset: int, size: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(size)

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass(frozen=True)
class VideoSource:
    """Where a video's bytes are: a local path, a tar member (`offset`, `size`), bytes in
    memory (a URL), or an object in object storage (`path` is its URI, `options` the
    store's storage_options), read in place by range requests."""

    path: str | None = None
    offset: int = -1
    size: int = -1
    data: bytes | None = None
    options: tuple[tuple[str, str], ...] = ()

    def open(self):
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.path is not None and objstore.is_object_uri(self.path):
            return objstore.ObjectFile(self.path, dict(self.options), max(self.offset, 0),
                                       self.size)
        if self.offset >= 0:
            return TarMember(self.path, self.offset, self.size)
        return self.path


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    num_frames: int
    codec: str
    width: int
    height: int
    bitrate: int | None
    has_audio: bool


def _open(av, source: VideoSource):
    try:
        return av.open(source.open(), mode="r")
    except MediaError:  # an object that cannot be opened says why itself
        raise
    except FileNotFoundError as exc:
        raise MediaError("missing", f"no such file: {exc.filename}") from None
    except av.FFmpegError as exc:
        try:
            head = _head(source)
        except OSError:
            head = b""
        if head[4:8] == b"ftyp":
            raise MediaError("truncated", "an MP4/MOV file without its index (moov box): "
                             "the file was cut off") from None
        raise MediaError("not_a_video", f"FFmpeg cannot open it: {_why(exc)}") from None
    except OSError as exc:
        raise failed(exc, "unreadable", str(exc)) from None
    except Exception as exc:  # whatever else PyAV raises on these bytes
        raise MediaError("not_a_video", f"PyAV cannot open it: {_why(exc)}") from None


def _head(source: VideoSource, size: int = 16) -> bytes:
    opened = source.open()
    if isinstance(opened, str):
        with open(opened, "rb") as fh:
            return fh.read(size)
    with opened:
        return opened.read(size)


def _why(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split("; last error log:")[0].strip()


def probe(source: VideoSource, max_duration_s: float | None = None) -> VideoInfo:
    """The video stream's facts; checks the first frame decodes (a codec FFmpeg lacks or a
    damaged start fails here, not later)."""
    av = _av()
    with _open(av, source) as container:
        try:
            return _probe(av, container, max_duration_s)
        except MediaError:
            raise
        except Exception as exc:  # whatever PyAV raises on these bytes
            raise failed(exc, "undecodable", f"the video stream cannot be read: {_why(exc)}") \
                from None


def _probe(av, container, max_duration_s: float | None) -> VideoInfo:
    if not container.streams.video:
        raise MediaError("no_video_stream", "the file holds no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    frames = int(stream.frames or round(duration * fps))
    if fps <= 0 or frames <= 0:
        raise MediaError("zero_frames", "the video stream has no frames")
    if max_duration_s is not None and duration > max_duration_s:
        raise MediaError("too_long", f"{duration:.1f} s is over max_duration_s "
                         f"{max_duration_s:g}")
    codec = stream.codec_context.name
    try:
        first = next(container.decode(stream), None)
    except Exception as exc:  # FFmpeg errors and anything else PyAV raises
        raise failed(exc, "undecodable", f"{codec} stream does not decode: {_why(exc)}") \
            from None
    if first is None:
        raise MediaError("zero_frames", "no frame of the video stream decodes")
    return VideoInfo(
        duration_s=duration, fps=fps, num_frames=frames, codec=codec,
        width=int(stream.codec_context.width or first.width),
        height=int(stream.codec_context.height or first.height),
        bitrate=int(container.bit_rate) if container.bit_rate else None,
        has_audio=bool(container.streams.audio),
    )


@dataclass
class Frame:
    """One decoded frame: its position, its presentation time and the frame itself
    (converted on demand).

    `index` counts the frames read, in presentation order, from 0 at the first one read.
    `time_s` is the frame's own timestamp, in seconds from the video stream's start (its
    `start_time`, which an MP4 edit list moves), so variable frame rates and edit lists
    give the frame's true time; `pts` is that time in units of `time_base`."""

    index: int
    time_s: float
    raw: object  # av.VideoFrame
    pts: int = 0
    time_base: Fraction = Fraction(1, 1000)
    #: When the frame stops showing (seconds): its time plus its own duration (or one
    #: frame at the nominal rate).
    end_s: float = 0.0

    def reformat(self, width: int, height: int, format: str):
        """The frame scaled and converted by FFmpeg (swscale), as a PyAV frame."""
        try:
            return self.raw.reformat(width=width, height=height, format=format)
        except Exception as exc:  # whatever PyAV raises on this frame's data
            raise MediaError("undecodable", f"frame {self.index} ({self.time_s:.3f} s) cannot "
                             f"be converted to {format} pixels: {_why(exc)}") from None

    def array(self, width: int, height: int, format: str = "rgb24") -> np.ndarray:
        """The frame scaled by FFmpeg (swscale) to width x height, as uint8 pixels."""
        return self.reformat(width, height, format).to_ndarray()

    def image(self, max_side: int | None) -> Image.Image:
        w, h = self.raw.width, self.raw.height
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
        return Image.fromarray(self.array(w, h))


def frames(source: VideoSource, start_s: float = 0.0) -> Iterator[Frame]:
    """Every frame of the first video stream in order, from `start_s` (seeked to the key
    frame before it), each with its time from its own timestamp. This is the one frame
    reader: shot detection, sampling, posters and cutting all read through it. The
    container is closed when the iteration ends or is abandoned.

    Times never go back: a frame without a timestamp gets the previous frame's time plus
    that frame's duration, one stamped earlier than the frame before it (or than the
    stream's start) gets that frame's time. Anything PyAV raises on the file's bytes is a
    MediaError."""
    av = _av()
    with _open(av, source) as container:
        try:
            if not container.streams.video:
                raise MediaError("no_video_stream", "the file holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            step = Fraction(1, 25) if not rate or rate <= 0 else 1 / Fraction(rate)
            stream_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 1000)
            start_pts = stream.start_time or 0
            start = start_pts * stream_base  # seconds
            if start_s > 0:
                container.seek(int(start_s / stream_base) + start_pts, stream=stream,
                               backward=True)
            decoded = container.decode(stream)
        except MediaError:
            raise
        except Exception as exc:
            raise failed(exc, "undecodable", f"the video stream cannot be read: {_why(exc)}") \
                from None
        index = 0
        previous: Fraction | None = None  # time of the frame before, seconds from start
        previous_step = step
        while True:
            try:
                frame = next(decoded, None)
                if frame is None:
                    break
                base = Fraction(frame.time_base) if frame.time_base else stream_base
                stamp = frame.pts if frame.pts is not None else frame.dts
                duration = frame.duration * base if frame.duration else step
            except Exception as exc:  # FFmpeg errors and anything else PyAV raises
                at = f"{float(previous):.3f} s" if previous is not None else "the start"
                raise failed(exc, "undecodable", f"decoding stopped at frame {index} (after "
                             f"{at}): {_why(exc)}") from None
            if stamp is not None:
                time = max(stamp * base - start, previous or Fraction(0))
            elif previous is None:
                time = Fraction(0)
            else:
                time = previous + previous_step
            previous, previous_step = time, duration
            time_s = float(time)
            if time_s + 1e-6 >= start_s:
                yield Frame(index, time_s, frame, round(time / base), base,
                            float(time + duration))
                index += 1


def cut(source: VideoSource, start_s: float, end_s: float, out, codec: str = "h264",
        max_side: int | None = None, fps: float | None = None) -> None:
    """Encode the frames in [start_s, end_s) as a new video into `out` (a path or a file
    object): H.264 in MP4 (`h264`) or VP9 in WebM (`vp9`), without audio. Each frame keeps
    its own time (from `start_s` on), so a variable-frame-rate span plays as it did."""
    av = _av()
    container_format, encoder, pix = {"h264": ("mp4", "libx264", "yuv420p"),
                                      "vp9": ("webm", "libvpx-vp9", "yuv420p")}[codec]
    # faststart: the index first, so a browser starts playing before the last byte
    options = {"movflags": "+faststart"} if container_format == "mp4" else {}
    time_base = Fraction(1, 90000)  # fine enough for any frame's own time
    with av.open(out, mode="w", format=container_format, options=options) as output:
        stream = None
        last_pts = -1
        first_s = 0.0
        for frame in frames(source, start_s):
            if frame.time_s >= end_s:
                break
            if stream is None:
                w, h = frame.raw.width, frame.raw.height
                if max_side and max(w, h) > max_side:
                    scale = max_side / max(w, h)
                    w, h = round(w * scale), round(h * scale)
                w, h = max(2, w - w % 2), max(2, h - h % 2)  # 4:2:0 wants even sizes
                rate = Fraction(fps or 25).limit_denominator(1001)
                stream = output.add_stream(encoder, rate=rate)
                stream.codec_context.time_base = time_base
                stream.width, stream.height, stream.pix_fmt = w, h, pix
                if encoder == "libx264":
                    stream.options = {"preset": "veryfast", "crf": "23"}
                else:
                    stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "32",
                                      "b": "0"}
                first_s = frame.time_s
            image = frame.reformat(stream.width, stream.height, pix)
            # the frame's own time from the clip's first frame; strictly increasing
            last_pts = max(last_pts + 1, round((frame.time_s - first_s) / time_base))
            image.pts, image.time_base = last_pts, time_base
            for packet in stream.encode(image):
                output.mux(packet)
        if stream is None:
            raise MediaError("empty_clip", f"no frames between {start_s:g} s and {end_s:g} s")
        for packet in stream.encode():
            output.mux(packet)


def write_video(path: str, frames_rgb, fps: int = 24, codec: str = "libx264",
                crf: int = 20, times_s=None) -> None:
    """Encode RGB uint8 frames (an iterable of h x w x 3 arrays) as a video file. With
    `times_s` (each frame's presentation time in seconds, increasing; kept to the
    millisecond) the frame rate is variable; an MP4 whose first time is not 0 starts after
    that delay (an edit list)."""
    av = _av()
    with av.open(path, mode="w") as output:
        stream = None
        times = iter(times_s) if times_s is not None else None
        for pixels in frames_rgb:
            if stream is None:
                stream = output.add_stream(codec, rate=fps)
                stream.height, stream.width = pixels.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "veryfast"}
                if times is not None:
                    stream.codec_context.time_base = Fraction(1, 1000)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(next(times) * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                output.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                output.mux(packet)


def file_hash(source: str | VideoSource, chunk: int = 1 << 20) -> tuple[str, int]:
    """(content hash, size) of a file, or of the bytes a VideoSource names (a tar member),
    read in chunks (videos are not read whole)."""
    import hashlib

    digest = hashlib.sha256()  # the same hash as an image's content_hash
    size = 0
    opened = source.open() if isinstance(source, VideoSource) else source
    with open(opened, "rb") if isinstance(opened, str) else opened as fh:
        while block := fh.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def exists(path: str) -> bool:
    return os.path.isfile(path)
