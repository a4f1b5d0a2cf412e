"""What every stage that runs a named model (`params.model`, `params.revision`) shares."""

from __future__ import annotations

import re
from typing import ClassVar

from curate.models import is_local, model_revision, stand_in_notice
from curate.stage import ModelStage


class HubModelStage(ModelStage):
    """A model stage whose model is named by `params.model` (a hub id or a checkpoint
    directory) and `params.revision`: labels stand-ins, records the model and its
    revision, and recomputes rows when the weights change (but not when only the device
    does)."""

    #: The param naming the library that runs the model.
    backend_param: ClassVar[str] = "backend"
    local_path_params = ("model",)  # a local checkpoint directory (or a hub id, left as is)

    def preflight(self):
        model = self.params.model
        if not is_local(model) and not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
            return [("model", f"{model!r} is neither an existing directory nor a hub id "
                     "like org/name")]
        return []

    def notices(self):
        label = stand_in_notice(self.params.model)
        return [f"{self.name}: {self.params.model} is a {label}"] if label else []

    def models(self):
        p = self.params
        return [{"stage": self.name, "backend": getattr(p, self.backend_param),
                 "model": p.model, "revision": model_revision(p.model, p.revision)}]

    def row_fingerprint(self):
        fingerprint = super().row_fingerprint()  # a score filter's thresholds left out
        fingerprint.pop("device", None)  # where it runs does not change what it computes
        fingerprint["weights"] = model_revision(self.params.model, self.params.revision)
        return fingerprint
