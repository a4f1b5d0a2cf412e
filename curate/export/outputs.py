"""Where an export writes: a local folder, or a prefix in object storage (`s3://`, `gs://`,
`az://`) written through the store with multipart uploads."""

from __future__ import annotations

import os
from dataclasses import dataclass

from curate.media import objstore


def discard(file) -> None:
    """Give up a file `Output.create` made: an object's upload is aborted (nothing of it
    shows), a local file is closed (its temporary name is left for --overwrite)."""
    if file.closed:
        return
    abort = getattr(file, "abort", None)
    if abort is not None:
        abort()
    else:
        file.close()


@dataclass(frozen=True)
class Output:
    """A folder an export writes its files into. `options`: the store's storage_options
    for an object prefix (empty: the environment's credentials)."""

    root: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, out: str, options: dict | None = None) -> Output:
        if objstore.is_object_uri(out):
            return cls(out.rstrip("/"), objstore.normalized(options))
        return cls(os.path.abspath(os.path.expanduser(out)))

    @property
    def in_store(self) -> bool:
        return objstore.is_object_uri(self.root)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.in_store else os.path.join(self.root, name)

    def prepare(self) -> list[str]:
        """Make the folder (a prefix needs none); the names right under it."""
        if not self.in_store:
            os.makedirs(self.root, exist_ok=True)
            return sorted(os.listdir(self.root))
        pages = objstore.list_run(self.root + "/", dict(self.options), quick=True)
        return sorted(uri.rpartition("/")[2] for page in pages for uri, _ in page)

    def create(self, name: str):
        """A new file to write, binary, with `tell`."""
        if self.in_store:
            return objstore.ObjectWriter(self.path(name), dict(self.options))
        return open(self.path(name), "wb")

    def remove(self, name: str) -> None:
        if self.in_store:
            objstore.delete(self.path(name), dict(self.options))
        else:
            os.unlink(self.path(name))

    def rename(self, name: str, new: str) -> None:
        if self.in_store:
            objstore.rename(self.path(name), self.path(new), dict(self.options))
        else:
            os.replace(self.path(name), self.path(new))

    def write_text(self, name: str, text: str) -> None:
        """A small file written whole, seen complete or not at all."""
        if self.in_store:
            objstore.put(self.path(name), dict(self.options), text.encode())
            return
        with open(self.path(name) + ".part", "w") as fh:
            fh.write(text)
        os.replace(self.path(name) + ".part", self.path(name))
