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
from collections.abc import Iterator
from datetime import timedelta

from curate.media.decode import MediaError

#: URI schemes read through an object store.
SCHEMES = ("s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://")
#: `storage_options` keys Lance reads itself, unknown to object_store.
LANCE_ONLY = frozenset({"client_max_retries", "client_retry_timeout", "download_retry_count",
                        "expires_at_millis", "use_opendal"})
#: `storage_options` keys that set the HTTP client rather than the store.
CLIENT_KEYS = frozenset({"allow_http", "allow_invalid_certificates", "timeout",
                         "connect_timeout", "proxy_url", "pool_idle_timeout",
                         "http1_only", "http2_only", "user_agent"})
#: `storage_options` keys for retries of transient failures (with backoff): how many, and
#: for how long in all (seconds).
RETRY_KEYS = frozenset({"max_retries", "retry_timeout_s"})
#: Which store's keys each scheme takes (`anonymous` becomes `<store>_skip_signature`).
SIGNERS = {"s3": "aws", "s3a": "aws", "gs": "google", "az": "azure", "abfs": "azure",
           "abfss": "azure"}
#: Objects per listing page.
PAGE = 1000


def is_object_uri(uri: str) -> bool:
    return uri.startswith(SCHEMES)


def split_uri(uri: str) -> tuple[str, str]:
    """(`scheme://bucket`, key) of an object URI."""
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}", key


def _options(options: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k).lower(), str(v)) for k, v in (options or {}).items()
                        if str(k).lower() not in LANCE_ONLY))


@functools.lru_cache(maxsize=64)
def _store(root: str, options: tuple[tuple[str, str], ...]):
    """One store per bucket and options, per process (it holds a connection pool)."""
    from obstore.store import from_url

    config = {k: v for k, v in options if k not in CLIENT_KEYS and k not in RETRY_KEYS}
    client = {k: (v.lower() == "true" if v.lower() in ("true", "false") else v)
              for k, v in options if k in CLIENT_KEYS}
    if config.pop("anonymous", "false").lower() == "true":
        config[f"{SIGNERS[root.partition(':')[0]]}_skip_signature"] = "true"
    given = dict(options)
    retry = {"max_retries": int(given.get("max_retries", 10)),
             "retry_timeout": timedelta(seconds=float(given.get("retry_timeout_s", 180)))}
    return from_url(root, config=config, client_options=client, retry_config=retry)


def store_of(uri: str, options: dict[str, str] | None):
    """(the store holding `uri`, the object's key)."""
    root, key = split_uri(uri)
    return _store(root, _options(options)), key


def error_of(uri: str, exc: Exception) -> MediaError:
    """What an object store's error means for `uri`, in one line: `missing`, `denied`,
    `unreachable` or `unreadable`."""
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    text = str(exc)
    root = split_uri(uri)[0]
    if "NoSuchBucket" in text:  # a listing says so in a generic error
        return MediaError("missing", f"{uri}: there is no bucket {root}; check its name "
                          "and the endpoint")
    if isinstance(exc, FileNotFoundError):
        return MediaError("missing", f"{uri}: no such object")
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or \
            "403 Forbidden" in text or "AccessDenied" in text:
        return MediaError("denied", f"{uri}: access denied; check the keys (storage_options "
                          "or the environment) and the policy on this prefix")
    if "error sending request" in text or "connect" in text.lower():
        return MediaError("unreachable", f"{uri}: the object store cannot be reached; check "
                          "the endpoint (aws_endpoint) and the network")
    first = text.splitlines()[0] if text else type(exc).__name__
    return MediaError("unreadable", f"{uri}: {first[:300]}")


def read(uri: str, options: dict[str, str] | None, max_bytes: int) -> bytes:
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


def read_head(uri: str, options: dict[str, str] | None) -> int:
    """An object's size (it is there and may be read)."""
    import obstore

    store, key = store_of(uri, options)
    try:
        return obstore.head(store, key)["size"]
    except Exception as exc:
        raise error_of(uri, exc) from None


def list_pages(prefix: str, options: dict[str, str] | None,
               page: int = PAGE) -> Iterator[list[tuple[str, int]]]:
    """The objects under `prefix` (whole path segments: `s3://b/photos` holds
    `s3://b/photos/x.jpg`, not `s3://b/photos2/y.jpg`) as pages of (URI, size), in key
    order; never the whole listing at once."""
    import obstore

    store, key = store_of(prefix, options)
    root = split_uri(prefix)[0]
    try:
        for found in obstore.list(store, key.rstrip("/") or None, chunk_size=page):
            yield [(f"{root}/{meta['path']}", meta["size"]) for meta in found]
    except Exception as exc:  # the listing failed: the whole prefix is unreadable
        raise error_of(prefix, exc) from None


def list_level(prefix: str, options: dict[str, str] | None) -> tuple[list[tuple[str, int]],
                                                                      list[str]]:
    """(objects right under `prefix`, the prefixes one level down), for a driver that
    splits a listing into tasks."""
    import obstore

    store, key = store_of(prefix, options)
    root = split_uri(prefix)[0]
    try:
        found = obstore.list_with_delimiter(store, key.rstrip("/") or None)
    except Exception as exc:
        raise error_of(prefix, exc) from None
    return ([(f"{root}/{m['path']}", m["size"]) for m in found["objects"]],
            [f"{root}/{p}" for p in found["common_prefixes"]])
