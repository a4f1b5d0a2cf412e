"""Assemble the Serve application from a ServeConfig and start it (`curate serve`)."""

from __future__ import annotations

import logging
from typing import Any

from curate.serve.config import ModelHosting, ServeConfig

log = logging.getLogger(__name__)

APP_NAME = "curate"


#: Serve logs one line per request by default; at hundreds of requests per second that
#: logging costs more than the lookups. Warnings and errors are still logged.
LOGGING = {"enable_access_log": False, "log_level": "WARNING"}

#: A replica that stops lets its requests in flight finish, looking every half second
#: (Serve's default: 2 s) whether they have, so that `curate serve` stops in seconds.
SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.5}
#: The front and the feature service (fixed replicas: they stop only with the app) wait
#: for their requests at most 5 s (Serve's default: 20 s), well within curate.stopping's
#: deadline; a model replica keeps Serve's 20 s, as autoscaling may stop it mid-batch.
FRONT_SHUTDOWN = {**SHUTDOWN, "graceful_shutdown_timeout_s": 5.0}


def _options(hosting: ModelHosting, name: str) -> dict[str, Any]:
    scaling = hosting.autoscaling
    return {
        "name": name,
        "logging_config": LOGGING,
        **SHUTDOWN,
        "ray_actor_options": {"num_cpus": hosting.cpus, "num_gpus": hosting.gpus},
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "downscale_delay_s": scaling.downscale_delay_s,
            "upscale_delay_s": 0.0,
        },
        "max_ongoing_requests": max(4, hosting.max_batch_size * 2),
    }


def build_app(cfg: ServeConfig):
    """The application: the HTTP front, the feature service, one deployment per model
    segment of the pipeline (none when no pipeline config is known)."""
    from ray import serve

    from curate.catalog import Catalog
    from curate.serve.app import Api
    from curate.serve.deployments import FeatureService, ModelSegment
    from curate.serve.features import FeaturePlan, pipeline_config

    last = Catalog(cfg.store).last_run()  # a missing table is an error that says so
    config_yaml = last["config_yaml"] if last else None
    config = pipeline_config(cfg.pipeline, config_yaml, cfg.store.media_storage_options)
    ingress = serve.deployment(Api).options(
        num_replicas=cfg.ingress.replicas,
        ray_actor_options={"num_cpus": cfg.ingress.cpus},
        max_ongoing_requests=256, logging_config=LOGGING, **FRONT_SHUTDOWN,
    )
    if config is None:
        log.warning("no pipeline config: POST /features and /search are off")
        return ingress.bind(cfg, None)
    plan = FeaturePlan.from_config(config, cfg.features, also=[cfg.search.column])
    segments = []
    for stages in plan.segments:
        hosting = cfg.hosting(stages[0].name)
        threads = None if hosting.gpus or hosting.cpus < 1 else round(hosting.cpus)
        name = "model-" + "-".join(s.name for s in stages if s.own_pool)
        segments.append(serve.deployment(ModelSegment).options(**_options(hosting, name)).bind(
            stages, cfg.search.column, hosting.max_batch_size, hosting.batch_wait_timeout_s,
            threads))
    features = serve.deployment(FeatureService).options(
        name="features", num_replicas=1, max_ongoing_requests=cfg.limits.max_jobs + 64,
        ray_actor_options={"num_cpus": 0}, logging_config=LOGGING, **FRONT_SHUTDOWN,
    ).bind(cfg, config_yaml, segments)
    index = plan.columns.get(cfg.search.column, -1)
    return ingress.bind(cfg, features, segments[index] if index >= 0 else None)


def start(cfg: ServeConfig, address: str | None = None, route_prefix: str = "/") -> str:
    """Deploy the application on Ray Serve; returns the base URL."""
    import os

    import ray
    from ray import serve

    from curate.engine.backend import connect

    if cfg.ingress.mode == "haproxy" and not ray.is_initialized():
        # read by Serve's controller and replicas, which inherit the environment of the
        # local Ray started here (a running cluster needs them set where it was started)
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    if cfg.workdir is None:  # the replicas run elsewhere: tell them where we are
        cfg = cfg.model_copy(update={"workdir": os.getcwd()})
    connect(address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=LOGGING)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=route_prefix, blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{route_prefix.rstrip('/')}"


def stop() -> None:
    """Shut Serve down (its controller, proxies and replicas), if this process started or
    joined a Ray cluster."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
