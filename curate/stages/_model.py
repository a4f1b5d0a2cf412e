"""What every stage that runs a named model (`params.model`, `params.revision`) shares."""

from __future__ import annotations

import re
from functools import cached_property
from typing import ClassVar

from curate.media import objstore
from curate.models import ModelError, is_local, model_revision, stand_in_notice
from curate.stage import ModelStage


class HubModelStage(ModelStage):
    """A model stage whose model is named by `params.model` (a hub id, a checkpoint
    directory, or a checkpoint's folder in object storage) and `params.revision`: labels
    stand-ins, records the model and its revision, and recomputes rows when the weights
    change (but not when only the device does)."""

    #: The param naming the library that runs the model.
    backend_param: ClassVar[str] = "backend"
    local_path_params = ("model",)  # a local checkpoint directory (or a hub id, left as is)

    @property
    def in_store(self) -> bool:
        return objstore.is_object_uri(self.params.model)

    def preflight(self):
        model = self.params.model
        if self.in_store:
            from curate.models import checkpoints

            try:
                checkpoints.listing(model, self.params.storage_options)
            except ModelError as exc:
                return [("model", str(exc))]
            if self.weights_revision == "objects:unlisted":  # failed a moment ago
                return [("model", f"{model} could not be listed when the run was planned "
                         "(it can be now); run again")]
            return []
        if not is_local(model) and not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
            return [("model", f"{model!r} is neither an existing directory nor a hub id "
                     "like org/name")]
        return []

    @cached_property
    def weights_revision(self) -> str:
        """What pins the weights, taken once where the run starts (it travels with the
        stage to the workers, which load exactly that)."""
        if self.in_store:
            from curate.models import checkpoints

            try:
                return checkpoints.revision(self.params.model, self.params.storage_options)
            except ModelError:  # `preflight` says why, before any work
                return "objects:unlisted"
        return model_revision(self.params.model, self.params.revision)

    def load_revision(self) -> str | None:
        """The revision workers load: the hub commit the run recorded (where the run
        started had the model cached), so every worker loads the weights the record
        names even if the branch moved since; else `params.revision`."""
        revision = self.weights_revision
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            return revision
        return self.params.revision

    def checkpoint(self, weights: bool = True) -> str:
        """Where the model is loaded from: `params.model` itself (a hub id or a local
        directory) or, for a checkpoint in object storage, its copy on this node (the
        config, tokenizer and processor files alone when `weights` is False)."""
        if not self.in_store:
            return self.params.model
        from curate.models import checkpoints

        return str(checkpoints.local_copy(self.params.model, self.params.storage_options,
                                          weights, expected=self.weights_revision))

    def notices(self):
        label = stand_in_notice(self.checkpoint(weights=False))
        return [f"{self.name}: {self.params.model} is a {label}"] if label else []

    def models(self):
        p = self.params
        return [{"stage": self.name, "backend": getattr(p, self.backend_param),
                 "model": p.model, "revision": self.weights_revision}]

    def row_fingerprint(self):
        fingerprint = super().row_fingerprint()  # a score filter's thresholds left out
        fingerprint.pop("device", None)  # where it runs does not change what it computes
        fingerprint["weights"] = self.weights_revision
        return fingerprint
