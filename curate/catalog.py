"""Read side of the hosting layer: queries, rows, media, duplicates, stats and vector search
over the samples table. No Ray and no HTTP here; errors are `CatalogError`s carrying the
HTTP status they map to."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from curate import stats as table_stats
from curate.config import StoreConfig
from curate.errors import CurateError
from curate.filters import FilterError, combine, ids_in, lance_message
from curate.media.decode import MediaError, content_hash, decode_image
from curate.media.reader import MediaReader
from curate.table.store import Store

log = logging.getLogger(__name__)

#: sample_ids are hex digests (see curate.stages.image.ingest_images.sample_id_for);
#: nothing else reaches a filter.
SAMPLE_ID = re.compile(r"^[0-9a-f]{8,64}$")
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
        "BMP": "image/bmp", "TIFF": "image/tiff", "MPO": "image/jpeg", "AVIF": "image/avif",
        "mp4": "video/mp4", "m4v": "video/mp4", "mov": "video/quicktime", "webm": "video/webm",
        "mkv": "video/x-matroska", "avi": "video/x-msvideo"}
#: What a clip row needs to be cut from its source.
CLIP_COLUMNS = ("uri", "media_type", "source_hash", "clip_start_s", "clip_end_s", "fps",
                "error")
#: Seconds a reader may lag behind commits made by other processes.
REFRESH_S = 1.0
#: Index candidates re-ranked with the full vectors: exact distances, near-exact order.
REFINE = 4
#: The most hands a duplicate group is followed through (a copy of a copy of ...).
MAX_CHAIN = 8
DUPLICATE_COLUMNS = ("duplicate_of", "exact_duplicate_of", "phash_duplicate_of",
                     "semantic_duplicate_of")


class CatalogError(CurateError):
    """A request the catalog cannot answer; `status` is the HTTP status to reply with."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


def is_vector(kind: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(kind)


class Catalog:
    """The samples table as the API sees it. Thread-safe for reads."""

    def __init__(self, store: StoreConfig, max_filter_chars: int = 1000,
                 search_column: str = "clip_embedding"):
        self.store = Store(store)
        self.max_filter_chars = max_filter_chars
        self.search_column = search_column
        self._handles: tuple[float, Any, Any] | None = None  # (checked at, table, dataset)
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self.reader = MediaReader(storage_options=store.media_storage_options)
        self._lock = threading.Lock()
        self._clips = None  # a ClipCache, made on the first clip asked for
        self._queues = None  # (version, queues by name, pager, the last run's stages)
        if self.store.table() is None:
            raise CatalogError(404, f"no table {store.table!r} at {self.store.uri}; run "
                               "`curate run` first or pass the right --store/--table")

    # --- schema and filters ----------------------------------------------------------------
    def _current(self) -> tuple[Any, Any]:
        """The table and its Lance dataset, reopened at most every REFRESH_S seconds (opening
        costs more than a lookup by id; readers see other writers' commits that late)."""
        now = time.monotonic()
        with self._lock:
            handles = self._handles
        if handles is None or now - handles[0] > REFRESH_S:
            table = self.store.table()
            handles = (now, table, table.to_lance())
            with self._lock:
                self._handles = handles
        return handles[1], handles[2]

    def refresh(self) -> None:
        """Read the latest version from now on (after a write of our own)."""
        with self._lock:
            self._handles = None

    def table(self):
        return self._current()[0]

    def dataset(self):
        return self._current()[1]

    def version(self) -> int:
        """The table version reads see (at most REFRESH_S behind)."""
        return self.dataset().version

    def schema(self) -> pa.Schema:
        return self.dataset().schema

    def scalar_columns(self) -> list[str]:
        return [f.name for f in self.schema() if not is_vector(f.type)]

    def _filter(self, where: str | None, selected: bool | None) -> str | None:
        try:
            return combine(where, selected, self.schema().names, self.max_filter_chars)
        except FilterError as exc:
            raise CatalogError(400, str(exc)) from None

    def _columns(self, columns: list[str] | None, vectors: bool) -> list[str]:
        schema = self.schema()
        if columns:
            unknown = [c for c in columns if c not in schema.names]
            if unknown:
                raise CatalogError(400, f"unknown columns {', '.join(unknown)}; columns: "
                                   + ", ".join(schema.names))
            return list(dict.fromkeys(["sample_id", *columns]))
        return [f.name for f in schema if vectors or not is_vector(f.type)]

    def _scan(self, **kwargs) -> pa.Table:
        try:
            return self.dataset().to_table(**kwargs)
        except (ValueError, OSError) as exc:  # Lance's own verdict on a filter
            if kwargs.get("filter"):
                raise CatalogError(400, f"bad where filter: {lance_message(exc)}") from None
            raise

    # --- rows --------------------------------------------------------------------------------
    def samples(self, where: str | None = None, selected: bool | None = None,
                order_by: str | None = None, limit: int = 50, offset: int = 0,
                columns: list[str] | None = None, vectors: bool = False) -> dict[str, Any]:
        filt = self._filter(where, selected)
        cols = self._columns(columns, vectors)
        total = self._count(filt)
        if order_by:
            column, descending = self._order(order_by)
            keys = self._scan(columns=["sample_id", column], filter=filt)
            keys = keys.sort_by([(column, "descending" if descending else "ascending"),
                                 ("sample_id", "ascending")])
            ids = keys["sample_id"].slice(offset, limit).to_pylist()
            rows = self._by_ids(ids, cols)
        else:
            rows = self._scan(columns=cols, filter=filt, offset=offset, limit=limit).to_pylist()
        return {"total": total, "offset": offset, "limit": limit,
                "rows": [clean_row(r) for r in rows]}

    def _count(self, filt: str | None) -> int:
        try:
            return self.dataset().count_rows(filter=filt)
        except (ValueError, OSError) as exc:
            raise CatalogError(400, f"bad where filter: {lance_message(exc)}") from None

    def _order(self, order_by: str) -> tuple[str, bool]:
        text = order_by.strip()
        descending = text.startswith("-")
        parts = text.lstrip("-").split()
        if len(parts) == 2 and parts[1].lower() in ("asc", "desc"):
            descending = parts[1].lower() == "desc"
            parts = parts[:1]
        if len(parts) != 1 or parts[0] not in self.scalar_columns():
            raise CatalogError(400, f"order_by {order_by!r} must be a column, optionally "
                               "followed by asc or desc (or prefixed by -); columns: "
                               + ", ".join(self.scalar_columns()))
        return parts[0], descending

    def _by_ids(self, ids: list[str], cols: list[str]) -> list[dict]:
        if not ids:
            return []
        found = {r["sample_id"]: r for r in self._scan(
            columns=cols, filter=ids_in(i for i in ids if SAMPLE_ID.match(i))).to_pylist()}
        return [found[i] for i in ids if i in found]

    def row(self, sample_id: str, columns: list[str] | None = None,
            vectors: bool = False) -> dict[str, Any]:
        """One row's values as stored (404 for an unknown id)."""
        rows = self._by_ids([self._checked_id(sample_id)], self._columns(columns, vectors))
        if not rows:
            raise CatalogError(404, f"no sample {sample_id!r} in {self.store.name}")
        return rows[0]

    def sample(self, sample_id: str, columns: list[str] | None = None,
               vectors: bool = False) -> dict[str, Any]:
        """One row, JSON-safe (see clean_row)."""
        return clean_row(self.row(sample_id, columns, vectors))

    def review(self, sample_ids: list[str], review: str, reason: str | None,
               tags: list[str] | None, reviewer: str | None, *,
               from_table: bool = False) -> dict[str, Any]:
        """Record a person's verdict on samples (curate.reviews): 422 for a bad verdict,
        404 naming the ids the table does not hold (`from_table`: ids just read from it,
        a view's, are not looked up again). Written to the reviews table only,
        never to the samples: a run in progress is not disturbed, and the next run (or
        this one, if its verdict phase is still to come) applies it."""
        from curate import reviews
        from curate.table.layout import now

        ids = list(dict.fromkeys(sample_ids))
        try:
            given = reviews.entries(ids, review, reason, tags, reviewer, now())
        except reviews.ReviewError as exc:
            raise CatalogError(422, str(exc)) from None
        if not from_table:
            self._known(ids)
        if review == reviews.TAG:
            try:
                given = reviews.tagged(reviews.latest(self._history(ids)), given)
            except reviews.ReviewError as exc:
                raise CatalogError(422, str(exc)) from None
        version = self.store.add_reviews(given)
        return {"recorded": len(ids), "review": review, "reviews_version": version}

    def _known(self, ids: list[str]) -> None:
        """404 naming the ids the table does not hold, if any."""
        valid = [i for i in ids if SAMPLE_ID.match(i)]
        found = {r["sample_id"] for r in self._by_ids(valid, ["sample_id"])} if valid else set()
        unknown = [i for i in ids if i not in found]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:5])
            raise CatalogError(404, f"{len(unknown)} of the sample_ids are not in "
                               f"{self.store.name}: {shown}{' ...' if len(unknown) > 5 else ''}")

    def matching_ids(self, where: str | None, selected: bool | None,
                     max_rows: int) -> list[str]:
        """The sample ids of a filtered view (a review of all of it), at most `max_rows`
        (400 beyond: the view is to be narrowed)."""
        filt = self._filter(where, selected)
        total = self._count(filt)
        if total > max_rows:
            raise CatalogError(400, f"the view holds {total:,} rows; a review covers at most "
                               f"{max_rows:,} (limits.max_review_rows): narrow the filter")
        return self._scan(columns=["sample_id"], filter=filt)["sample_id"].to_pylist()

    def undo_reviews(self, sample_ids: list[str], reviewer: str | None) -> dict[str, Any]:
        """Take back each sample's last verdict (curate.reviews.undone)."""
        from curate import reviews
        from curate.table.layout import now

        ids = list(dict.fromkeys(sample_ids))
        self._known(ids)
        try:
            given = reviews.undone(self._history(ids), reviews.checked_reviewer(reviewer),
                                   now())
        except reviews.ReviewError as exc:
            raise CatalogError(422, str(exc)) from None
        version = self.store.add_reviews(given) if given.num_rows else \
            self.store.reviews_version()
        return {"undone": given.num_rows, "reviews_version": version}

    def _history(self, ids: list[str]) -> pa.Table:
        return self.store.reviews(filter=ids_in(self._checked_id(i) for i in ids))

    def latest_reviews(self, sample_ids: list[str]) -> dict[str, Any]:
        """Each of the samples' last verdict (none: absent), for badges on a page."""
        from curate import reviews

        ids = list(dict.fromkeys(sample_ids))
        decided = (reviews.latest(self._history(ids)) if ids
                   else reviews.REVIEWS_SCHEMA.empty_table())
        return {"reviews": {r["sample_id"]: clean_row({k: v for k, v in r.items()
                                                       if k != "sample_id"})
                            for r in decided.to_pylist()}}

    def reviews_of(self, sample_id: str) -> dict[str, Any]:
        """Every verdict people gave on one sample, in the order they were recorded."""
        given = self._history([sample_id])
        return {"sample_id": sample_id, "reviews": [clean_row(r) for r in given.to_pylist()]}

    @staticmethod
    def _checked_id(sample_id: str) -> str:
        if not SAMPLE_ID.match(sample_id):
            raise CatalogError(404, f"no sample {sample_id!r}: sample ids are lowercase hex")
        return sample_id

    def known_uri(self, uri: str) -> str | None:
        """The sample_id of the row whose uri is `uri`, if any."""
        escaped = uri.replace("'", "''")
        rows = self._scan(columns=["sample_id"], filter=f"uri = '{escaped}'", limit=1)
        return rows["sample_id"][0].as_py() if rows.num_rows else None

    # --- media -------------------------------------------------------------------------------
    def media(self, sample_id: str, container: str = "mp4") -> tuple[bytes, str]:
        """The bytes a row references and their MIME type; for a clip, just that clip as
        a video (`container` mp4: H.264, webm: VP9). Only bytes whose sha256 is the
        row's content_hash (a clip: its source's) are served: a path changed since ingest
        (a file replaced, a symlink pointed elsewhere) is refused, so no request reads any
        other file."""
        if self._is_clip(sample_id):
            clip, source = self._clip_source(sample_id)
            path = self._clip_cache().clip(source, clip["source_hash"], clip["clip_start_s"],
                                           clip["clip_end_s"], container, clip.get("fps"))
            with open(path, "rb") as fh:
                return fh.read(), MIME[container]
        row = self.sample(sample_id, ["uri", "content_hash", "num_bytes", "format", "error"])
        if row.get("error") or not row.get("content_hash"):
            reason = row.get("error") or "its media was never read"
            raise CatalogError(404, f"sample {sample_id} has no media: {reason}")
        uri, size = row["uri"], int(row["num_bytes"])
        try:
            data = self.reader.read_checked(uri, size, row["content_hash"])
        except MediaError as exc:
            raise CatalogError(410, f"media of {sample_id} cannot be read: {exc}") from None
        return data, MIME.get(row.get("format") or "", "application/octet-stream")

    def tar_member(self, path: str, member: str) -> tuple[int, int]:
        """(offset, size) of a member of a tar shard (listings cached by mtime and size)."""
        return self.reader.tar_member(path, member)

    def _is_clip(self, sample_id: str) -> bool:
        if "clip_start_s" not in self.schema().names:
            return False
        return self.sample(sample_id, ["media_type"]).get("media_type") == "video_clip"

    def _clip_cache(self):
        from curate.media.clipcache import ClipCache

        with self._lock:
            if self._clips is None:
                self._clips = ClipCache()
            return self._clips

    def _clip_source(self, sample_id: str):
        """A clip row and its source video, checked against the hash taken at ingest."""
        row = self.sample(sample_id, list(CLIP_COLUMNS))
        if row.get("error") or not row.get("source_hash"):
            raise CatalogError(404, f"sample {sample_id} has no media: "
                               f"{row.get('error') or 'its video was never read'}")
        try:
            source = self.reader.video_source(row["uri"], row["source_hash"])
        except MediaError as exc:
            raise CatalogError(410, f"media of {sample_id} cannot be read: {exc}") from None
        return row, source

    def clip_frame(self, sample_id: str, at: float, size: int) -> bytes:
        """A JPEG of a clip's frame at fraction `at` (0-1) of its span."""
        from curate.media.clipcache import poster

        row, source = self._clip_source(sample_id)
        start, end = row["clip_start_s"], row["clip_end_s"]
        try:
            return poster(source, start + (end - start) * min(max(at, 0.0), 0.999), size)
        except MediaError as exc:
            raise CatalogError(410, f"media of {sample_id} cannot be decoded: {exc}") from None

    def thumbnail(self, sample_id: str, size: int = 256, at: float = 0.5) -> bytes:
        """A JPEG whose longest side is at most `size` (cached); a clip's is its frame at
        fraction `at` of its span (the middle: the poster)."""
        if self._is_clip(sample_id):
            key = (sample_id, "clip", size, round(at, 3))
            with self._lock:
                if key in self._thumbs:
                    return self._thumbs[key]
            thumb = self.clip_frame(sample_id, at, size)
            with self._lock:
                self._thumbs[key] = thumb
            return thumb
        data, _ = self.media(sample_id)
        key = (sample_id, content_hash(data), size)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            image = decode_image(data, max_pixels=256_000_000, max_side=size).image
        except MediaError as exc:
            raise CatalogError(410, f"media of {sample_id} cannot be decoded: {exc}") from None
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        thumb = out.getvalue()
        with self._lock:
            self._thumbs[key] = thumb
            while len(self._thumbs) > 2048:
                self._thumbs.popitem(last=False)
        return thumb

    # --- duplicates --------------------------------------------------------------------------
    def duplicates(self, sample_id: str) -> dict[str, Any]:
        """The group a sample belongs to: the kept copy and every row that points at it, at
        first or second hand (a copy of a row that a later dedup dropped as a copy of
        another points at that row: the group holds both)."""
        present = [c for c in DUPLICATE_COLUMNS if c in self.schema().names]
        row = self.sample(sample_id, present)
        root = row.get("duplicate_of") or sample_id
        for _ in range(MAX_CHAIN):  # a kept copy that was itself dropped as a copy of another
            parent = self.sample(root, ["duplicate_of"]).get("duplicate_of")
            if not parent or parent == root:
                break
            root = parent
        cols = [c for c in ["sample_id", "uri", "selected", "reject_reason", "width",
                            "height", "content_hash", "error", *present]
                if c in self.schema().names]  # content_hash, error: the gallery's cards
        members = self._scan(columns=cols, filter=f"sample_id = '{root}'").to_pylist()
        seen, frontier = {root}, [root]
        for _ in range(MAX_CHAIN):  # one scan per hand
            if not present or not frontier:
                break
            found = self._scan(columns=cols, filter=" OR ".join(
                ids_in(frontier, c) for c in present)).to_pylist()
            found = [m for m in found if m["sample_id"] not in seen]
            frontier = [m["sample_id"] for m in found]
            seen.update(frontier)
            members += found
        members.sort(key=lambda r: (r["sample_id"] != root, r["sample_id"]))
        for member in members:
            member["via"] = next((c.removesuffix("_duplicate_of") for c in present[1:]
                                  if member.get(c) in seen), None)
        return {"sample_id": sample_id, "kept": root, "members": [clean_row(m) for m in members]}

    # --- search ------------------------------------------------------------------------------
    def vector_of(self, sample_id: str) -> np.ndarray:
        column = self._search_column()
        row = self.sample(sample_id, [column], vectors=True)
        if row.get(column) is None:
            raise CatalogError(404, f"sample {sample_id} has no {column} (its image failed "
                               "or it was not embedded)")
        return np.asarray(row[column], np.float32)

    def _search_column(self) -> str:
        column = self.search_column
        if column not in self.schema().names:
            raise CatalogError(404, f"table {self.store.name} has no {column} column: add a "
                               "clip_embed stage to the pipeline to search it")
        return column

    def search(self, vector: np.ndarray, k: int = 20, where: str | None = None,
               selected: bool | None = None, exclude: str | None = None) -> list[dict]:
        """The k rows nearest `vector` by cosine distance (`_distance`), best first."""
        column = self._search_column()
        filt = self._filter(where, selected)
        cols = [*self.scalar_columns(), "_distance"]  # named: Lance warns otherwise
        query = (self.table().search(vector.tolist(), vector_column_name=column)
                 .distance_type("cosine").limit(k + (1 if exclude else 0)).select(cols)
                 .refine_factor(REFINE))
        if filt:
            query = query.where(filt, prefilter=True)
        try:
            rows = query.to_arrow().to_pylist()
        except (ValueError, OSError, RuntimeError) as exc:
            raise CatalogError(400, f"search failed: {lance_message(exc)}") from None
        rows = [r for r in rows if r["sample_id"] != exclude][:k]
        return [clean_row(r) for r in rows]

    def ensure_vector_index(self, min_rows: int) -> str:
        """The search column's ANN index, built or brought up to date (see
        Store.ensure_vector_index); returns what was done (for logs)."""
        return self.store.ensure_vector_index(self.search_column, min_rows)

    # --- review queues (curate.queues) --------------------------------------------------------
    def _queue_plan(self) -> tuple[int, dict[str, Any], Any, list]:
        """(version, {name: (Queue, stage)}, the queues' pager, the stages of the last
        run's config), kept while the table stays at one version."""
        from curate import queues

        version = self.version()
        with self._lock:
            cached = self._queues
        if cached is not None and cached[0] == version:
            return cached
        last = self.last_run() or {}
        # the last run's histograms rank the scores (a table an older release made has
        # none recorded: one scan, kept with this version)
        histograms = ((last.get("stats") or self.stats()).get("histograms") or {})
        stages = self._run_stages(last.get("config_yaml"))
        by_name = {}
        for queue in queues.plan(stages, self.schema(), histograms):
            by_name[queue.name] = (queue, next((s for s in stages if s.name == queue.stage),
                                               None))
        cached = (version, by_name, queues.Pager(self.dataset(), histograms), stages)
        with self._lock:
            self._queues = cached
        return cached

    @staticmethod
    def _run_stages(config_yaml: str | None) -> list:
        """The stages of a recorded run config (none if it no longer loads: queues of
        limits and dedup stages are then not offered)."""
        import yaml

        from curate.config import ConfigError, load_config, unredacted
        from curate.plan import build_stages

        if not config_yaml:
            return []
        try:
            return build_stages(load_config(unredacted(yaml.safe_load(config_yaml), {})))
        except (ConfigError, ValueError) as exc:
            log.warning("the last run's config does not load; review queues of its "
                        "limits are not offered: %s", exc)
            return []

    def queues(self) -> dict[str, Any]:
        """The review queues this table offers (curate.queues)."""
        _, by_name, _, _ = self._queue_plan()
        return {"queues": [q.to_dict() for q, _ in by_name.values()]}

    def queue(self, name: str, offset: int = 0, limit: int = 50, seed: int = 0,
              size: int | None = None, columns: list[str] | None = None) -> dict[str, Any]:
        """A page of a review queue: rows with `_queue` (what places them there); a
        duplicates queue's rows carry their kept copy as `_kept`; the audit queue adds
        `estimate`, the accept rate of people's verdicts on the whole audit sample."""
        from curate import queues, reviews

        _, by_name, pager, _ = self._queue_plan()
        if name not in by_name:
            known = ", ".join(by_name) if by_name else "this table has none"
            raise CatalogError(404, f"no review queue {name!r}; queues: {known}")
        queue, stage = by_name[name]
        size = queues.AUDIT_SIZE if size is None else size
        try:
            page = pager.page(queue, stage, offset, limit, seed, size)
        except queues.QueueError as exc:
            raise CatalogError(400, str(exc)) from None
        except (ValueError, OSError) as exc:
            raise CatalogError(400, f"queue {name} cannot be read: {lance_message(exc)}") \
                from None
        cols = self._columns(columns, False)
        found = {r["sample_id"]: r for r in self._by_ids([r["sample_id"] for r in page["rows"]],
                                                          cols)}
        rows = []  # a row deleted since the queue was made is left out
        for ranked in page["rows"]:
            if ranked["sample_id"] in found:
                rows.append({**found[ranked["sample_id"]], "_queue": ranked["_queue"]})
        if queue.kind in (queues.DUPLICATES, queues.NEAR):  # pairs: the other row too
            kept = {r["sample_id"]: r for r in self._by_ids(
                sorted({r["_queue"]["kept"] for r in rows}), cols)}
            for row in rows:
                row["_kept"] = clean_row(kept[row["_queue"]["kept"]]) \
                    if row["_queue"]["kept"] in kept else None
        answer = {"queue": queue.to_dict(), "total": page["total"], "more": page["more"],
                  "offset": offset, "limit": limit, "rows": [clean_row(r) for r in rows]}
        if queue.kind == queues.AUDIT:
            ids = [r["sample_id"] for r in pager.page(queue, None, 0, min(size, queues.MAX_DEPTH),
                                                      seed, size)["rows"]]
            answer["estimate"] = self._audit_estimate(ids, reviews, queues)
            answer["seed"] = seed
        return answer

    def whatif(self, name: str, value: float, strip: int = 24,
               columns: list[str] | None = None, funnel: bool = False) -> dict[str, Any]:
        """What moving the limit of threshold queue `name` to `value` changes (see
        curate.queues.what_if); the strips' rows with `columns`; with `funnel`, the last
        run's funnel as it would read (curate.queues.projected_funnel)."""
        from curate import queues
        from curate.stage import GlobalStage

        queue, stage, pager, stages = self._threshold(name)
        others = [s.verdict_column for s in stages if s.verdict_column and s.name != stage.name]
        chain = [(s.name, s.verdict_column) for s in stages]
        try:
            answer = queues.what_if(pager, stage, queue, value, others, strip,
                                    chain if funnel else None)
        except queues.QueueError as exc:
            raise CatalogError(400, str(exc)) from None
        if funnel:
            answer["funnel"] = queues.projected_funnel(
                (self.last_run() or {}).get("stages") or [], stage.name,
                answer.pop("dropped_by"), answer["entering"],
                {s.name for s in stages if isinstance(s, GlobalStage)})
        cols = self._columns(columns, False)
        for side in ("leave", "enter"):
            found = {r["sample_id"]: r for r in self._by_ids(answer[side], cols)}
            answer[side] = [clean_row(found[i]) for i in answer[side] if i in found]
        return answer

    def _threshold(self, name: str) -> tuple[Any, Any, Any, list]:
        """(Queue, stage, pager, the last run's stages) of threshold queue `name`."""
        from curate import queues

        _, by_name, pager, stages = self._queue_plan()
        if name not in by_name or by_name[name][0].kind != queues.THRESHOLD:
            known = ", ".join(n for n, (q, _) in by_name.items() if q.kind == queues.THRESHOLD)
            raise CatalogError(404, f"no threshold queue {name!r}; these: {known or 'none'}")
        queue, stage = by_name[name]
        return queue, stage, pager, stages

    def moved_config(self, name: str, value: float) -> tuple[Any, dict[str, Any]]:
        """The last run's config with the limit of threshold queue `name` moved to
        `value`, pointed at this table (a Config, validated), and what changed: stage,
        param, before, after. Redacted secrets become this store's own."""
        import yaml

        from curate import queues
        from curate.config import ConfigError, load_config, unredacted

        queue, stage, _, _ = self._threshold(name)
        if not math.isfinite(value):
            raise CatalogError(400, f"value {value} is not a finite number")
        try:
            param = queues.limit_param(stage, queue.column, queue.side)
        except queues.QueueError as exc:
            raise CatalogError(400, str(exc)) from None
        last = self.last_run() or {}
        raw = unredacted(yaml.safe_load(last.get("config_yaml") or "{}") or {},
                         self.store.config.media_storage_options)
        entry = next((s for s in raw.get("stages", [])
                      if (s.get("name") or s.get("type")) == stage.name), None)
        if entry is None:  # the queue plan came from this very config
            raise CatalogError(409, f"the last run's config has no stage {stage.name}")
        before = entry.get(param)
        if before is not None and float(before) == value:
            raise CatalogError(400, f"{stage.name}.{param} is {before} already: move the "
                               "limit first")
        entry[param] = value
        raw["store"] = self.store.config.model_dump(mode="json")  # this table, its keys
        try:
            config = load_config(raw)
        except ConfigError as exc:
            problems = "; ".join(f"{key}: {why}" for key, why in exc.problems)
            raise CatalogError(400, f"{stage.name}.{param} = {value} makes the config "
                               f"invalid: {problems}") from None
        return config, {"queue": name, "stage": stage.name, "param": param,
                        "before": before, "after": value}

    def _audit_estimate(self, ids: list[str], reviews, queues) -> dict[str, Any]:
        decided = reviews.latest(self._history(ids)) if ids else None
        verdicts = decided["review"].to_pylist() if decided is not None else []
        accepted, rejected = verdicts.count(reviews.ACCEPT), verdicts.count(reviews.REJECT)
        interval = queues.wilson(accepted, accepted + rejected)
        return {"sample": len(ids), "reviewed": accepted + rejected, "accepted": accepted,
                "rejected": rejected,
                "precision": accepted / (accepted + rejected) if accepted + rejected else None,
                "interval_95": list(interval) if interval else None}

    # --- stats -------------------------------------------------------------------------------
    def stats(self, bins: int = table_stats.BINS) -> dict[str, Any]:
        """Counts by stage and reason, the last run's funnel, histograms, cluster sizes:
        as the last run recorded them when the table is still as it left it (no column is
        read), else from a scan."""
        last = self.last_run()
        recorded = (last or {}).get("stats")
        if not (recorded and recorded.get("bins") == bins
                and last["version_after"] == self.version()):
            schema = self.schema()
            data = self._scan(columns=table_stats.columns_for(schema))
            recorded = table_stats.of_parts(list, _map_here, [data], schema, bins)
        return {
            "table": self.store.name, "store": self.store.uri, "version": self.version(),
            **{k: v for k, v in recorded.items() if k != "bins"},
            "funnel": last.get("stages", []) if last else [],
            "last_run": {k: v for k, v in last.items() if k not in ("stages", "stats")}
            if last else None,
        }

    def last_run(self) -> dict[str, Any] | None:
        runs = [r for r in self.store.runs() if r["status"] == "finished"]
        if not runs:
            return None
        run = runs[-1]
        return {
            "run_id": run["run_id"], "pipeline": run["pipeline"],
            "finished_at": run["finished_at"].isoformat() if run["finished_at"] else None,
            "seconds": run["seconds"], "rows_total": run["rows_total"],
            "rows_processed": run["rows_processed"], "config_yaml": run["config_yaml"],
            "stages": json.loads(run["stages_json"] or "[]"),
            "models": json.loads(run["models_json"] or "[]"),
            "notices": json.loads(run["notices_json"] or "[]"),
            "version_after": run["version_after"],
            "stats": json.loads(run.get("stats_json") or "null"),
        }


def _map_here(parts: list, fn, args: tuple) -> list:
    return [fn(part, *args) for part in parts]


def clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe values: NaN/inf become null, 64-bit hashes become hex strings, times ISO
    8601 text."""
    out = {}
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif key == "phash" and isinstance(value, int):
            value = f"{value:016x}"
        elif isinstance(value, list) and value and isinstance(value[0], float):
            value = [round(v, 7) for v in value]
        out[key] = value
    return out
