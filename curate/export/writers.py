"""Writer tasks of an export: each reads its rows' media (checked against the hash taken
at ingest), and writes WebDataset shards or a Parquet part. Rows whose media cannot be
read, or changed since ingest, are left out and counted by reason."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.export.outputs import Output, discard
from curate.export.sharding import WriterTask, ranked
from curate.media.decode import MediaError, decode_image
from curate.media.reader import MediaReader

#: Extension of each format sniffed at ingest (the `format` column).
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
              "TIFF": "tiff", "BMP": "bmp", "PPM": "ppm", "AVIF": "avif"}
#: PIL's encoder for each --image-format.
ENCODERS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
#: Pixels a re-encoded image may have at most (decompression bombs are refused).
MAX_PIXELS = 178_956_970
#: Longest side of a clip cut for export when no --max-side is given (0: the source's).
CLIP_MAX_SIDE = 0
#: Rows of media held in memory at once by a Parquet writer (one row group).
PARQUET_GROUP_ROWS = 64


@dataclass(frozen=True)
class MediaOptions:
    image_format: str | None = None  # jpg | png | webp: re-encode; None: original bytes
    max_side: int | None = None  # downscale (images re-encoded, clips cut) to this side
    quality: int = 95
    #: how media in object storage is reached (the store's media_storage_options)
    storage_options: tuple[tuple[str, str], ...] = ()


@dataclass
class Written:
    """What one writer task wrote: its files (temporary names, in order) with their
    sample counts, bytes and buckets, and the rows it left out by reason."""

    files: list[dict[str, Any]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one uri


class MediaFetcher:
    """The bytes (and extension) each row contributes to an export."""

    def __init__(self, options: MediaOptions):
        self.options = options
        self.reader = MediaReader(storage_options=dict(options.storage_options))

    def fetch(self, row: dict[str, Any]) -> tuple[bytes, str]:
        if row.get("error"):
            raise MediaError("error_row", f"the row has no media: {row['error']}")
        if row.get("media_type") == "video_clip":
            return self._clip(row), "mp4"
        if not row.get("content_hash"):
            raise MediaError("error_row", "the row's media was never read")
        data = self.reader.read_checked(row["uri"], int(row["num_bytes"]), row["content_hash"])
        if row.get("media_type") == "video":
            suffix = os.path.splitext(row["uri"].split("#")[-1])[1].lstrip(".").lower()
            return data, suffix or "mp4"
        ext = EXTENSIONS.get(row.get("format") or "", "bin")
        if self.options.image_format is None and self.options.max_side is None:
            return data, ext
        return self._reencode(data, ext)

    def _reencode(self, data: bytes, ext: str) -> tuple[bytes, str]:
        options = self.options
        image = decode_image(data, MAX_PIXELS).image
        if options.max_side and max(image.size) > options.max_side:
            from PIL import Image

            image.thumbnail((options.max_side, options.max_side), Image.Resampling.LANCZOS)
        target = options.image_format or (ext if ext in ENCODERS else "png")
        out = io.BytesIO()
        image.save(out, ENCODERS[target], quality=options.quality)
        return out.getvalue(), target

    def _clip(self, row: dict[str, Any]) -> bytes:
        from curate.media.video import cut

        source = self.reader.video_source(row["uri"], row["source_hash"])
        # a file, not memory: the MP4 muxer rewrites its start to put the index first
        with tempfile.TemporaryDirectory(prefix="curate-clip-") as folder:
            path = os.path.join(folder, "clip.mp4")
            cut(source, row["clip_start_s"], row["clip_end_s"], path, "h264",
                self.options.max_side or CLIP_MAX_SIDE or None, row.get("fps"))
            with open(path, "rb") as fh:
                return fh.read()


def _text(row: dict[str, Any]) -> str | None:
    for column in ("caption", "alt_text"):
        if row.get(column):
            return str(row[column])
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def metadata(row: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    return {"sample_id": row["sample_id"],
            **{c: _json_safe(row.get(c)) for c in columns if c != "sample_id"}}


def with_buckets(rows: pa.Table, buckets: tuple[str, ...]) -> pa.Table:
    """`rows` with a `bucket` column: the name of each row's aspect-ratio bucket."""
    from curate.export.buckets import assign

    if not buckets:
        return rows
    size = [rows[c].to_numpy(zero_copy_only=False) if c in rows.column_names
            else np.zeros(rows.num_rows) for c in ("width", "height")]
    index = assign(np.nan_to_num(size[0].astype(float)), np.nan_to_num(size[1].astype(float)),
                   buckets)
    return rows.append_column("bucket", pa.array(
        [buckets[i] if i >= 0 else None for i in index], pa.string()))


def _samples(rows: pa.Table, fetcher: MediaFetcher, written: Written
             ) -> Iterator[tuple[dict[str, Any], bytes, str]]:
    """(row, media bytes, extension) of each row whose media could be read."""
    for row in rows.drop_columns([c for c in rows.column_names if c.startswith("_")]
                                 ).to_pylist():
        try:
            data, ext = fetcher.fetch(row)
        except MediaError as exc:
            written.skipped[exc.code] += 1
            written.examples.setdefault(exc.code, f"{row['uri']}: {exc}")
            continue
        yield row, data, ext


class _Shard:
    """A tar shard written member by member. Each member is a USTAR header, the data and
    its padding in one go: tarfile's own copy loop moves 16 KiB at a time under the GIL,
    which halves what two writer threads achieve on photos."""

    def __init__(self, out: Output, name: str):
        self.name = name
        self.file = out.create(name)  # closed in close(), after many rows
        self.samples = 0

    def add(self, name: str, data: bytes) -> None:
        """A member with fixed owner, mode and time, so the same rows give the same
        bytes."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self.file.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        self.file.write(data)
        self.file.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> dict[str, Any]:
        # the end of the archive: two empty blocks, then zeros to a whole record, as tar
        # writes it
        self.file.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self.file.write(b"\0" * (-self.file.tell() % tarfile.RECORDSIZE))
        size = self.file.tell()
        self.file.close()
        return {"name": self.name, "samples": self.samples, "bytes": size}

    def abort(self) -> None:
        """Give the shard up (a multipart upload is aborted: nothing half-written shows)."""
        discard(self.file)


def write_webdataset(rows: pa.Table, task: WriterTask, out: Output, columns: list[str],
                     media: MediaOptions, shard_size: int, shard_bytes: int | None
                     ) -> Written:
    """The task's ranks as tar shards of `shard_size` samples (or about `shard_bytes`):
    per sample `<key>.<ext>` (the media), `<key>.txt` (caption) and `<key>.json`."""
    rows = ranked(rows, task)
    written = Written()
    fetcher = MediaFetcher(media)
    shard: _Shard | None = None
    try:
        for row, data, ext in _samples(rows, fetcher, written):
            full = shard is not None and (
                shard.samples >= shard_size
                or (shard_bytes is not None and shard.tell() + len(data) > shard_bytes))
            if shard is None or full:
                if shard is not None:
                    written.files.append(shard.close())
                shard = _Shard(out, f".task{task.index:05d}-{len(written.files):05d}.tar.part")
            key = row["sample_id"]
            shard.add(f"{key}.{ext}", data)
            text = _text(row)
            if text is not None:
                shard.add(f"{key}.txt", text.encode())
            meta = metadata(row, columns)
            shard.add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            shard.samples += 1
        if shard is not None:
            written.files.append(shard.close())
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    return written


def write_parquet(rows: pa.Table, task: WriterTask, out: Output, columns: list[str],
                  media: MediaOptions, with_bytes: bool, part_rows: int) -> Written:
    """The task's ranks as Parquet parts of `part_rows` rows: the metadata columns, `text`
    (caption or alt text), and the media as `media` bytes with `media_ext` (or only the
    `uri`). Row groups are small, so a worker holds little media at once."""
    rows = ranked(rows, task)
    written = Written()
    fetcher = MediaFetcher(media)
    keep = list(dict.fromkeys(["sample_id", "uri", *columns]))
    fields = [rows.schema.field(c) for c in keep if c in rows.column_names]
    fields.append(pa.field("text", pa.string()))
    if with_bytes:
        fields += [pa.field("media", pa.binary()), pa.field("media_ext", pa.string())]
    schema = pa.schema(fields)
    group: list[dict[str, Any]] = []
    part: dict[str, Any] | None = None

    def flush() -> None:
        if group:
            part["writer"].write_table(pa.Table.from_pylist(group, schema=schema))
            group.clear()

    def close() -> None:
        flush()
        part["writer"].close()
        if part["file"] is None:
            size = os.path.getsize(out.path(part["name"]))
        else:
            size = part["file"].tell()
            part["file"].close()
        written.files.append({"name": part["name"], "samples": part["samples"],
                              "bytes": size})

    def start() -> dict[str, Any]:
        name = f".task{task.index:05d}-{len(written.files):05d}.parquet.part"
        # a local part by its path: Arrow writes it without taking the GIL
        file = out.create(name) if out.in_store else None
        opened = {"name": name, "file": file, "samples": 0}
        opened["writer"] = pq.ParquetWriter(file if file else out.path(name), schema)
        return opened

    try:
        for row, data, ext in _samples(rows, fetcher, written):
            if part is None or part["samples"] >= part_rows:
                if part is not None:
                    close()
                part = start()
            item = {f.name: row.get(f.name) for f in fields}
            item["text"] = _text(row)
            if with_bytes:
                item["media"], item["media_ext"] = data, ext
            group.append(item)
            part["samples"] += 1
            if len(group) >= PARQUET_GROUP_ROWS:
                flush()
        if part is not None:
            close()
    except BaseException:
        if part is not None and part["file"] is not None:
            discard(part["file"])
        raise
    return written
