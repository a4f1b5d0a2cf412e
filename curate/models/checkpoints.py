"""Checkpoints and weights files kept in object storage (`s3://`, `gs://`, `az://`).

A checkpoint directory in a bucket (`s3://models/siglip-so400m/`) is pinned by its listing:
every object's key, size and version tag, hashed. The node that loads it keeps a local copy
under the cache (`$CURATE_CACHE`, default `~/.cache/curate`), named by that hash, made once
per node and shared by every worker there: the libraries that load checkpoints
(transformers, vLLM, open_clip) read local files only. A copy is written to a temporary
folder and renamed into place whole, under a lock, so a worker never sees half of one and
the workers of a node download it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from curate.media import objstore
from curate.media.decode import MediaError
from curate.models import ModelError

#: Files that hold weights: what a node that only preprocesses (config, tokenizer,
#: processor files) does not need.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx",
                   ".msgpack", ".h5", ".npz")


def cache_root() -> Path:
    return Path(os.environ.get("CURATE_CACHE", "~/.cache/curate")).expanduser()


def listing(uri: str, options: dict | None) -> list[tuple[str, int, str]]:
    """(key under `uri`, size, version tag) of every object of a checkpoint directory."""
    start = len(uri.rstrip("/")) + 1
    try:
        found = [(u[start:], size, tag) for page in objstore.list_pages(uri, options, tags=True)
                 for u, size, tag in page]
    except MediaError as exc:
        raise ModelError(f"cannot list the checkpoint: {exc.detail}") from None
    if not found:
        raise ModelError(f"{uri} holds no objects; name the folder of a checkpoint (the one "
                         "holding config.json)")
    return found


def revision(uri: str, options: dict | None) -> str:
    """What pins a checkpoint in object storage: a hash of its listing (a file written
    again changes its version tag, so the revision)."""
    return "objects:" + _digest(listing(uri, options))


def _digest(found: list[tuple[str, int, str]]) -> str:
    return hashlib.sha256(json.dumps(sorted(found)).encode()).hexdigest()[:16]


def local_copy(uri: str, options: dict | None, weights: bool = True,
               expected: str | None = None) -> Path:
    """A local copy of the checkpoint directory at `uri` on this node, made once (without
    the weight files when `weights` is False). `expected`: the revision the run started
    with; a checkpoint written again since is refused rather than mixed into one run."""
    found = listing(uri, options)
    digest = _digest(found)
    if expected is not None and expected != "objects:" + digest:
        raise ModelError(f"the checkpoint {uri} was written again since the run started "
                         f"(it was {expected}, it is objects:{digest}); run again")
    wanted = [item for item in found if weights or not item[0].endswith(WEIGHT_SUFFIXES)]
    target = cache_root() / "checkpoints" / (digest + ("" if weights else "-config"))
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one copy per node: the workers of a pool start together, and the first to hold the
    # lock copies while the others wait for it (an advisory lock, freed if it dies)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        part = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-")
        try:
            for key, _, tag in wanted:
                path = os.path.join(part, *key.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                objstore.download(f"{uri.rstrip('/')}/{key}", options, path, tag)
            os.rename(part, target)
        except MediaError as exc:
            raise ModelError(f"cannot copy the checkpoint: {exc.detail}") from None
        finally:
            shutil.rmtree(part, ignore_errors=True)
    return target


def local_file(uri: str, options: dict | None, folder: str, name: str | None = None,
               tag: str | None = None) -> Path:
    """A local copy of one object (a weights file) under the cache's `folder`, made once;
    `name` defaults to the object's. The caller checks its content (a sha256) or names
    the version it wants (`tag`)."""
    path = cache_root() / folder / (name or uri.rstrip("/").rpartition("/")[2] or "weights")
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        pass
    try:
        objstore.download(uri, options, tmp.name, tag)
        os.replace(tmp.name, path)
    except MediaError as exc:
        raise ModelError(f"cannot copy the weights: {exc.detail}") from None
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return path
