"""`curate serve` settings: a YAML file, or the same from command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from curate.config import StoreConfig, _pydantic_problems, read_raw
from curate.errors import ConfigError


class Autoscaling(BaseModel):
    """Serve autoscaling of a deployment; `min_replicas: 0` scales to zero when idle."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="0: no replica (no GPU held) while idle")
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests per replica")
    downscale_delay_s: float = Field(60.0, ge=0, description="idle time before scaling down")

    @model_validator(mode="after")
    def _ordered(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas "
                             f"{self.min_replicas}")
        return self


class ModelHosting(BaseModel):
    """How one model (a stage of the pipeline, or stages sharing a model) is hosted."""

    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(0.5, ge=0, description="CPUs per replica (Ray's scheduling count; "
                        "a model on CPU uses every core for threads)")
    gpus: float = Field(0.0, ge=0, description="GPUs per replica")
    max_batch_size: int = Field(8, ge=1, description="requests batched into one model call")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="wait for a batch to fill")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)


class IngressSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, description="replicas of the HTTP front (API and gallery)")
    cpus: float = Field(0.5, ge=0, description="CPUs per front replica")
    mode: Literal["proxy", "haproxy"] = Field(
        "proxy", description="proxy: Serve's Python HTTP proxy; haproxy: Serve's HAProxy "
        "ingress with direct ingress (one hop less; takes effect where `curate serve` starts "
        "the local Ray)")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_upload_bytes: int = Field(20_000_000, ge=1, description="larger uploads get 413")
    requests_per_second: float | None = Field(
        50.0, gt=0, description="per client address (null: no limit); over it: 429"
    )
    burst: int = Field(100, ge=1, description="requests a client may send at once")
    max_filter_chars: int = Field(1000, ge=1, description="longest `where` filter accepted")
    max_page: int = Field(500, ge=1, description="largest `limit` of /samples")
    max_review_rows: int = Field(100_000, ge=1, description="most rows one review of a "
                                 "filtered view (POST /reviews with `where`) may cover")
    max_jobs: int = Field(1000, ge=1, description="async feature requests queued at most")


class FetchSettings(BaseModel):
    """How POST /features fetches a client's http(s) URL (see curate.serve.egress)."""

    model_config = ConfigDict(extra="forbid")

    allow_hosts: list[str] = Field(
        default_factory=list, description="host names or networks (CIDR) fetched although "
        "they are not public (loopback, private, link-local addresses are refused otherwise)")
    timeout_s: float = Field(10.0, gt=0, description="per request and redirect")


class SearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    column: str = Field("clip_embedding", description="vector column searched")
    index_min_rows: int = Field(
        10_000, ge=1, description="rows with vectors from which an ANN index is built "
        "(below it, search is exact)"
    )
    refresh_s: float = Field(60.0, gt=0, description="how often the index is brought up "
                             "to date with new rows")


class ServeConfig(BaseModel):
    """Everything `curate serve` needs; only `store` is required."""

    model_config = ConfigDict(extra="forbid")

    store: StoreConfig = Field(default_factory=StoreConfig)
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 to expose)")
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = Field(None, min_length=8,
                              description="bearer token every route but /health requires")
    pipeline: str | None = Field(
        None, description="pipeline config whose model stages compute on-demand features "
        "(default: the config of the table's latest run)"
    )
    workdir: str | None = Field(
        None, description="where the runs of applied configs start (their relative paths "
        "resolve from here); default: the directory `curate serve` started in")
    features: list[str] | None = Field(
        None, description="feature columns offered by POST /features (default: every "
        "column the pipeline's row stages compute)"
    )
    models: dict[str, ModelHosting] = Field(
        default_factory=dict, description="hosting per model stage, by stage name "
        "(stages sharing a model use the first one's)"
    )
    default_model: ModelHosting = Field(default_factory=ModelHosting,
                                        description="hosting of model stages not in `models`")
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    limits: Limits = Field(default_factory=Limits)
    search: SearchSettings = Field(default_factory=SearchSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)

    def hosting(self, stage_name: str) -> ModelHosting:
        return self.models.get(stage_name, self.default_model)


def load_serve_config(source: str | Path | dict[str, Any] | None = None,
                      overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """A serve config from YAML (or a dict), with `dotted.key=value` overrides applied."""
    raw, where = read_raw(source, overrides, "a serve config must be a mapping (store, "
                          "host, ...)")
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(exc, "", ServeConfig), where) from None
