"""curate: Ray-native curation of image and video training data into one LanceDB table."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Config", "Pipeline", "RunSummary", "__version__", "load_config"]

if TYPE_CHECKING:
    from curate.config import Config, load_config
    from curate.engine.run import RunSummary
    from curate.pipeline import Pipeline

_LAZY = {"Config": "curate.config", "load_config": "curate.config",
         "Pipeline": "curate.pipeline", "RunSummary": "curate.engine.run"}


def __getattr__(name: str):
    # Lazy, so Ray workers that unpickle a stage do not import LanceDB and the engine.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'curate' has no attribute {name!r}")
