"""ingest_images: list the inputs (files, directories, globs, manifests, tar shards) and
read each into one row, decoding safely."""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.errors import RunError
from curate.media import objstore
from curate.media.decode import (
    HttpOptions,
    MediaError,
    content_hash,
    decode_image,
    list_tar,
    read_http,
    read_local,
)
from curate.stage import ObjectStoreParams, Source, first_of_each_input
from curate.stages._common import CAPTION_COLUMNS, _is_url

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
TAR_SUFFIXES = (".tar",)
#: WebDataset members that hold the image of a sample, in order of preference.
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "avif")
MAX_CAPTION_BYTES = 64 * 1024
#: Largest manifest read from object storage (it is read whole, by one listing task).
MAX_MANIFEST_BYTES = 2_000_000_000

#: Files per listing unit at the top of a directory (sub-directories are units of their own).
LIST_CHUNK = 10_000


def sample_id_for(uri: str) -> str:
    """Stable id of an input: a hash of its URI (so every input file is exactly one row)."""
    return hashlib.blake2b(uri.encode(), digest_size=16).hexdigest()


class IngestParams(ObjectStoreParams):
    paths: list[str] = Field(
        min_length=1,
        description="files, directories (recursive), globs, manifests (.parquet/.csv/.jsonl "
        "with a uri column), WebDataset .tar shards, http(s) URLs, or objects and prefixes "
        "in object storage (s3://bucket/prefix/, gs://, az://; globs, manifests and shards "
        "too)",
    )
    uri_column: str = Field("uri", description="manifest column holding each file's path or URL")
    caption_column: str | None = Field(
        None,
        description="manifest column kept as alt_text (default: the first of "
        + ", ".join(CAPTION_COLUMNS) + " that exists)",
    )
    max_pixels: int = Field(
        64_000_000, ge=1, description="larger images are refused before decoding (bombs)"
    )
    max_bytes: int = Field(100_000_000, ge=1, description="larger files are refused unread")
    decode_max_side: int | None = Field(
        1024,
        ge=32,
        description="decoded images handed to later stages are downscaled to this longest "
        "side (None: full resolution)",
    )
    http_timeout_s: float = Field(30.0, gt=0, description="per-request timeout for URLs")
    http_retries: int = Field(3, ge=0, description="retries of a failed or timed-out request")


class IngestImages(Source):
    """Read every input image into one row: size, format, bytes, content hash, or an error."""

    type = "ingest_images"
    Params = IngestParams
    params: IngestParams
    verdict_column = "error"
    local_path_params = ("paths",)
    #: WebDataset members that hold the media, in order of preference.
    member_suffixes: tuple[str, ...] = IMAGE_SUFFIXES
    media_kind = "image"

    def writes(self) -> dict[str, pa.DataType]:
        return {
            "sample_id": pa.string(),
            "input_id": pa.string(),
            "uri": pa.string(),
            "media_type": pa.string(),
            "alt_text": pa.string(),
            "width": pa.int32(),
            "height": pa.int32(),
            "format": pa.string(),
            "num_frames": pa.int32(),
            "num_bytes": pa.int64(),
            "content_hash": pa.string(),
            "decode_warning": pa.string(),
            "error": pa.string(),
        }

    def needs_pixels(self) -> bool:
        return True

    def fingerprint(self) -> dict[str, Any]:
        # What is read is decided by the listing; how it is read decides the rows.
        return self.params.model_dump(
            mode="json", exclude={"resources", "name", "paths", "http_timeout_s", "http_retries",
                                  "storage_options"}
        )

    def load(self, items: pa.Table) -> tuple[pa.Table, list]:
        """Worker side: read and decode each listed input into its one row."""
        columns, images = load_inputs(self, items)
        rows = items.select(["input_id", "uri", "alt_text"])
        rows = rows.append_column("sample_id", items["input_id"])
        for name, values in columns.items():
            rows = rows.append_column(name, values)
        return rows, images

    @property
    def reloads_rows(self) -> bool:
        # one row per input, as `load` makes them here; a subclass that makes its own rows
        # from an input (several, or other pixels) must say how to read one again
        return type(self).load is IngestImages.load

    def reload(self, rows: pa.Table) -> tuple[list, list[str | None]]:
        """The images of stored rows, read again by `uri` (a tar member found again in its
        shard), and why a row could not be read again: it fails now, or its bytes
        changed since (another content hash)."""
        columns, images = load_inputs(self, listed_again(rows, self.params.storage_options))
        unread = unread_reasons(rows["error"].to_pylist(), columns["error"].to_pylist(),
                                rows["content_hash"].to_pylist(),
                                columns["content_hash"].to_pylist())
        return [None if why else image for image, why in zip(images, unread)], unread

    # --- listing ----------------------------------------------------------------------------
    def entry_count(self, units: list[dict[str, Any]]) -> int:
        return len(self.params.paths)

    def list_entries(self) -> list[dict[str, Any]]:
        """Driver side: the listing split into units for workers. Only entries and the top
        level of each directory are looked at here; paths that do not exist fail now."""
        entries: list[dict[str, Any]] = []
        for index, entry in enumerate(self.params.paths):
            where = f"{self.name}.paths.{index}"
            if objstore.is_object_uri(entry):
                entries += self._object_entries(index, entry, where)
                continue
            if _is_url(entry) or any(ch in entry for ch in "*?["):
                entries.append({"index": index, "entry": entry})
                continue
            path = os.path.abspath(os.path.expanduser(entry))
            if os.path.isdir(path):
                files, dirs = _top_level(path)
                if not files and not dirs:
                    raise RunError(f"{where}: directory {entry!r} holds no files")
                entries += [{"index": index, "entry": entry, "dir": d} for d in dirs]
                for lo in range(0, len(files), LIST_CHUNK):
                    entries.append({"index": index, "entry": entry,
                                    "files": files[lo:lo + LIST_CHUNK]})
            elif os.path.exists(path):
                entries.append({"index": index, "entry": entry, "files": [path]})
            else:
                raise RunError(f"{where}: {entry!r} does not exist (relative paths start at "
                               f"{os.getcwd()})")
        return entries

    def _object_entries(self, index: int, entry: str, where: str) -> list[dict[str, Any]]:
        """Driver side, for an object URI: a unit for each prefix of its top level and for
        each run of up to LIST_CHUNK objects right under it (by key bounds: the driver
        never holds the level's keys), or, for a glob, the prefix before its first
        wildcard (one task lists it and matches the keys). Listing here, with few
        retries, makes a wrong bucket, bad keys or an unreachable endpoint fail before
        any work."""
        options = self.params.storage_options
        wild = next((k for k, ch in enumerate(entry) if ch in "*?["), -1)
        units: list[dict[str, Any]] = []
        try:
            if wild >= 0:
                prefix = entry[:wild].rpartition("/")[0]
                if "://" not in prefix or not objstore.split_uri(prefix)[0].split("://")[1]:
                    raise RunError(f"{where}: {entry!r}: a wildcard in the bucket's name is "
                                   "not supported; name the bucket")
                next(iter(objstore.list_pages(prefix, options, page=1, quick=True)), None)
                return [{"index": index, "entry": entry, "prefix": prefix, "match": entry}]
            level = entry.rstrip("/")
            for kind, *place in objstore.walk_level(entry, options, LIST_CHUNK, quick=True):
                if kind == "objects":
                    units.append({"index": index, "entry": entry, "prefix": level,
                                  "after": place[0], "last": place[1]})
                elif not place[0].rpartition("/")[2].startswith("."):  # hidden: left out
                    units.append({"index": index, "entry": entry, "prefix": place[0]})
            if not units:
                if entry.endswith("/") or not objstore.split_uri(entry)[1]:
                    raise RunError(f"{where}: {entry!r} holds no objects")
                objstore.read_head(entry, options, quick=True)  # a single object, or none
                units.append({"index": index, "entry": entry, "files": [entry]})
        except MediaError as exc:
            raise RunError(f"{where}: {exc.detail}") from None
        return units

    def list_entry(self, unit: dict[str, Any]) -> pa.Table:
        """Worker side: the inputs of one listing unit (`list_entries`), in order."""
        if "prefix" in unit:
            items = list(self._object_items(unit))
        elif "dir" in unit or "files" in unit:
            items = [item for path in _unit_files(unit) for item in self._file_items(path)]
        else:
            items = list(self._expand(unit["entry"], unit["index"]))
        order = (unit["index"] << 40) + np.arange(len(items), dtype=np.int64)
        return pa.table(
            {
                "input_id": pa.array([sample_id_for(r["uri"]) for r in items], pa.string()),
                "uri": pa.array([r["uri"] for r in items], pa.string()),
                "alt_text": pa.array([r.get("alt_text") for r in items], pa.string()),
                "_offset": pa.array([r.get("_offset", -1) for r in items], pa.int64()),
                "_size": pa.array([r.get("_size", -1) for r in items], pa.int64()),
                "_error": pa.array([r.get("_error") for r in items], pa.string()),
                "_order": pa.array(order, pa.int64()),
            }
        )

    def empty_entry(self, index: int) -> str:
        """Why a path entry that listed nothing is refused."""
        entry = self.params.paths[index]
        if any(ch in entry for ch in "*?["):
            return f"{self.name}.paths.{index}: {entry!r} matches no files"
        return f"{self.name}.paths.{index}: {entry!r} holds no files"

    def list_inputs(self) -> pa.Table:
        """Every input, listed in this process (tests, single calls): each URI once."""
        units = self.list_entries()
        items = pa.concat_tables([self.list_entry(u) for u in units])
        for index in range(len(self.params.paths)):
            if not any(u["index"] == index for u in units):
                continue
            if not np.any(items["_order"].to_numpy() >> 40 == index):
                raise RunError(self.empty_entry(index))
        return first_of_each_input(items)

    def _expand(self, entry: str, index: int):
        if _is_url(entry):
            yield {"uri": entry}
            return
        matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
        for path in (m for m in matches if os.path.isfile(m)):
            yield from self._file_items(path)

    def _object_items(self, unit: dict[str, Any]):
        """The objects under a listing unit's prefix, page by page: those a local listing
        would give (no hidden names; those matching its glob, as `glob` matches paths,
        when it has one)."""
        match = glob_pattern(unit["match"]) if "match" in unit else None
        start = len(unit["prefix"])
        options = self.params.storage_options
        pages = (objstore.list_run(unit["prefix"], options, unit["after"], unit["last"])
                 if "last" in unit else objstore.list_pages(unit["prefix"], options))
        try:
            for page in pages:
                for uri, _ in page:
                    if "/." in uri[start:] or (match and not match.fullmatch(uri)):
                        continue
                    yield from self._file_items(uri)
        except MediaError as exc:  # the listing of this prefix failed (after retries)
            raise RunError(f"{self.name}.paths.{unit['index']}: {exc.detail}") from None

    def _file_items(self, path: str):
        if not objstore.is_object_uri(path):
            path = os.path.abspath(path)
        lower = path.lower()
        if lower.endswith(MANIFEST_SUFFIXES):
            yield from self._manifest_items(path)
        elif lower.endswith(TAR_SUFFIXES):
            yield from _tar_items(path, self.member_suffixes, self.media_kind,
                                  self.params.storage_options)
        else:
            yield {"uri": path}

    def _manifest_items(self, path: str):
        table = _read_manifest(path, self.params.storage_options)
        names = table.column_names
        uri_col = self.params.uri_column
        if uri_col not in names:
            raise RunError(
                f"{self.name}: manifest {path} has no column {uri_col!r} (columns: "
                f"{', '.join(names)}); set uri_column to the one holding paths or URLs"
            )
        cap_col = self.params.caption_column
        if cap_col is not None and cap_col not in names:
            raise RunError(f"{self.name}: manifest {path} has no caption column {cap_col!r}")
        if cap_col is None:
            cap_col = next((c for c in CAPTION_COLUMNS if c in names), None)
        uris = pc.cast(table[uri_col], pa.string()).to_pylist()
        captions = (
            pc.cast(table[cap_col], pa.string()).to_pylist() if cap_col else [None] * len(uris)
        )
        in_store = objstore.is_object_uri(path)
        base = path.rpartition("/")[0] if in_store else Path(path).parent
        for n, (uri, caption) in enumerate(zip(uris, captions)):
            if not uri or not uri.strip():
                yield {"uri": f"{path}#row={n}", "_error": f"missing_uri: row {n} has no "
                       f"{uri_col}", "alt_text": caption}
                continue
            uri = uri.strip()
            if _is_url(uri) or objstore.is_object_uri(uri):
                pass
            elif in_store:  # a key relative to the manifest's own prefix
                joined = objstore.joined(base, uri)
                if uri.startswith(("/", "~", "file:")) or "/../" in joined + "/":
                    yield {"uri": f"{path}#row={n}", "alt_text": caption,
                           "_error": f"unsupported: row {n} names {uri!r}, a local path or "
                           "one out of the bucket; a manifest in object storage names keys "
                           "relative to itself or whole URIs"}
                    continue
                uri = joined
            else:
                uri = uri.removeprefix("file://")
                uri = str((base / os.path.expanduser(uri)).resolve())
            yield {"uri": uri, "alt_text": caption}


def glob_pattern(pattern: str) -> re.Pattern:
    """A glob over object URIs as `glob.glob(..., recursive=True)` reads it over paths:
    `*`, `?` and `[...]` stay within one path segment, `**` as a whole segment spans any
    number of them (none included)."""
    out = []
    parts = pattern.split("/")
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]*/)*")
            continue
        i = 0
        while i < len(part):
            ch = part[i]
            if ch == "*":
                out.append("[^/]*")
            elif ch == "?":
                out.append("[^/]")
            elif ch == "[" and "]" in part[i + 2:]:
                end = part.index("]", i + 2)
                body = part[i + 1:end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
            else:
                out.append(re.escape(ch))
            i += 1
        if not last:
            out.append("/")
    return re.compile("".join(out))


def _top_level(path: str) -> tuple[list[str], list[str]]:
    """Files and sub-directories right under `path` (hidden ones left out), sorted."""
    files, dirs = [], []
    with os.scandir(path) as found:
        for entry in found:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                dirs.append(entry.path)
            else:
                files.append(entry.path)
    return sorted(files), sorted(dirs)


def _unit_files(unit: dict[str, Any]):
    if "files" in unit:
        yield from unit["files"]
        return
    for root, dirs, names in os.walk(unit["dir"], followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield os.path.join(root, name)


def _read_manifest(path: str, options: dict | None = None) -> pa.Table:
    """A manifest, from a local path or an object (read whole: a manifest is the list of
    inputs of one listing task)."""
    try:
        source = path
        if objstore.is_object_uri(path):
            source = pa.BufferReader(objstore.read(path, options, MAX_MANIFEST_BYTES))
        if path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(source)
        if path.lower().endswith(".csv"):
            import pyarrow.csv as pcsv

            return pcsv.read_csv(source)
        import pyarrow.json as pjson

        return pjson.read_json(source)
    except (pa.ArrowInvalid, OSError, MediaError) as exc:
        raise RunError(f"cannot read manifest {path}: {exc}") from None


def _tar_items(path: str, suffixes: tuple[str, ...], kind: str, options: dict | None = None):
    """WebDataset samples: members grouped by key (name up to the first dot of the basename);
    the first member with one of `suffixes` is the sample's media. A shard in object
    storage is read in place by ranges (its headers, and the captions), never whole."""
    try:
        with objstore.open_file(path, options) as shard:
            members = list_tar(shard)
    except MediaError as exc:  # an object that cannot be read: missing, denied, ...
        yield {"uri": path, "_error": str(exc)}
        return
    except (tarfile.TarError, OSError) as exc:
        failure = objstore.media_error(exc, "unreadable", f"not a readable tar shard: {exc}")
        yield {"uri": path, "_error": str(failure)}
        return
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in members:
        directory, _, base = m.name.rpartition("/")
        key, _, ext = base.partition(".")
        samples.setdefault(f"{directory}/{key}" if directory else key, {})[ext.lower()] = m
    for key in sorted(samples):
        parts = samples[key]
        image = next((parts[e] for e in suffixes if e in parts), None)
        caption = None
        if "txt" in parts and parts["txt"].size <= MAX_CAPTION_BYTES:
            text = parts["txt"]
            try:
                caption = objstore.read_member(path, text.name, text.offset_data, text.size,
                                               MAX_CAPTION_BYTES, options).decode(
                    "utf-8", "replace").strip()
            except (OSError, MediaError):
                caption = None  # the sample's media says whether the shard is readable
        if image is None:
            yield {"uri": f"{path}#{key}", "alt_text": caption,
                   "_error": f"not_an_{kind}: sample has no {kind} member ({', '.join(parts)})"}
        else:
            yield {"uri": f"{path}#{image.name}", "alt_text": caption,
                   "_offset": image.offset_data, "_size": image.size}


@functools.lru_cache(maxsize=64)
def _shard_members(tar_path: str, version: Any, size: int,
                   options: tuple = ()) -> dict[str, tuple[int, int]]:
    with objstore.open_file(tar_path, dict(options)) as shard:
        return {m.name: (m.offset_data, m.size) for m in list_tar(shard)}


def _tar_members(tar_path: str, options: dict | None = None) -> dict[str, tuple[int, int]]:
    """(data offset, size) of each member of a shard, listed once per process while the
    shard is unchanged (a recomputed stage reads its rows again batch by batch): a local
    file by its mtime and size (a damaged one has no members), an object by its version
    tag and size (one that cannot be read now raises MediaError, and is not cached)."""
    if objstore.is_object_uri(tar_path):
        size, tag = objstore.head(tar_path, options)
        try:
            return _shard_members(tar_path, tag, size, objstore.normalized(options))
        except (tarfile.TarError, OSError) as exc:
            raise objstore.media_error(exc, "unreadable", f"{tar_path}: not a readable tar "
                                       f"shard: {exc}") from None
    stat = os.stat(tar_path)
    try:
        return _shard_members(tar_path, stat.st_mtime_ns, stat.st_size)
    except (tarfile.TarError, OSError):
        return {}


def listed_again(rows: pa.Table, options: dict | None = None) -> pa.Table:
    """Stored rows (`input_id`, `uri`, `error`) as the listing hands inputs to `load`: a
    tar member found again in its shard (a local one, or an object's, reached with
    `options`), a row that has an error left unread."""
    n = rows.num_rows
    had = rows["error"].to_pylist()
    errors = list(had)
    offsets, sizes = [-1] * n, [0] * n
    shards: dict[str, dict | MediaError] = {}  # each shard looked at once per batch
    for i, uri in enumerate(rows["uri"].to_pylist()):
        tar_path, _, member = uri.partition("#")
        if had[i] or not member or _is_url(uri) or not tar_path.lower().endswith(TAR_SUFFIXES):
            continue
        if tar_path not in shards:
            if objstore.is_object_uri(tar_path):
                try:
                    shards[tar_path] = _tar_members(tar_path, options)
                except MediaError as exc:
                    shards[tar_path] = exc
            else:
                shards[tar_path] = (_tar_members(tar_path) if os.path.isfile(tar_path)
                                    else None)
        members = shards[tar_path]
        if members is None:
            continue  # a local shard gone: `load` says it is missing
        if isinstance(members, MediaError):
            errors[i] = str(members)
            continue
        found = members.get(member)
        if found is None:
            errors[i] = f"missing: no member {member} in the shard any more"
        else:
            offsets[i], sizes[i] = found
    return pa.table({"input_id": rows["input_id"], "uri": rows["uri"],
                     "_offset": pa.array(offsets, pa.int64()),
                     "_size": pa.array(sizes, pa.int64()),
                     "_error": pa.array(errors, pa.string())})


def unread_reasons(had: list, errors: list, was: list, now: list) -> list[str | None]:
    """Why each stored row cannot be read again: it fails now, or its bytes are not those
    it was made from (`was` and `now`: content hashes). None where it can, or where it
    had an error already."""
    unread: list[str | None] = [None] * len(had)
    for i in range(len(had)):
        if had[i]:
            continue
        if errors[i]:
            unread[i] = errors[i]
        elif now[i] != was[i]:
            unread[i] = ("changed: the file's bytes are not those the row was made from; "
                         "the next run reads it again")
    return unread


def load_inputs(stage: IngestImages, batch: pa.Table) -> tuple[dict[str, pa.Array], list]:
    """Worker side: read and decode each listed input. Returns new columns and images."""
    p = stage.params
    http = HttpOptions(timeout_s=p.http_timeout_s, retries=p.http_retries)
    n = batch.num_rows
    cols: dict[str, list] = {k: [None] * n for k in
                             ("width", "height", "format", "num_frames", "num_bytes",
                              "content_hash", "decode_warning", "error")}
    images: list = [None] * n
    uris = batch["uri"].to_pylist()
    offsets = batch["_offset"].to_pylist()
    sizes = batch["_size"].to_pylist()
    errors = batch["_error"].to_pylist()
    # objects are fetched a few at a time ahead of decoding: one GET waits on the store's
    # latency (tens of ms), which would otherwise bound a worker to a few dozen a second
    wanted = [i for i, uri in enumerate(uris) if not errors[i] and offsets[i] < 0
              and objstore.is_object_uri(uri)]
    fetched = objstore.read_ahead([uris[i] for i in wanted], p.storage_options, p.max_bytes)
    ahead = set(wanted)
    for i, uri in enumerate(uris):
        if errors[i]:
            cols["error"][i] = errors[i]
            continue
        try:
            if i in ahead:
                data = next(fetched).result()
            elif _is_url(uri):
                data = read_http(uri, p.max_bytes, http)
            elif offsets[i] >= 0:
                tar_path, _, member = uri.partition("#")
                data = objstore.read_member(tar_path, member, offsets[i], sizes[i],
                                            p.max_bytes, p.storage_options)
            else:
                data = read_local(uri, p.max_bytes)
            cols["num_bytes"][i] = len(data)
            cols["content_hash"][i] = content_hash(data)
            decoded = decode_image(data, p.max_pixels, p.decode_max_side)
        except MediaError as exc:
            cols["error"][i] = str(exc)
            continue
        except Exception as exc:  # one input's failure is its row's error, never the batch's
            cols["error"][i] = f"unreadable: {type(exc).__name__}: {exc}"
            continue
        cols["decode_warning"][i] = decoded.warning
        cols["width"][i] = decoded.width
        cols["height"][i] = decoded.height
        cols["format"][i] = decoded.format
        cols["num_frames"][i] = decoded.num_frames
        images[i] = decoded.image
    types = stage.writes()
    out = {k: pa.array(v, types[k]) for k, v in cols.items()}
    out["media_type"] = pa.array(["image"] * n, pa.string())
    return out, images
