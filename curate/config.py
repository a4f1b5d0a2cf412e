"""Configs: YAML (or a dict) parsed into pydantic models; every mistake named by key path."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    StringConstraints,
    ValidationError,
)

from curate.errors import ConfigError
from curate.media.objstore import checked
from curate.registry import get_stage_class, stage_type_names
from curate.stage import StageParams


class StoreConfig(BaseModel):
    """Where the table lives."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field("./curate_data", description="LanceDB database: a directory or s3://...")
    table: str = Field("samples", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="passed to LanceDB (object-store credentials, ...)"
    )
    media_storage_options: Annotated[dict[str, str], AfterValidator(checked)] = Field(
        default_factory=dict, description="how serve, export and LanceDataset reach media "
        "rows in object storage (s3://, gs://, az:// uris): the keys a source's "
        "storage_options take; empty: the environment's credentials")


class RunConfig(BaseModel):
    """How a run executes."""

    model_config = ConfigDict(extra="forbid")

    commit_every: int = Field(
        1000, ge=1, description="rows buffered on the driver between two table commits"
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto' on a cluster node); default: local Ray"
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs a run on this machine uses (default: all)")
    executor: Literal["auto", "ray", "local"] = Field(
        "auto", description="ray: Ray Data pools and Ray tasks (a local Ray when no "
        "ray_address); local: threads in this process; auto: local when no cluster is "
        "given and no stage asks for GPUs, until more than local_max_inputs inputs are "
        "left to read; else ray")
    local_max_inputs: int = Field(
        20_000, ge=0, description="executor auto: the most inputs a run reads without Ray")
    retry_errors: list[Annotated[str, StringConstraints(pattern=r"^[a-z_]+$")]] = Field(
        default_factory=list,
        description="error codes (e.g. corrupt, truncated) whose rows this run reads again, "
        "as every run does for http_timeout and http_error: files fixed at their source, or "
        "refused by an earlier release")


class Config(BaseModel):
    """A whole pipeline: name, store, run settings and the ordered stages."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    store: StoreConfig = Field(default_factory=StoreConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    stages: list[SerializeAsAny[StageParams]]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The config as the run record keeps it: secrets in storage options redacted."""
        return yaml.safe_dump(redacted(self.to_dict()), sort_keys=False)

    def config_hash(self) -> str:
        """Hash of everything that can change the table (not where it is or how it runs,
        nor the keys it reads with: rotated secrets leave a table up to date)."""
        body = redacted(self.to_dict())
        body.pop("run", None)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


#: Words of option names that hold a secret (`aws_secret_access_key`, `aws_session_token`,
#: `azure_storage_account_key`, `google_service_account_key`, `azure_client_secret`, ...).
SECRET_WORDS = ("secret", "token", "password", "_key", "sas")


def redacted(value: Any) -> Any:
    """`value` with the secrets of every `*storage_options` mapping in it replaced by
    `<redacted>` (key ids, regions and endpoints kept: they say where, not who)."""
    if isinstance(value, list):
        return [redacted(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if str(key).endswith("storage_options") and isinstance(item, dict):
            item = {k: REDACTED if any(w in str(k).lower() for w in SECRET_WORDS)
                    and not str(k).lower().endswith("_key_id") else v
                    for k, v in item.items()}
        out[key] = redacted(item)
    return out


REDACTED = "<redacted>"


def unredacted(value: Any, options: dict[str, str]) -> Any:
    """A recorded config (`redacted`) made usable again: every `storage_options` that
    lost a secret becomes `options` (the reader's own, e.g. store.media_storage_options;
    empty: the environment's credentials)."""
    if isinstance(value, list):
        return [unredacted(v, options) for v in value]
    if not isinstance(value, dict):
        return value
    return {key: dict(options) if str(key).endswith("storage_options") and isinstance(
        item, dict) and REDACTED in item.values() else unredacted(item, options)
        for key, item in value.items()}


# --- loading -----------------------------------------------------------------------------


def load_config(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Parse a YAML file (or a dict), apply `key.path=value` overrides, validate."""
    raw, where = read_raw(source, overrides, "a config must be a mapping with 'name' and "
                          "'stages'")
    return parse_config(raw, where)


def read_raw(source: str | Path | dict[str, Any] | None, overrides: list[str] | tuple[str, ...],
             shape: str) -> tuple[dict[str, Any], str | None]:
    """A YAML file (or a dict, copied) as a dict with overrides applied, and where it came
    from; `shape` says what a config must look like when it is not a mapping."""
    where = None
    if source is None:
        raw: Any = {}
    elif isinstance(source, dict):
        raw = json.loads(json.dumps(source))  # deep copy; overrides must not touch the caller's
    else:
        where = str(source)
        path = Path(source)
        if not path.is_file():
            raise ConfigError([("", f"config file {where} does not exist")], where)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError([("", f"not valid YAML: {exc}")], where) from None
    if not isinstance(raw, dict):
        raise ConfigError([("", shape)], where)
    for item in overrides:
        apply_override(raw, item, where)
    return raw, where


def apply_override(raw: dict[str, Any], item: str, where: str | None = None) -> None:
    """Set `dotted.key=value` in a raw config; the value is read as YAML (`4`, `true`, `[a]`)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError([(key, f"override {item!r} must look like dotted.key=value")], where)
    value = yaml.safe_load(text) if text.strip() else text
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        so_far = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    [(so_far, f"no list item {part!r} (the list has {len(node)} items)")], where
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError([(so_far, "cannot set a key inside a plain value")], where)


def parse_config(raw: dict[str, Any], where: str | None = None) -> Config:
    """Validate a raw config dict; collect every problem before raising."""
    problems: list[tuple[str, str]] = []
    stages_raw = raw.get("stages")
    parsed_stages: list[StageParams] = []
    if not isinstance(stages_raw, list) or not stages_raw:
        problems.append(("stages", "a non-empty list of stages is required"))
    else:
        for i, item in enumerate(stages_raw):
            params = _parse_stage(item, f"stages.{i}", problems)
            if params is not None:
                parsed_stages.append(params)
    top = {k: v for k, v in raw.items() if k != "stages"}
    try:
        base = Config.model_validate({**top, "stages": []})
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, "", Config))
        base = None
    if problems:
        raise ConfigError(problems, where)
    assert base is not None
    config = base.model_copy(update={"stages": parsed_stages})
    from curate.plan import check_stage_columns

    check_stage_columns(config, where)
    return config


def _parse_stage(item: Any, path: str, problems: list[tuple[str, str]]) -> StageParams | None:
    known = stage_type_names()  # only the stages a config names are imported
    if not isinstance(item, dict):
        problems.append((path, f"a stage must be a mapping with a 'type', got {item!r}"))
        return None
    kind = item.get("type")
    if kind is None:
        problems.append((f"{path}.type", f"missing; known stage types: {', '.join(known)}"))
        return None
    if kind not in known:
        close = difflib.get_close_matches(str(kind), list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(
            (f"{path}.type", f"unknown stage type {kind!r}{hint}; known: {', '.join(known)}")
        )
        return None
    model = get_stage_class(kind).Params
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, path, model))
        return None


def _pydantic_problems(
    exc: ValidationError, prefix: str, model: type[BaseModel]
) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join([prefix, *loc] if prefix else loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            reason = f"unknown key{hint}; allowed: {', '.join(allowed)}"
        elif err["type"] == "missing":
            reason = "required key is missing"
        elif err["type"] == "value_error":  # our own validators say what they got
            reason = err["msg"].removeprefix("Value error, ")
        else:
            reason = f"{err['msg']} (got {err.get('input')!r})"
        out.append((path, reason))
    return out


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)
