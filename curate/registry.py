"""Stage registry: the built-in stage types, each in a module of its own imported on first
use, and plugins through entry points.

A built-in stage type T is the class `T` names in `BUILTIN` ("module:Class", one file per
type under curate/stages/<modality>/T.py); adding one is a new file and a line here. Each
stage class says its own `type`, which must match the name it is registered under.

A plugin package declares stages under the `curate.stages` entry-point group:

    [project.entry-points."curate.stages"]
    my_filter = "my_package.stages:MyFilter"

A plugin class without a `type` of its own gets the entry point's name. Nothing here
imports a stage module, or a plugin's, before its type is asked for.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from curate.stage import Stage

#: Built-in stage types: type -> "module:Class".
BUILTIN: dict[str, str] = {
    "ingest_images": "curate.stages.image.ingest_images:IngestImages",
    "image_quality": "curate.stages.image.image_quality:ImageQuality",
    "clip_embed": "curate.stages.image.clip_embed:ClipEmbed",
    "clip_score": "curate.stages.image.clip_score:ClipScore",
    "aesthetic_score": "curate.stages.image.aesthetic_score:AestheticScore",
    "nsfw_score": "curate.stages.image.nsfw_score:NsfwScore",
    "caption": "curate.stages.image.caption:Caption",
    "vlm_score": "curate.stages.image.vlm_score:VlmScore",
    "ingest_videos": "curate.stages.video.ingest_videos:IngestVideos",
    "split_clips": "curate.stages.video.split_clips:SplitClips",
    "transcode": "curate.stages.video.transcode:Transcode",
    "motion_score": "curate.stages.video.motion_score:MotionScore",
    "exact_dedup": "curate.stages.table.exact_dedup:ExactDedup",
    "phash_dedup": "curate.stages.table.phash_dedup:PhashDedup",
    "semantic_dedup": "curate.stages.table.semantic_dedup:SemanticDedup",
    "diversity_sample": "curate.stages.table.diversity_sample:DiversitySample",
}

ENTRY_POINT_GROUP = "curate.stages"

#: Stage classes loaded so far, and those registered at run time (`register`), by type.
_STAGES: dict[str, type[Stage]] = {}
_plugins: dict[str, EntryPoint] | None = None


def register(type_name: str):
    """Class decorator adding a Stage subclass to the registry under `type_name`, in this
    process only (tests; a package's stages belong in BUILTIN or its entry points)."""

    def decorate(cls: type[Stage]) -> type[Stage]:
        known = _STAGES.get(type_name)
        if (known is not None and known is not cls) or type_name in BUILTIN \
                or type_name in _plugin_entry_points():
            raise ValueError(f"stage type {type_name!r} is registered twice")
        cls.type = type_name
        _STAGES[type_name] = _checked(cls, type_name, cls.__name__)
        return cls

    return decorate


def _plugin_entry_points() -> dict[str, EntryPoint]:
    """The `curate.stages` entry points by name (found once; none is loaded here)."""
    global _plugins
    if _plugins is None:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if found.get(ep.name, ep).value != ep.value or (
                    ep.name in BUILTIN and ep.value != BUILTIN[ep.name]):
                raise ValueError(f"stage type {ep.name!r} is registered twice")
            if ep.name not in BUILTIN:
                found[ep.name] = ep
        _plugins = found
    return _plugins


def _checked(cls: type[Stage], type_name: str, where: str) -> type[Stage]:
    if getattr(cls, "type", None) != type_name:
        raise ValueError(f"{where} is registered as stage type {type_name!r} but its type is "
                         f"{getattr(cls, 'type', None)!r}")
    from curate.stage import GlobalStage, RowStage, Source

    if not issubclass(cls, (Source, RowStage, GlobalStage)):
        raise ValueError(f"{where}: {cls.__name__} takes none of the stage roles; subclass "
                         "one of curate.stage's Source, RowStage, ModelStage, FanOut or "
                         "GlobalStage")
    return cls


def _load_builtin(type_name: str) -> type[Stage]:
    module, _, name = BUILTIN[type_name].partition(":")
    return _checked(getattr(importlib.import_module(module), name), type_name,
                    BUILTIN[type_name])


def _load_plugin(ep: EntryPoint) -> type[Stage]:
    cls = ep.load()
    if "type" not in vars(cls):  # as a plugin may leave it: named by its entry point
        cls.type = ep.name
    return _checked(cls, ep.name, f"entry point {ep.name} = {ep.value}")


def stage_type_names() -> list[str]:
    """Every stage type's name, sorted, without importing any stage."""
    return sorted({*BUILTIN, *_STAGES, *_plugin_entry_points()})


def get_stage_class(type_name: str) -> type[Stage]:
    """The class of one stage type; imports its module (only) the first time."""
    cls = _STAGES.get(type_name)
    if cls is None:
        if type_name in BUILTIN:
            cls = _load_builtin(type_name)
        elif type_name in _plugin_entry_points():
            cls = _load_plugin(_plugin_entry_points()[type_name])
        else:
            raise KeyError(type_name)
        _STAGES[type_name] = cls
    return cls


def stage_types() -> dict[str, type[Stage]]:
    """Every stage type, by name (sorted); imports every stage module."""
    return {name: get_stage_class(name) for name in stage_type_names()}


def builtin_classes() -> dict[str, str]:
    """Class name -> "module:Class" of each built-in stage (curate.stages' lazy names)."""
    return {path.rpartition(":")[2]: path for path in BUILTIN.values()}
