"""Reading a row's media back by its `uri` (a local file, a tar shard member, a URL or an
object in object storage), checked against the hash taken at ingest. Shared by the
hosting layer and export."""

from __future__ import annotations

import os
import threading

from curate.media import objstore
from curate.media.decode import (
    HttpOptions,
    MediaError,
    content_hash,
    list_tar,
    read_http,
    read_local,
)
from curate.media.video import VideoSource

#: Largest video source read into memory (a URL).
MAX_VIDEO_BYTES = 4_000_000_000


class MediaReader:
    """Reads bytes by uri; tar listings and videos' hashes are cached by (path, mtime,
    size), or (URI, version tag, size) for objects, read with `storage_options` (empty:
    the environment's credentials). Thread-safe."""

    def __init__(self, http: HttpOptions | None = None,
                 storage_options: dict[str, str] | None = None):
        self.http = http or HttpOptions(timeout_s=10, retries=1)
        self.options = dict(storage_options or {})
        self._tars: dict[tuple, dict[str, tuple[int, int]]] = {}
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def _version_key(self, path: str) -> tuple:
        """What names this version of a file or an object."""
        if objstore.is_object_uri(path):
            size, tag = objstore.head(path, self.options)
            return (path, tag, size)
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise MediaError("missing", f"{path}: {exc.strerror or exc}") from None
        return (path, stat.st_mtime_ns, stat.st_size)

    def _opened(self, path: str, offset: int = -1, size: int = -1) -> VideoSource:
        options = objstore.normalized(self.options) if objstore.is_object_uri(path) else ()
        return VideoSource(path, offset, size, options=options)

    def tar_member(self, path: str, member: str) -> tuple[int, int]:
        """(offset, size) of a member of a tar shard."""
        key = self._version_key(path)
        with self._lock:
            members = self._tars.get(key)
        if members is None:
            try:
                with objstore.open_file(path, self.options) as shard:
                    members = {m.name: (m.offset_data, m.size) for m in list_tar(shard)}
            except MediaError:
                raise
            except Exception as exc:  # tarfile raises many kinds for a damaged shard
                raise objstore.media_error(exc, "unreadable", f"{path}: {exc}") from None
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
            return objstore.read_member(path, member, offset, length, max_bytes, self.options)
        if objstore.is_object_uri(uri):
            return objstore.read(uri, self.options, max_bytes)
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

    def file_hash(self, source: VideoSource, key: tuple) -> str:
        """The sha256 of a local file or an object (or a member of either), computed once
        per version of it (`key`)."""
        from curate.media.video import file_hash

        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            try:
                known = file_hash(source, chunk=8 << 20)[0]
            except OSError as exc:
                raise objstore.media_error(exc, "unreadable", f"{source.path}: {exc}") \
                    from None
            with self._lock:
                self._hashes[key] = known
        return known

    def video_source(self, uri: str, expected_hash: str):
        """A clip's source video as a `VideoSource`, refused (MediaError `changed`) unless
        it is the video hashed at ingest. Local files and objects (and their tar members)
        are read in place; a URL is read into memory."""
        path, sep, member = uri.partition("#")
        if uri.startswith(("http://", "https://")):
            data = self.read(uri, MAX_VIDEO_BYTES)
            source, digest = VideoSource(data=data), content_hash(data)
        elif sep and path.lower().endswith(".tar"):
            offset, length = self.tar_member(path, member)
            source = self._opened(path, offset, length)
            digest = self.file_hash(source, (*self._version_key(path), offset, length))
        else:
            source = self._opened(uri)
            digest = self.file_hash(source, self._version_key(uri))
        if digest != expected_hash:
            raise MediaError("changed", f"{uri} changed since it was ingested (content "
                             "hash differs); run `curate run` again to refresh the row")
        return source
