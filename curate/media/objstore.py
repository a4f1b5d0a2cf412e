"""Objects in object storage (`s3://`, `gs://`, `az://` URIs): listed page by page, read
whole, with errors a user can act on.

One library for curate's own object reads: obstore, on the Rust `object_store` crate that
Lance uses for the table, so a config's `storage_options` mean the same for media as for
the store (`aws_endpoint`, `aws_region`, `aws_access_key_id`, `aws_secret_access_key`,
`aws_session_token`, `allow_http`, `google_service_account`,
`azure_storage_account_name`, ...); without them the standard chains apply (environment,
web identity, container and instance credentials). Chosen over pyarrow.fs, whose listing
returns a whole prefix as one list (no pages), and over s3fs, which pins botocore away from
the boto3 the tests use and runs every request on one asyncio thread that holds the GIL;
`benchmarks/object_store.py` measures listing and small-object reads of each against
boto3's plain loop. Transient failures (5xx, throttling, resets) are retried by the
library with backoff.
"""

from __future__ import annotations

import functools
import io
import posixpath
import re
from collections.abc import Iterator
from datetime import timedelta

from curate.media.decode import MediaError, Window, read_tar_member

#: URI schemes read through an object store.
SCHEMES = ("s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://")
#: `storage_options` keys Lance reads itself, unknown to object_store: dropped, except
#: its retry settings, which mean the same here (`LANCE_RETRY`).
LANCE_ONLY = frozenset({"download_retry_count", "expires_at_millis", "use_opendal"})
LANCE_RETRY = {"client_max_retries": "max_retries", "client_retry_timeout": "retry_timeout_s"}
#: `storage_options` keys that set the HTTP client rather than the store.
CLIENT_KEYS = frozenset({"allow_http", "allow_invalid_certificates", "timeout",
                         "connect_timeout", "proxy_url", "pool_idle_timeout",
                         "http1_only", "http2_only", "user_agent"})
#: `storage_options` keys of curate's own for retries of transient failures (with
#: backoff): how many, and for how long in all (seconds).
RETRY_KEYS = frozenset({"max_retries", "retry_timeout_s"})
RETRY_DEFAULTS = {"max_retries": 10, "retry_timeout_s": 180.0}
#: The retries of a driver's first listing, which must fail fast on a wrong endpoint.
QUICK_RETRY = {"max_retries": "2", "retry_timeout_s": "15"}
#: Which store's keys each scheme takes (`anonymous` becomes `<store>_skip_signature`).
SIGNERS = {"s3": "aws", "s3a": "aws", "gs": "google", "az": "azure", "abfs": "azure",
           "abfss": "azure"}
TRUE = ("true", "1", "yes", "on")
#: Objects per listing page.
PAGE = 1000


def is_object_uri(uri: str) -> bool:
    return uri.startswith(SCHEMES)


def split_uri(uri: str) -> tuple[str, str]:
    """(`scheme://bucket`, key) of an object URI."""
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}", key


def joined(base: str, relative: str) -> str:
    """A key relative to a prefix (`s3://b/lists` + `../img/1.jpg` -> `s3://b/img/1.jpg`)."""
    root, key = split_uri(base)
    return f"{root}/{posixpath.normpath(posixpath.join(key, relative)).lstrip('/')}"


def normalized(options: dict | None) -> tuple[tuple[str, str], ...]:
    """`storage_options` as the stores are keyed: lower-case string keys and values,
    Lance's own keys dropped or mapped."""
    out = {}
    for key, value in (options or {}).items():
        key = str(key).lower()
        if key in LANCE_ONLY:
            continue
        out[LANCE_RETRY.get(key, key)] = str(value)
    return tuple(sorted(out.items()))


def check_options(options: dict | None) -> None:
    """Raise ValueError naming the option that cannot be used (a config check)."""
    given = dict(normalized(options))
    for key in RETRY_KEYS & set(given):
        try:
            value = float(given[key])
        except ValueError:
            raise ValueError(f"storage_options.{key} must be a number, not "
                             f"{given[key]!r}") from None
        if value < 0 or (key == "max_retries" and not value.is_integer()):
            raise ValueError(f"storage_options.{key} must be a whole number >= 0" if
                             key == "max_retries" else f"storage_options.{key} must be >= 0")


def checked(options: dict[str, str]) -> dict[str, str]:
    """`options`, checked (a validator of config fields that hold storage_options)."""
    check_options(options)
    return options


@functools.lru_cache(maxsize=64)
def _store(root: str, options: tuple[tuple[str, str], ...]):
    """One store per bucket and options, per process (it holds a connection pool;
    credentials it finds in the environment are read when it is made)."""
    from obstore.store import from_url

    config = {k: v for k, v in options if k not in CLIENT_KEYS and k not in RETRY_KEYS}
    client = {k: (v.lower() in TRUE if v.lower() in (*TRUE, "false", "0", "no", "off")
                  else v) for k, v in options if k in CLIENT_KEYS}
    if config.pop("anonymous", "false").lower() in TRUE:
        config[f"{SIGNERS[root.partition(':')[0]]}_skip_signature"] = "true"
    given = {**RETRY_DEFAULTS, **dict(options)}
    retry = {"max_retries": int(float(given["max_retries"])),
             "retry_timeout": timedelta(seconds=float(given["retry_timeout_s"]))}
    return from_url(root, config=config, client_options=client, retry_config=retry)


def store_of(uri: str, options: dict | None, quick: bool = False):
    """(the store holding `uri`, the object's key); `quick`: few retries (a check that
    must fail fast). A store that cannot be made is a MediaError."""
    root, key = split_uri(uri)
    given = dict(normalized(options))
    if quick:
        given.update(QUICK_RETRY)
    try:
        return _store(root, tuple(sorted(given.items()))), key
    except Exception as exc:  # an option the store refuses, a malformed URI
        raise MediaError("unreadable", f"{uri}: the object store cannot be opened with "
                         f"these storage_options: {str(exc).splitlines()[0][:300]}") from None


def error_of(uri: str, exc: Exception) -> MediaError:
    """What an object store's error means for `uri`, in one line: `missing`, `denied`,
    `unreachable` or `unreadable`."""
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    root, key = split_uri(uri)
    text = str(exc).replace(key, "") if key else str(exc)  # a key may hold any word
    if "NoSuchBucket" in text:  # a listing says so in a generic error
        return MediaError("missing", f"{uri}: there is no bucket {root}; check its name "
                          "and the endpoint")
    if isinstance(exc, FileNotFoundError):
        return MediaError("missing", f"{uri}: no such object")
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or \
            "403 Forbidden" in text or "AccessDenied" in text:
        return MediaError("denied", f"{uri}: access denied; check the keys (storage_options "
                          "or the environment) and the policy on this prefix")
    if "error sending request" in text or "onnection refused" in text:
        return MediaError("unreachable", f"{uri}: the object store cannot be reached; check "
                          "the endpoint (aws_endpoint) and the network")
    failing = re.search(r"status code: (5\d\d[^:]*)", text)
    if failing:  # throttling or a server error, still there after the retries
        tries = re.search(r"after (\d+) retries", text)
        return MediaError("unavailable", f"{uri}: the object store kept answering "
                          f"{failing.group(1).strip()}"
                          f"{f' through {tries.group(1)} retries' if tries else ''}; the "
                          "next run reads it again (storage_options max_retries and "
                          "retry_timeout_s wait longer)")
    first = text.splitlines()[0] if text else type(exc).__name__
    return MediaError("unreadable", f"{uri}: {first[:300]}")


def read(uri: str, options: dict | None, max_bytes: int) -> bytes:
    """An object's bytes; one larger than `max_bytes` is refused before its body is read."""
    import obstore

    store, key = store_of(uri, options)
    try:
        result = obstore.get(store, key)
        size = result.meta["size"]
        if size > max_bytes:
            raise MediaError("too_large", f"{size} bytes > max_bytes {max_bytes}")
        return result.bytes().to_bytes()
    except MediaError:
        raise
    except Exception as exc:  # what obstore raises on this object or its store
        raise error_of(uri, exc) from None


def read_ahead(uris: list[str], options: dict | None, max_bytes: int,
               ahead: int = 8) -> Iterator:
    """Futures of the objects' bytes (`read`), in order, with up to `ahead` of them read
    at once on threads (a GET lets go of the GIL while it waits on the store). A
    future's `result()` raises the MediaError of its object; the iterator itself never
    raises."""
    from concurrent.futures import ThreadPoolExecutor

    if not uris:
        return
    pool = ThreadPoolExecutor(max_workers=min(ahead, len(uris)),
                              thread_name_prefix="curate-read")
    try:
        pending = [pool.submit(read, uri, options, max_bytes) for uri in uris[:ahead]]
        for k in range(len(uris)):
            if k + ahead < len(uris):
                pending.append(pool.submit(read, uris[k + ahead], options, max_bytes))
            yield pending[k]
            pending[k] = None  # its bytes go with the row that took them
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def read_head(uri: str, options: dict | None, quick: bool = False) -> int:
    """An object's size (it is there and may be read)."""
    return head(uri, options, quick)[0]


def head(uri: str, options: dict | None, quick: bool = False) -> tuple[int, str]:
    """(size, version tag) of an object: the tag (its ETag, or its modification time where
    the store gives none) changes whenever the object is written again."""
    import obstore

    store, key = store_of(uri, options, quick)
    try:
        meta = obstore.head(store, key)
    except Exception as exc:
        raise error_of(uri, exc) from None
    return meta["size"], _tag(meta)


def download(uri: str, options: dict | None, path: str, tag: str | None = None) -> None:
    """The object, streamed into the local file `path` (never held whole); refused when
    its version tag is no longer `tag` (it was written again since it was listed)."""
    import obstore

    store, key = store_of(uri, options)
    try:
        result = obstore.get(store, key)
        if tag is not None and _tag(result.meta) != tag:
            raise MediaError("changed", f"{uri} was written again since it was listed; "
                             "run again")
        with open(path, "wb") as out:
            for chunk in result.stream(min_chunk_size=8 << 20):
                out.write(chunk)
    except MediaError:
        raise
    except Exception as exc:  # what obstore raises on this object or its store
        raise error_of(uri, exc) from None


def read_range(uri: str, options: dict | None, offset: int, size: int) -> bytes:
    """`size` bytes of an object from `offset` (one range request): a tar member."""
    import obstore

    store, key = store_of(uri, options)
    if size == 0:
        return b""
    try:
        data = obstore.get_range(store, key, start=offset, length=size)
    except Exception as exc:
        raise error_of(uri, exc) from None
    if len(data) != size:
        raise MediaError("truncated", f"{uri} ends early ({len(data)}/{size} bytes from "
                         f"{offset})")
    return bytes(data)


def read_member(shard: str, member: str, offset: int, size: int, max_bytes: int,
                options: dict | None = None) -> bytes:
    """Bytes of one tar member, located by the offset found when the shard was listed:
    from a local shard, or as one range of a shard in object storage."""
    if not is_object_uri(shard):
        return read_tar_member(shard, member, offset, size, max_bytes)
    if size > max_bytes:
        raise MediaError("too_large", f"{size:,} bytes > max_bytes {max_bytes:,}")
    return read_range(shard, options, offset, size)


class StoreError(OSError):
    """A read or write of an object that failed midway (after the store's retries), as
    the file objects PyAV, tarfile and writers use raise it; `error` says why, with its
    code."""

    def __init__(self, error: MediaError):
        super().__init__(error.detail)
        self.error = error


def media_error(exc: BaseException, code: str, detail: str) -> MediaError:
    """The MediaError an object read raised inside `exc`'s chain, or MediaError(code,
    detail): what a reader that caught an OSError from a file object should record."""
    while exc is not None:
        if isinstance(exc, StoreError):
            return exc.error
        exc = exc.__cause__ or exc.__context__
    return MediaError(code, detail)


class ObjectFile(Window):
    """A read-only, seekable file over an object (or over `size` bytes of it from
    `offset`: a tar member), read with range requests of at least `buffer` bytes, so
    PyAV and tarfile read an object in place: a video is never downloaded whole, nor
    held in memory. A failed read raises `StoreError`.

    It keeps its own buffer, the last range it fetched: obstore's buffered reader drops
    its buffer on every seek, and tarfile and PyAV seek between small reads (a tar
    header every few KB), which would make each of them a request of `buffer` bytes."""

    def __init__(self, uri: str, options: dict | None, offset: int = 0, size: int = -1,
                 buffer: int = 1 << 20):
        store, key = store_of(uri, options)
        if size < 0:
            size = head(uri, options)[0] - offset
        super().__init__(offset, size)
        self.uri, self._store, self._key, self._block = uri, store, key, buffer
        self._held, self._held_at = memoryview(b""), 0

    def _read_at(self, offset: int, size: int):
        held_from = offset - self._held_at
        if not 0 <= held_from <= len(self._held) - size:
            import obstore

            length = min(max(size, self._block), self._offset + self._size - offset)
            try:
                data = obstore.get_range(self._store, self._key, start=offset, length=length)
            except Exception as exc:  # what obstore raises mid-object (after its retries)
                raise StoreError(error_of(self.uri, exc)) from None
            self._held, self._held_at, held_from = memoryview(data), offset, 0
        return self._held[held_from:held_from + size]

    def close(self) -> None:
        self._held = memoryview(b"")
        super().close()


class ObjectWriter(io.RawIOBase):
    """A write-only file that becomes an object when closed: parts of `buffer` bytes are
    uploaded as they fill (a multipart upload, several parts at once), so a large shard
    is never held whole; a small one is one PUT. `tell` counts the bytes written."""

    def __init__(self, uri: str, options: dict | None, buffer: int = 16 << 20):
        import obstore

        super().__init__()
        self.uri, self.written = uri, 0
        store, key = store_of(uri, options)
        try:
            self._file = obstore.open_writer(store, key, buffer_size=buffer)
        except Exception as exc:
            raise error_of(uri, exc) from None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        try:
            self._file.write(data)
        except Exception as exc:
            raise StoreError(error_of(self.uri, exc)) from None
        self.written += size
        return size

    def tell(self) -> int:
        return self.written

    def close(self) -> None:
        """Finish the upload: the object appears whole."""
        if not self.closed:
            try:
                self._file.close()
            except Exception as exc:
                raise StoreError(error_of(self.uri, exc)) from None
            finally:
                super().close()

    def abort(self) -> None:
        """Give the upload up: no object appears (uploaded parts are deleted)."""
        if not self.closed:
            try:
                self._file.__exit__(OSError, OSError("aborted"), None)
            except Exception:  # an abort that fails leaves parts the bucket's rules clean
                pass
            finally:
                super().close()

    def __del__(self) -> None:
        # a writer dropped unclosed (its task failed) must not publish half an object,
        # as io's own finalizer would by calling close()
        self.abort()


def put(uri: str, options: dict | None, data: bytes) -> None:
    """An object written whole (one request: it appears complete or not at all)."""
    import obstore

    store, key = store_of(uri, options)
    try:
        obstore.put(store, key, data)
    except Exception as exc:
        raise error_of(uri, exc) from None


def delete(uri: str, options: dict | None) -> None:
    import obstore

    store, key = store_of(uri, options)
    try:
        obstore.delete(store, key)
    except Exception as exc:
        raise error_of(uri, exc) from None


def rename(source: str, target: str, options: dict | None) -> None:
    """An object moved to another key of its bucket (a copy in the store, then a delete:
    its bytes do not pass through this process)."""
    import obstore

    store, key = store_of(source, options)
    try:
        obstore.rename(store, key, split_uri(target)[1])
    except Exception as exc:
        raise error_of(source, exc) from None


def open_file(path: str, options: dict | None):
    """A seekable binary file: a local path opened, or an object read by ranges."""
    if is_object_uri(path):
        return ObjectFile(path, options)
    return open(path, "rb")


def _no_markers(items):
    """Objects without the empty "folder" markers consoles write (`photos/`, which the
    store lists as an empty object `photos` before `photos/...`)."""
    held = None
    for item in items:
        path, size = item[0], item[1]
        if held is not None and not path.startswith(held[0] + "/"):
            yield held
        held = None
        if size == 0:
            held = item
        else:
            yield item
    if held is not None:
        yield held


def _tag(meta) -> str:
    """An object's version tag: its ETag (without quotes: Azure lists them bare and sends
    them quoted), or its version or modification time where the store gives none; it
    changes whenever the object is written again."""
    tag = meta.get("e_tag") or meta.get("version") or meta["last_modified"].isoformat()
    return str(tag).strip('"')


def list_pages(prefix: str, options: dict | None, page: int = PAGE, quick: bool = False,
               tags: bool = False) -> Iterator[list[tuple]]:
    """The objects under `prefix` (whole path segments: `s3://b/photos` holds
    `s3://b/photos/x.jpg`, not `s3://b/photos2/y.jpg`) as pages of (URI, size), or of
    (URI, size, version tag) with `tags`, in key order; never the whole listing at once.
    Folder markers are left out."""
    import obstore

    store, key = store_of(prefix, options, quick)
    root = split_uri(prefix)[0]
    base = key.rstrip("/")

    def listed():
        for found in obstore.list(store, base or None, chunk_size=page):
            yield [(f"{root}/{m['path']}", m["size"], *((_tag(m),) if tags else ()))
                   for m in found if m["path"] != base]

    try:
        out: list[tuple[str, int]] = []
        for item in _no_markers(entry for found in listed() for entry in found):
            out.append(item)
            if len(out) >= page:
                yield out
                out = []
        if out:
            yield out
    except Exception as exc:  # the listing failed: the whole prefix is unreadable
        raise error_of(prefix, exc) from None


#: Greater than every key that starts with a given prefix: the largest character UTF-8
#: encodes (stores order keys by their UTF-8 bytes).
_LAST = "\U0010ffff"


def _level(store, base: str, after: str | None = None, last: str | None = None):
    """("object", key, size) and ("prefix", key) for what lies right under `base`, in key
    order, from after `after` up to `last` (keys), never the whole level at once. A
    prefix's keys are skipped by listing again from past them: one request on S3 and GCS,
    which start a listing at a key; Azure's listing starts at the prefix's first key and
    object_store skips to the offset on the client. (obstore's `list_with_delimiter`
    gathers the whole level in one list, so it cannot be used for a level of millions.)
    Folder markers (an empty `photos` before `photos/...`) are left out."""
    import obstore

    lead = f"{base}/" if base else ""
    offset = after
    held = None  # an empty object, a marker if its folder follows
    while True:
        skipped = None
        for found in obstore.list(store, base or None, offset=offset, chunk_size=PAGE):
            for meta in found:
                path = meta["path"]
                if path == base:
                    continue
                if held is not None and path.startswith(held[1] + "/"):
                    held = None  # an empty `x` before `x/...`: the folder's marker
                if last is not None and path > last:
                    break
                name = path[len(lead):]
                if "/" in name:
                    skipped = name.split("/", 1)[0]
                    break
                if held is not None:
                    yield held
                held = ("object", path, meta["size"]) if meta["size"] == 0 else None
                if held is None:
                    yield "object", path, meta["size"]
            else:
                continue
            break
        if skipped is None:
            break
        if held is not None:  # not the folder's marker: those are dropped above
            yield held
        held = None
        yield "prefix", lead + skipped
        moved = f"{lead}{skipped}/{_LAST}"
        if offset is not None and moved <= offset:  # a key past every key: nothing after
            break
        offset = moved
    if held is not None:
        yield held


def walk_level(prefix: str, options: dict | None, chunk: int, quick: bool = False
               ) -> Iterator[tuple]:
    """What a driver splits a prefix's listing into, holding none of its keys: ("prefix",
    URI) for each prefix one level down, and ("objects", after, last) for each run of up
    to `chunk` objects right under it (`list_run` lists one; `after` is None for the
    first). Folder markers are left out."""
    store, key = store_of(prefix, options, quick)
    root = split_uri(prefix)[0]
    after = latest = None
    count = 0
    try:
        for kind, path, *_ in _level(store, key.rstrip("/")):
            if kind == "prefix":
                yield "prefix", f"{root}/{path}"
                continue
            count, latest = count + 1, path
            if count == chunk:
                yield "objects", after, path
                after, count = path, 0
        if count:
            yield "objects", after, latest
    except Exception as exc:  # the listing failed: the whole prefix is unreadable
        raise error_of(prefix, exc) from None


def list_run(prefix: str, options: dict | None, after: str | None = None,
             last: str | None = None, quick: bool = False
             ) -> Iterator[list[tuple[str, int]]]:
    """Pages of (URI, size) of the objects right under `prefix` (keys after `after` up to
    `last`, where given: one run of `walk_level`)."""
    store, key = store_of(prefix, options, quick)
    root = split_uri(prefix)[0]
    try:
        out: list[tuple[str, int]] = []
        for kind, path, *size in _level(store, key.rstrip("/"), after, last):
            if kind == "object":
                out.append((f"{root}/{path}", size[0]))
                if len(out) >= PAGE:
                    yield out
                    out = []
        if out:
            yield out
    except Exception as exc:
        raise error_of(prefix, exc) from None
