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
