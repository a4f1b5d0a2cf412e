"""Errors curate raises for users: each says what was wrong, where, and what to do."""


class CurateError(Exception):
    """Base class of the errors curate reports to users."""


class ConfigError(CurateError):
    """A config is invalid. `problems` lists (key path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid config{where}:"]
        lines += [f"  {path or '<top level>'}: {reason}" for path, reason in problems]
        super().__init__("\n".join(lines))


class RunError(CurateError):
    """A run could not complete."""


def storage_message(exc: BaseException) -> str:
    """The first line of a Lance or LanceDB error, without the Rust source location it
    carries (`, /home/.../commit.rs:1663:50`)."""
    import re

    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    line = re.sub(r",?\s*\S*/[\w./-]+\.rs:\d+(:\d+)?:?", "", line)
    return re.sub(r"^(lance error:\s*)?(LanceError(\(\w+\))?:\s*)?", "", line).strip(" ,:")


def root_cause(exc: BaseException) -> BaseException:
    """A Ray task's or actor's error unwrapped to the exception the worker raised."""
    cause = getattr(exc, "cause", None)
    while isinstance(cause, BaseException):
        exc, cause = cause, getattr(cause, "cause", None)
    return exc


_STORAGE_SIGNS = ("No space left", "os error 28", "Disk quota", "Permission denied",
                  "os error 13", "Read-only file system", "os error 30")


def is_storage_failure(exc: BaseException) -> bool:
    """A failure of the disk or object store under the table rather than of the data."""
    text = str(root_cause(exc))
    return any(sign in text for sign in _STORAGE_SIGNS)


def describe_failure(exc: BaseException) -> str:
    """One line for an unexpected failure: a Ray task's error is unwrapped to its cause,
    a full disk is named as such."""
    exc = root_cause(exc)
    text = storage_message(exc)
    if "No space left" in text or "os error 28" in text:
        return f"a disk is full ({text}); free space and run the same command again"
    return f"{type(exc).__name__}: {text}"
