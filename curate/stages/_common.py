"""Small helpers shared by stages of several kinds: the score column of keep policies, the
caption columns of manifests, URLs."""

from __future__ import annotations

CAPTION_COLUMNS = ("caption", "alt_text", "text", "alt", "TEXT")


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def check_score_column(keep: str, score_column: str | None) -> None:
    """keep: highest/lowest need a score_column; the other policies take none."""
    needs = keep in ("highest", "lowest")
    if needs and not score_column:
        raise ValueError(f"keep={keep!r} needs score_column")
    if score_column and not needs:
        raise ValueError("score_column is only used with keep: highest or lowest")
