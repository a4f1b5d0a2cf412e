"""Built-in stages, one module per stage type: curate/stages/<modality>/<type>.py (image,
video, table); `curate.registry.BUILTIN` lists them.

`from curate.stages import IngestImages` works for every built-in class; importing this
package imports none of them: each is imported when it is first asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from curate.registry import builtin_classes

__all__ = sorted(builtin_classes())


def __getattr__(name: str) -> Any:
    path = builtin_classes().get(name)
    if path is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = path.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
