"""Small helpers shared by stages of several kinds: threshold verdicts, the score column of
keep policies, the caption columns of manifests, URLs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

CAPTION_COLUMNS = ("caption", "alt_text", "text", "alt", "TEXT")


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def threshold_verdicts(label: str, scores: np.ndarray, valid: np.ndarray,
                       minimum: float | None = None, maximum: float | None = None) -> pa.Array:
    """`label 3.21 < 5` for rows under `minimum` (or `>` over `maximum`), else null."""
    out: list[str | None] = [None] * len(scores)
    for i in np.flatnonzero(valid):
        value = float(scores[i])
        if minimum is not None and value < minimum:
            out[i] = f"{label} {value:.4g} < {minimum:g}"
        elif maximum is not None and value > maximum:
            out[i] = f"{label} {value:.4g} > {maximum:g}"
    return pa.array(out, pa.string())


def check_score_column(keep: str, score_column: str | None) -> None:
    """keep: highest/lowest need a score_column; the other policies take none."""
    needs = keep in ("highest", "lowest")
    if needs and not score_column:
        raise ValueError(f"keep={keep!r} needs score_column")
    if score_column and not needs:
        raise ValueError("score_column is only used with keep: highest or lowest")
