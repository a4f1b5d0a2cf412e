"""The `where` filter language shared by the API, export and the data loader: one Lance
SQL predicate whose column names are checked against the table before Lance sees it."""

from __future__ import annotations

import re
from collections.abc import Iterable

from curate.errors import CurateError

#: Words of Lance's SQL predicate grammar that are not column names.
SQL_WORDS = frozenset([
    "and", "or", "not", "in", "is", "null", "true", "false", "like", "ilike", "between",
    "escape", "similar", "to", "as", "cast", "is_null", "is_not_null", "date", "timestamp",
    "interval", "distinct",
])
_TOKENS = re.compile(
    r"""(?P<string>'(?:[^']|'')*')|(?P<quoted>`[^`]*`|"[^"]*")|"""
    r"""(?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|"""
    r"""(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|(?P<other>\S)"""
)
#: Longest filter accepted.
MAX_CHARS = 1000


def ids_in(ids: Iterable[str], column: str = "sample_id") -> str:
    """The Lance filter of the rows whose `column` is one of `ids` (quotes escaped)."""
    quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
    return f"{column} IN ({quoted})"


class FilterError(CurateError):
    """A `where` filter that is refused before it reaches Lance."""


def check_where(where: str, columns: Iterable[str], max_chars: int = MAX_CHARS) -> str:
    """`where` if it is one predicate naming only `columns`, else FilterError."""
    if len(where) > max_chars:
        raise FilterError(f"where is {len(where)} characters; the limit is {max_chars}")
    names = set(columns)
    tokens = list(_TOKENS.finditer(where))
    for i, token in enumerate(tokens):
        kind, text = token.lastgroup, token.group()
        if kind == "other" and text == ";":
            raise FilterError("where is one predicate; ';' is not allowed")
        if kind == "other" and text in "'\"`":
            raise FilterError(f"where has an unterminated quote at {token.start()}")
        if kind not in ("name", "quoted"):
            continue
        column = text[1:-1] if kind == "quoted" else text.split(".")[0]
        following = tokens[i + 1].group() if i + 1 < len(tokens) else ""
        if kind == "name" and (text.lower() in SQL_WORDS or following == "("):
            continue  # a keyword or a function name
        if column not in names:
            raise FilterError(f"where names unknown column {column!r}; columns: "
                              + ", ".join(sorted(names)))
    return where


def combine(where: str | None, selected: bool | None, columns: Iterable[str],
            max_chars: int = MAX_CHARS) -> str | None:
    """The checked `where` and `selected = ...` joined by AND (None: every row)."""
    parts = []
    if where and where.strip():
        parts.append(f"({check_where(where, columns, max_chars)})")
    if selected is not None:
        parts.append(f"selected = {str(selected).lower()}")
    return " AND ".join(parts) or None


def lance_message(exc: Exception) -> str:
    """Lance's error text without its Rust source locations."""
    text = str(exc).replace("Invalid user input: ", "")
    text = re.sub(r",\s*/\S+\.rs:\d+:\d+", "", text)
    return text.strip()[:500]
