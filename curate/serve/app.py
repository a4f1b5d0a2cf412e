"""The HTTP front: a FastAPI app as the Serve ingress (API, gallery, OpenAPI spec)."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures of the
# ingress class at runtime, and string annotations of its methods cannot be resolved.


import asyncio
import hmac
import logging
import threading
import time
from importlib import resources
from typing import Annotated, Any
from urllib.parse import unquote

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from curate.catalog import Catalog, CatalogError
from curate.serve.applies import Applies
from curate.serve.config import ServeConfig

log = logging.getLogger(__name__)

#: Paths open without a token: the health check and the gallery's page shell (which holds
#: no data; it asks for the token and sends it with every API call).
PUBLIC = ("/health", "/", "/static/")
STATIC = {"gallery.js": "text/javascript", "gallery.css": "text/css"}
TOKEN_COOKIE = "curate_token"

api = FastAPI(
    title="curate",
    description="Browse, search and compute features of a curated LanceDB table.",
    version="1",
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@api.exception_handler(CatalogError)
async def _catalog_error(request: Request, exc: CatalogError):
    return _error(exc.status, exc.message)


@api.exception_handler(RequestValidationError)
async def _bad_request(request: Request, exc: RequestValidationError):
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
        for e in exc.errors())
    return _error(400, f"bad request: {problems}")


class Gate:
    """Token check, per-client rate limit and upload size limit, before any route."""

    def __init__(self, cfg: ServeConfig):
        self.token = cfg.token
        self.limits = cfg.limits
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def authorised(self, request: Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else \
            unquote(request.cookies.get(TOKEN_COOKIE, ""))
        return hmac.compare_digest(given.encode(), self.token.encode())

    def allow(self, client: str) -> float:
        """0 if the request may go on, else the seconds until it may (token bucket)."""
        rate = self.limits.requests_per_second
        if rate is None:
            return 0.0
        now = time.monotonic()
        with self.lock:
            tokens, then = self.buckets.get(client, (float(self.limits.burst), now))
            tokens = min(float(self.limits.burst), tokens + (now - then) * rate)
            if tokens < 1:
                self.buckets[client] = (tokens, now)
                return (1 - tokens) / rate
            self.buckets[client] = (tokens - 1, now)
        return 0.0

    def refuse(self, request: Request) -> JSONResponse | None:
        """The reply that stops a request before its route, if any."""
        path = request.url.path
        public = path in PUBLIC[:2] or path.startswith(PUBLIC[2])
        if not public and not self.authorised(request):
            return JSONResponse({"error": "missing or wrong token: send Authorization: "
                                 "Bearer <token>"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        wait = self.allow(request.client.host if request.client else "?")
        if wait and path != "/health":
            return JSONResponse({"error": "too many requests; slow down"}, status_code=429,
                                headers={"Retry-After": str(max(1, round(wait)))})
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() \
                and int(length) > self.limits.max_upload_bytes + 64_000:
            return _error(413, f"upload of {int(length):,} bytes; the limit is "
                          f"{self.limits.max_upload_bytes:,} (limits.max_upload_bytes)")
        return None


class GateMiddleware:
    """Runs the gate of the replica (set on the app's state) before every route. A plain
    ASGI middleware: Starlette's BaseHTTPMiddleware costs about a millisecond a request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        gate: Gate | None = getattr(scope["app"].state, "gate", None) \
            if scope["type"] == "http" else None
        reply = gate.refuse(Request(scope)) if gate is not None else None
        if reply is not None:
            await reply(scope, receive, send)
        else:
            await self.app(scope, receive, send)


api.add_middleware(GateMiddleware)


def _json(payload: Any) -> JSONResponse:
    """A reply serialised as is (FastAPI's generic encoder costs more than the lookup)."""
    return JSONResponse(payload)


def _columns(columns: str | None) -> list[str] | None:
    return [c.strip() for c in columns.split(",") if c.strip()] if columns else None


def _reply(result: Any) -> Any:
    """A feature service answer: its payload, or its error as the HTTP status it names."""
    if isinstance(result, dict) and "error" in result and "status" in result:
        return _error(result["status"], result["error"])
    if isinstance(result, dict):
        result = {k: v for k, v in result.items() if k != "status"}
    return result


def _static(name: str) -> str:
    return resources.files("curate.serve").joinpath("static", name).read_text()


SampleIds = list[Annotated[str, Field(max_length=64)]]


class ReviewRequest(BaseModel):
    """A person's verdict on samples: POST /reviews."""

    model_config = ConfigDict(extra="forbid")

    sample_ids: SampleIds | None = Field(None, min_length=1, max_length=10_000,
                                         description="these samples (else the view below)")
    where: str | None = Field(None, description="all rows of this filtered view ...")
    selected: bool | None = Field(None, description="... and/or of the selection or not")
    review: str = Field(description="accept | reject | tag (adds tags, keeps the verdict) "
                        "| clear (takes the verdict back)")
    reason: str | None = Field(None, description="why; a reject needs one")
    tags: list[Annotated[str, Field(max_length=256)]] | None = Field(None, max_length=256)
    reviewer: str | None = Field(None, description="who (else the X-Curate-Reviewer header)")


class UndoRequest(BaseModel):
    """Take back the last verdict on samples: POST /reviews/undo."""

    model_config = ConfigDict(extra="forbid")

    sample_ids: SampleIds = Field(min_length=1, max_length=10_000)
    reviewer: str | None = None


class ApplyRequest(BaseModel):
    """Move a limit and run the config: POST /applies."""

    model_config = ConfigDict(extra="forbid")

    queue: str = Field(description="the limit's threshold queue (GET /queues)")
    value: float = Field(description="the new limit")
    reviewer: str | None = Field(None, description="who (else the X-Curate-Reviewer header)")


def _reviewer(request: Request, given: str | None) -> str | None:
    header = request.headers.get("x-curate-reviewer")  # HTTP headers travel as latin-1
    return header.encode("latin-1").decode("utf-8", "replace") if header else given


# Serve pickles this class by value with the module globals it uses: helpers it calls are
# defined above it.
@serve.ingress(api)
class Api:
    """The ingress replica: reads go straight to LanceDB; model work to the deployments."""

    def __init__(self, cfg: ServeConfig, features=None, text_model=None):
        self.cfg = cfg
        self.catalog = Catalog(cfg.store, cfg.limits.max_filter_chars, cfg.search.column)
        self.applies = Applies(self.catalog, cfg.workdir)
        self.features = features
        self.text_model = text_model  # the model deployment that embeds search text
        api.state.gate = Gate(cfg)
        self.index_state = "not checked yet"
        threading.Thread(target=self._keep_index, daemon=True).start()

    def _keep_index(self) -> None:
        while True:
            try:
                self.index_state = self.catalog.ensure_vector_index(
                    self.cfg.search.index_min_rows)
            except Exception as exc:  # e.g. a concurrent writer; the next round retries
                self.index_state = f"index refresh failed: {exc}"
                log.warning("vector index refresh failed: %s", exc)
            time.sleep(self.cfg.search.refresh_s)

    async def _upload(self, file: UploadFile) -> bytes:
        limit = self.cfg.limits.max_upload_bytes
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise CatalogError(413, f"upload larger than {limit:,} bytes "
                               "(limits.max_upload_bytes)")
        if not data:
            raise CatalogError(400, "the uploaded file is empty")
        return data

    def _need_features(self):
        if self.features is None:
            raise CatalogError(404, "no models are hosted: the table has no recorded run "
                               "config and no --pipeline was given")
        return self.features

    # --- reads -----------------------------------------------------------------------------
    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "table": self.catalog.store.name,
                "version": self.catalog.version(), "vector_index": self.index_state}

    @api.get("/samples")
    def samples(
        self,
        where: Annotated[str | None, Query(description="Lance SQL predicate")] = None,
        selected: bool | None = None,
        order_by: Annotated[str | None, Query(description="column [asc|desc]")] = None,
        limit: Annotated[int, Query(ge=1)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
        columns: Annotated[str | None, Query(description="comma-separated")] = None,
        vectors: bool = False,
    ) -> dict:
        if limit > self.cfg.limits.max_page:
            raise CatalogError(400, f"limit {limit} > {self.cfg.limits.max_page} "
                               "(limits.max_page); page with offset")
        return _json(self.catalog.samples(where, selected, order_by, limit, offset,
                                          _columns(columns), vectors))

    @api.get("/samples/{sample_id}")
    def sample(self, sample_id: str, columns: str | None = None, vectors: bool = False) -> dict:
        return _json(self.catalog.sample(sample_id, _columns(columns), vectors))

    @api.get("/samples/{sample_id}/media")
    def media(self, sample_id: str,
              format: Annotated[str, Query(pattern="^(mp4|webm)$")] = "mp4") -> Response:
        data, mime = self.catalog.media(sample_id, format)
        return Response(data, media_type=mime, headers={"Cache-Control": "max-age=3600"})

    @api.get("/samples/{sample_id}/thumbnail")
    def thumbnail(self, sample_id: str,
                  size: Annotated[int, Query(ge=16, le=1024)] = 256,
                  at: Annotated[float, Query(ge=0, le=1)] = 0.5) -> Response:
        return Response(self.catalog.thumbnail(sample_id, size, at), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @api.get("/samples/{sample_id}/similar")
    def similar(self, sample_id: str, k: Annotated[int, Query(ge=1, le=200)] = 12,
                selected: bool | None = None) -> dict:
        vector = self.catalog.vector_of(sample_id)
        return _json({"sample_id": sample_id, "rows": self.catalog.search(
            vector, k, selected=selected, exclude=sample_id)})

    @api.get("/duplicates/{sample_id}")
    def duplicates(self, sample_id: str) -> dict:
        return self.catalog.duplicates(sample_id)

    @api.get("/stats")
    def stats(self, bins: Annotated[int, Query(ge=2, le=200)] = 20) -> dict:
        return self.catalog.stats(bins)

    # --- people's verdicts (curate.reviews) -------------------------------------------------
    def _page_of_ids(self, ids: list[str]) -> list[str]:
        if len(ids) > self.cfg.limits.max_page:
            raise CatalogError(400, f"{len(ids)} sample_ids > {self.cfg.limits.max_page} "
                               "(limits.max_page); send them in several requests, or review "
                               "the filtered view with `where`")
        return ids

    @api.post("/reviews")
    def review(self, body: ReviewRequest, request: Request) -> dict:
        if body.sample_ids is not None:
            if body.where is not None or body.selected is not None:
                raise CatalogError(400, "give sample_ids or a view (where, selected), not "
                                   "both")
            ids = self._page_of_ids(body.sample_ids)
        elif body.where is None and body.selected is None:
            raise CatalogError(400, "give sample_ids, or a view to review whole: where "
                               "and/or selected")
        else:
            ids = self.catalog.matching_ids(body.where, body.selected,
                                            self.cfg.limits.max_review_rows)
            if not ids:
                raise CatalogError(404, "the view holds no rows")
        return self.catalog.review(ids, body.review, body.reason, body.tags,
                                   _reviewer(request, body.reviewer),
                                   from_table=body.sample_ids is None)

    @api.post("/reviews/undo")
    def undo(self, body: UndoRequest, request: Request) -> dict:
        return self.catalog.undo_reviews(self._page_of_ids(body.sample_ids),
                                         _reviewer(request, body.reviewer))

    @api.get("/reviews")
    def latest_reviews(self, sample_ids: Annotated[str, Query(
            description="comma-separated")]) -> dict:
        ids = _columns(sample_ids)
        if not ids:
            raise CatalogError(400, "give sample_ids: ids separated by commas")
        return _json(self.catalog.latest_reviews(self._page_of_ids(ids)))

    @api.get("/samples/{sample_id}/reviews")
    def reviews_of(self, sample_id: str) -> dict:
        return _json(self.catalog.reviews_of(sample_id))

    @api.get("/queues")
    def queues(self) -> dict:
        return _json(self.catalog.queues())

    @api.get("/whatif/{name}")
    def whatif(self, name: str, value: float,
               strip: Annotated[int, Query(ge=0, le=200)] = 24,
               columns: Annotated[str | None, Query(description="comma-separated")] = None,
               funnel: Annotated[bool, Query(description="also the projected funnel")] = False,
               ) -> dict:
        return _json(self.catalog.whatif(name, value, strip, _columns(columns), funnel))

    @api.post("/applies", status_code=202)
    def apply(self, body: ApplyRequest, request: Request) -> dict:
        return self.applies.start(body.queue, body.value, _reviewer(request, body.reviewer))

    @api.get("/applies")
    def applies_list(self) -> dict:
        return {"applies": self.applies.list()}

    @api.get("/applies/{apply_id}")
    def apply_of(self, apply_id: str) -> dict:
        return self.applies.get(apply_id)

    @api.get("/applies/{apply_id}/config.yaml")
    def apply_config(self, apply_id: str) -> Response:
        body = self.applies.get(apply_id)["config_yaml"] or ""
        return Response(body, media_type="application/yaml", headers={
            "Content-Disposition": f'attachment; filename="{apply_id}.yaml"'})

    @api.get("/queues/{name}")
    def queue(self, name: str, offset: Annotated[int, Query(ge=0)] = 0,
              limit: Annotated[int, Query(ge=1)] = 50, seed: int = 0,
              size: Annotated[int | None, Query(ge=1)] = None,
              columns: Annotated[str | None, Query(description="comma-separated")] = None,
              ) -> dict:
        if limit > self.cfg.limits.max_page:
            raise CatalogError(400, f"limit {limit} > {self.cfg.limits.max_page} "
                               "(limits.max_page); page with offset")
        return _json(self.catalog.queue(name, offset, limit, seed, size, _columns(columns)))

    # --- search ----------------------------------------------------------------------------
    @api.get("/search")
    async def search(self, text: Annotated[str, Query(min_length=1, max_length=1000)],
                     k: Annotated[int, Query(ge=1, le=200)] = 20, where: str | None = None,
                     selected: bool | None = None):
        if self.text_model is None:
            raise CatalogError(404, f"no model embeds text for {self.cfg.search.column}: text "
                               "search needs the pipeline's clip_embed stage")
        vectors = await self.text_model.embed_texts.remote([text])
        rows = await asyncio.to_thread(self.catalog.search, np.asarray(vectors[0], np.float32),
                                       k, where, selected)
        return _json({"text": text, "rows": rows})

    @api.post("/search/image")
    async def search_image(self, file: Annotated[UploadFile, File()],
                           k: Annotated[int, Query(ge=1, le=200)] = 20,
                           where: str | None = None, selected: bool | None = None):
        request = {"upload": await self._upload(file), "upload_search": True}
        result = await self._need_features().compute.remote(request)
        if result.get("status") != 200:
            return _reply(result)
        vector = np.asarray(next(iter(result["features"].values())), np.float32)
        rows = await asyncio.to_thread(self.catalog.search, vector, k, where, selected)
        return {"rows": rows}

    # --- features --------------------------------------------------------------------------
    @api.get("/features")
    async def offered(self) -> dict:
        return {"features": await self._need_features().describe.remote()}

    @api.post("/features")
    async def compute(
        self,
        file: Annotated[UploadFile | None, File(description="the image")] = None,
        uri: Annotated[str | None, Form()] = None,
        sample_id: Annotated[str | None, Form()] = None,
        text: Annotated[str | None, Form(description="caption for text features")] = None,
        features: Annotated[str | None, Form(description="comma-separated")] = None,
        mode: Annotated[str, Query(pattern="^(sync|async)$")] = "sync",
    ):
        service = self._need_features()
        if sum(x is not None for x in (file, uri, sample_id)) != 1:
            raise CatalogError(400, "give exactly one of: file (an upload), uri, sample_id")
        request = {"upload": await self._upload(file) if file is not None else None,
                   "uri": uri, "sample_id": sample_id, "text": text,
                   "features": _columns(features)}
        if mode == "async":
            result = await service.submit.remote(request)
            return JSONResponse(result, status_code=202) if result["status"] == 202 \
                else _reply(result)
        result = await service.compute.remote(request)
        return _reply(result)

    @api.get("/features/{request_id}")
    async def feature_job(self, request_id: str):
        job = await self._need_features().job.remote(request_id)
        if job is None:
            raise CatalogError(404, f"no feature request {request_id!r} (finished requests "
                               "are kept while the service runs)")
        return job

    # --- gallery ---------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(self) -> HTMLResponse:
        return HTMLResponse(_static("index.html"))

    @api.get("/static/{name}", include_in_schema=False)
    def static(self, name: str) -> Response:
        if name not in STATIC:
            raise CatalogError(404, f"no static file {name!r}")
        return Response(_static(name), media_type=STATIC[name])
