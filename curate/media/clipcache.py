"""Clips cut on demand for the hosting layer: a clip row references its source video by
time span; the first request encodes that span (H.264 MP4, or VP9 WebM for browsers
without H.264) into a cache directory, later ones read the file."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile

from curate.media.decode import MediaError
from curate.media.video import VideoSource, cut, frames

#: Longest side of a clip cut for the browser.
MAX_SIDE = 720
MIME = {"mp4": "video/mp4", "webm": "video/webm"}
CODEC = {"mp4": "h264", "webm": "vp9"}


class ClipCache:
    def __init__(self, directory: str | None = None, max_files: int = 512):
        self.directory = directory or os.path.join(tempfile.gettempdir(), "curate-clips")
        os.makedirs(self.directory, exist_ok=True)
        self.max_files = max_files

    def clip(self, source: VideoSource, source_hash: str, start_s: float, end_s: float,
             container: str, fps: float | None) -> str:
        """Path of the cached clip file, encoded now if it is not there yet."""
        name = hashlib.blake2b(f"{source_hash}:{start_s:.4f}:{end_s:.4f}:{MAX_SIDE}".encode(),
                               digest_size=12).hexdigest() + f".{container}"
        path = os.path.join(self.directory, name)
        if os.path.exists(path):
            return path
        fd, partial = tempfile.mkstemp(dir=self.directory, suffix=f".{container}.part")
        os.close(fd)
        try:
            cut(source, start_s, end_s, partial, CODEC[container], MAX_SIDE, fps)
            os.replace(partial, path)  # a reader never sees half a file
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        self._trim()
        return path

    def _trim(self) -> None:
        files = [os.path.join(self.directory, f) for f in os.listdir(self.directory)
                 if not f.endswith(".part")]
        if len(files) <= self.max_files:
            return
        files.sort(key=os.path.getmtime)
        for old in files[: len(files) - self.max_files]:
            try:
                os.unlink(old)
            except OSError:
                pass


def poster(source: VideoSource, at_s: float, size: int) -> bytes:
    """A JPEG of the frame at `at_s`, its longest side at most `size`."""
    for frame in frames(source, at_s):
        out = io.BytesIO()
        frame.image(size).save(out, "JPEG", quality=85)
        return out.getvalue()
    raise MediaError("empty_clip", f"no frame at {at_s:g} s")
