"""Reading a row's media back by its `uri` (a local file, a tar shard member or a URL),
checked against the hash taken at ingest. Shared by the hosting layer and export."""

from __future__ import annotations

import os
import threading

from curate.media.decode import (
    HttpOptions,
    MediaError,
    content_hash,
    list_tar,
    read_http,
    read_local,
    read_tar_member,
)

#: Largest video source read into memory (a URL or a tar member).
MAX_VIDEO_BYTES = 4_000_000_000


class MediaReader:
    """Reads bytes by uri; tar listings and local videos' hashes are cached by (path,
    mtime, size). Thread-safe."""

    def __init__(self, http: HttpOptions | None = None):
        self.http = http or HttpOptions(timeout_s=10, retries=1)
        self._tars: dict[tuple, dict[str, tuple[int, int]]] = {}
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _stat_key(path: str) -> tuple:
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise MediaError("missing", f"{path}: {exc.strerror or exc}") from None
        return (path, stat.st_mtime_ns, stat.st_size)

    def tar_member(self, path: str, member: str) -> tuple[int, int]:
        """(offset, size) of a member of a tar shard."""
        key = self._stat_key(path)
        with self._lock:
            members = self._tars.get(key)
        if members is None:
            try:
                members = {m.name: (m.offset_data, m.size) for m in list_tar(path)}
            except Exception as exc:  # tarfile raises many kinds for a damaged shard
                raise MediaError("unreadable", f"{path}: {exc}") from None
            with self._lock:
                self._tars[key] = members
        if member not in members:
            raise MediaError("missing", f"{path} has no member {member}")
        return members[member]

    def read(self, uri: str, max_bytes: int) -> bytes:
        """The bytes at `uri` (MediaError when they cannot be read or exceed max_bytes)."""
        if uri.startswith(("http://", "https://")):
            return read_http(uri, max_bytes, self.http)
        path, sep, member = uri.partition("#")
        if sep and path.lower().endswith(".tar"):
            offset, length = self.tar_member(path, member)
            return read_tar_member(path, member, offset, length, max_bytes)
        return read_local(uri, max_bytes)

    def read_checked(self, uri: str, size: int, expected_hash: str) -> bytes:
        """The bytes at `uri`, refused (MediaError `changed`) unless their sha256 is the one
        taken at ingest."""
        try:
            data = self.read(uri, size)
        except MediaError as exc:
            if exc.code != "too_large":
                raise
            raise MediaError("changed", f"{uri} changed since it was ingested (it is larger "
                             f"than the {size:,} bytes read then); run `curate run` again "
                             "to refresh the row") from None
        if content_hash(data) != expected_hash:
            raise MediaError("changed", f"{uri} changed since it was ingested (content "
                             "hash differs); run `curate run` again to refresh the row")
        return data

    def file_hash(self, path: str) -> str:
        """The sha256 of a local file, computed once per (path, mtime, size)."""
        from curate.media.video import file_hash

        key = self._stat_key(path)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            known = file_hash(path)[0]
            with self._lock:
                self._hashes[key] = known
        return known

    def video_source(self, uri: str, expected_hash: str):
        """A clip's source video as a `VideoSource`, refused (MediaError `changed`) unless
        it is the video hashed at ingest. Local files stream from disk."""
        from curate.media.video import VideoSource

        path, sep, _ = uri.partition("#")
        if uri.startswith(("http://", "https://")) or (sep and path.lower().endswith(".tar")):
            data = self.read(uri, MAX_VIDEO_BYTES)
            source, digest = VideoSource(data=data), content_hash(data)
        else:
            source, digest = VideoSource(uri), self.file_hash(uri)
        if digest != expected_hash:
            raise MediaError("changed", f"{uri} changed since it was ingested (content "
                             "hash differs); run `curate run` again to refresh the row")
        return source
