"""The Serve deployments behind the API: one per model segment of the pipeline, and the
feature service (the queue in front of them, which also keeps results: see
`curate.table.features.FeatureCache`)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

import pyarrow as pa
from ray import serve

from curate.catalog import Catalog, CatalogError
from curate.engine.workers import SegmentWorker
from curate.media.decode import MediaError
from curate.serve.config import ServeConfig
from curate.serve.features import (
    RETRY_S,
    Decoder,
    FeaturePlan,
    listing,
    pipeline_config,
    run_segment,
    sized,
    text_embedder,
    upload_id,
)
from curate.stages.image.ingest_images import sample_id_for
from curate.table.features import FeatureCache

log = logging.getLogger(__name__)


class ModelSegment:
    """Model stages (and the cheap stages after them) of one pool of the pipeline, with
    requests batched into model calls."""

    def __init__(self, stages, search_column: str, max_batch_size: int,
                 batch_wait_timeout_s: float, threads: int | None):
        self.worker = SegmentWorker(sized(stages, max_batch_size), [], last=False,
                                    row_stages_hash="", threads=threads)
        self.search_column = search_column
        self.run.set_max_batch_size(max_batch_size)
        self.run.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def run(self, tables: list[pa.Table]) -> list[pa.Table]:
        return await asyncio.to_thread(run_segment, self.worker, tables)

    async def embed_texts(self, texts: list[str]) -> list[list[float]]:
        embedder = text_embedder(self.worker.stages, self.search_column)
        vectors = await asyncio.to_thread(embedder.embed_texts, texts)
        return vectors.tolist()


class FeatureService:
    """Computes features for one image (a row of the table, a URL or an upload), keeps
    them by sample_id (into the row under the run lease, see FeatureCache), and queues
    asynchronous requests. One replica: it holds the job list and the cache's writes; the
    model work scales in the segment deployments."""

    def __init__(self, cfg: ServeConfig, config_yaml: str | None, segments: list):
        config = pipeline_config(cfg.pipeline, config_yaml, cfg.store.media_storage_options)
        self.cfg = cfg
        self.plan = FeaturePlan.from_config(config, cfg.features, also=[cfg.search.column])
        self.offered = list(cfg.features if cfg.features is not None else self.plan.columns)
        self.decoder = Decoder(self.plan)
        self.segments = segments
        self.catalog = Catalog(cfg.store)
        self.store = self.catalog.store
        self.cache = FeatureCache(self.store, self.plan.types)
        self.jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.write_lock = asyncio.Lock()
        self.retry: asyncio.Task | None = None  # merges values kept while a run ran

    def describe(self) -> dict[str, Any]:
        return {name: str(self.plan.types.get(name)) for name in self.offered}

    # --- one request ---------------------------------------------------------------------
    async def compute(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.retry is None:  # values an earlier server kept aside: merged when free
            self._retry_later()
        try:
            return await self._compute(request)
        except CatalogError as exc:
            return {"status": exc.status, "error": exc.message}

    async def _compute(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("upload_search"):
            wanted = [self.cfg.search.column]
            if wanted[0] not in self.plan.columns:
                raise CatalogError(404, f"the pipeline computes no {wanted[0]}; image search "
                                   "needs its clip_embed stage")
        else:
            wanted = request.get("features") or self.offered
            unknown = [f for f in wanted if f not in self.offered]
            if unknown:
                raise CatalogError(400, f"unknown features {', '.join(unknown)}; offered: "
                                   + ", ".join(self.offered))
        sample_id, uri, text, known, stored = await asyncio.to_thread(self._identify, request,
                                                                      wanted)
        cached = {k: v for k, v in stored.items() if k in wanted and v is not None}
        missing = [f for f in wanted if f not in cached]
        computed: dict[str, Any] = {}
        kept = None
        if missing:
            computed = await self._run(sample_id, uri, text, missing, request.get("upload"))
            kept = await self._cache(sample_id, uri, known, computed)
        features = {f: cached.get(f, computed.get(f)) for f in wanted}
        answer = {"status": 200, "sample_id": sample_id, "uri": uri, "in_table": known,
                  "features": features, "computed": missing, "cached": list(cached),
                  "stored": kept}
        if kept == "pending":
            answer["note"] = (f"a run holds the lease of table {self.store.name}: the "
                              f"computed values are kept in {self.cache.side_name} and "
                              "written into the row when the run ends")
        return answer

    def _identify(self, request: dict[str, Any], wanted: list[str]):
        """(sample_id, uri, text, is a row of the table, stored feature values)."""
        text = request.get("text")
        upload = request.get("upload")
        if upload is not None:
            sample_id, uri = upload_id(hashlib.sha256(upload).hexdigest())
            return sample_id, uri, text, False, self.cache.side_values(sample_id, wanted)
        sample_id = request.get("sample_id")
        uri = request.get("uri")
        if sample_id is None and uri:
            sample_id = self.catalog.known_uri(uri)
            if sample_id is None and uri.startswith(("http://", "https://")):
                sample_id = sample_id_for(uri)
                return sample_id, uri, text, False, self.cache.side_values(sample_id, wanted)
            if sample_id is None:
                raise CatalogError(400, f"uri {uri!r} is not a row of the table; give an "
                                   "http(s) URL, a sample_id, or upload the image")
        if sample_id is None:
            raise CatalogError(400, "give an image upload (file), a uri, or a sample_id")
        present = [c for c in wanted if c in self.catalog.schema().names]
        row = self.catalog.row(sample_id, ["uri", "alt_text", *present])
        values = {c: row[c] for c in present if row[c] is not None}
        if len(values) < len(wanted):  # computed while a run held the lease: kept aside
            values = {**self.cache.side_values(sample_id, wanted), **values}
        return (sample_id, row["uri"], text if text is not None else row["alt_text"], True,
                values)

    async def _run(self, sample_id: str, uri: str, text: str | None, missing: list[str],
                   upload: bytes | None) -> dict[str, Any]:
        offset = size = -1
        path, sep, member = uri.partition("#")
        if sep and path.lower().endswith(".tar") and upload is None:
            try:
                offset, size = await asyncio.to_thread(self.catalog.tar_member, path, member)
            except MediaError:
                pass  # the source stage reports the missing member as the row's error
        if upload is None and uri.startswith(("http://", "https://")) \
                and self.catalog.known_uri(uri) is None:
            upload = await asyncio.to_thread(self._fetch, uri)  # a client's URL: guarded
        rows = listing(sample_id, uri, text, offset, size)
        batch = await asyncio.to_thread(self.decoder, rows, upload)
        error = batch["error"][0].as_py()
        if error:
            raise CatalogError(422, f"cannot compute features of {uri}: {error}")
        for index in range(self.plan.needs(missing)):
            batch = await self.segments[index].run.remote(batch)
        return {f: batch[f][0].as_py() for f in missing}

    def _fetch(self, uri: str) -> bytes:
        from curate.serve.egress import EgressPolicy, Refused, fetch

        policy = EgressPolicy(tuple(self.cfg.fetch.allow_hosts), self.cfg.fetch.timeout_s)
        try:
            return fetch(uri, self.cfg.limits.max_upload_bytes, policy)
        except Refused as exc:
            raise CatalogError(exc.status, f"not fetched: {exc}") from None

    async def _cache(self, sample_id: str, uri: str, known: bool,
                     values: dict[str, Any]) -> str | None:
        """Keep computed values (see FeatureCache.put); returns where they went."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return None
        schema = pa.schema([("sample_id", pa.string())]
                           + [(k, self.plan.types[k]) for k in values])
        row = pa.Table.from_pylist([{"sample_id": sample_id, **values}], schema=schema)
        async with self.write_lock:
            stored = await asyncio.to_thread(self.cache.put, row, uri, known)
        if stored == "pending":
            log.info("a run holds the lease of table %s: features of %s kept in %s until "
                     "it ends", self.store.name, sample_id, self.cache.side_name)
            self._retry_later()
        self.catalog.refresh()  # the next request sees what was just cached
        return stored

    async def flush(self) -> bool:
        """Merge values kept while a run held the lease into the table, if the lease is
        free now; False while it is not."""
        async with self.write_lock:
            done = await asyncio.to_thread(self.cache.flush)
        if done:
            self.catalog.refresh()
        return done

    def _retry_later(self) -> None:
        if self.retry is None or self.retry.done():
            self.retry = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        while True:
            await asyncio.sleep(RETRY_S)
            try:
                if await self.flush():
                    return
            except Exception:  # a storage fault: they stay kept, the next try may work
                log.exception("features kept beside table %s not merged yet",
                              self.store.name)

    # --- asynchronous requests -----------------------------------------------------------
    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        pending = sum(1 for j in self.jobs.values() if j["status"] == "pending")
        if pending >= self.cfg.limits.max_jobs:
            return {"status": 429, "error": f"{pending} feature requests are queued "
                    f"(limits.max_jobs); retry later"}
        job_id = uuid.uuid4().hex
        self.jobs[job_id] = {"status": "pending", "request_id": job_id,
                             "submitted_at": time.time()}
        while len(self.jobs) > 10 * self.cfg.limits.max_jobs:
            self.jobs.popitem(last=False)
        asyncio.get_running_loop().create_task(self._job(job_id, request))
        return {"status": 202, "request_id": job_id, "state": "pending"}

    async def _job(self, job_id: str, request: dict[str, Any]) -> None:
        try:
            result = await self.compute(request)
        except Exception as exc:  # a crashed model replica: the job says so
            log.exception("feature request %s failed", job_id)
            result = {"status": 500, "error": f"feature computation failed: {exc}"}
        job = self.jobs.get(job_id)
        if job is not None:
            job.update(status="done" if result["status"] == 200 else "failed",
                       result=result, finished_at=time.time())

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self.jobs.get(job_id)
