"""Stage registry: `@register` built-in stages, and plugins through entry points.

A plugin package declares stages under the `curate.stages` entry-point group:

    [project.entry-points."curate.stages"]
    my_filter = "my_package.stages:MyFilter"
"""

from __future__ import annotations

from importlib.metadata import entry_points

from curate.stage import Stage

_STAGES: dict[str, type[Stage]] = {}
_loaded = False


def register(type_name: str):
    """Class decorator adding a Stage subclass to the registry under `type_name`."""

    def decorate(cls: type[Stage]) -> type[Stage]:
        if type_name in _STAGES and _STAGES[type_name] is not cls:
            raise ValueError(f"stage type {type_name!r} is registered twice")
        cls.type = type_name
        _STAGES[type_name] = cls
        return cls

    return decorate


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import curate.stages  # noqa: F401  (registers the built-in stages)

    for ep in entry_points(group="curate.stages"):
        cls = ep.load()
        register(ep.name)(cls)


def stage_types() -> dict[str, type[Stage]]:
    """Every registered stage type, by name."""
    _load()
    return dict(sorted(_STAGES.items()))


def get_stage_class(type_name: str) -> type[Stage]:
    types = stage_types()
    if type_name not in types:
        raise KeyError(type_name)
    return types[type_name]
