"""The statistics `/stats` and `curate report` show: rows selected and rejected, by stage and
reason, score histograms and cluster sizes. Each part of the table gives its counts and they
are summed, so a run computes them in tasks over fragments and records them; readers serve
the record while the table is as the run left it (curate.catalog scans only when it is
not). Pure Arrow and NumPy: no Ray, no store."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.media.decode import error_code

#: Float columns shown as histograms (besides any *_score and *_distance column).
QUALITY_METRICS = ("blur", "brightness", "contrast", "saturation", "aspect_ratio")
CLUSTER_COLUMNS = ("cluster_id", "diversity_cluster")
#: Histogram bins a run records.
BINS = 20


def stat_columns(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """(float columns with histograms, cluster columns) of a table."""
    floats = [f.name for f in schema if pa.types.is_floating(f.type)
              and (f.name.endswith(("_score", "_distance")) or f.name in QUALITY_METRICS)]
    return floats, [c for c in CLUSTER_COLUMNS if c in schema.names]


def _floats(values) -> np.ndarray:
    array = values.to_numpy(zero_copy_only=False).astype(np.float64)
    return array


def ranges(part: pa.Table, floats: list[str]) -> dict[str, list[float]]:
    """Per float column: [min, max] of its finite values in this part (absent: none)."""
    out = {}
    for name in floats:
        array = _floats(part[name])
        ok = np.isfinite(array)
        if ok.any():
            out[name] = [float(array[ok].min()), float(array[ok].max())]
    return out


def edges_of(per_part: list[dict[str, list[float]]], floats: list[str],
             bins: int) -> dict[str, list[float]]:
    """Bin edges of each float column from the parts' ranges (empty: no finite value)."""
    out = {}
    for name in floats:
        found = [r[name] for r in per_part if name in r]
        if not found:
            out[name] = []
            continue
        low, high = min(r[0] for r in found), max(r[1] for r in found)
        if high <= low:
            high = low + 1e-6
        out[name] = np.linspace(low, high, bins + 1).tolist()
    return out


def counts(part: pa.Table, edges: dict[str, list[float]], clusters: list[str]) -> dict:
    """This part's counts, to be summed with `merge`."""
    selected = pc.fill_null(part["selected"], False).to_numpy(zero_copy_only=False) \
        if "selected" in part.column_names else np.zeros(part.num_rows, bool)
    reasons: Counter[str] = Counter()
    if "reject_reason" in part.column_names:
        for reason in part["reject_reason"].to_pylist():
            if reason:
                stage, _, rest = reason.partition(": ")
                code = "duplicate" if "duplicate of" in rest else (error_code(rest) or rest)
                reasons[f"{stage}\n{code}"] += 1
    histograms = {}
    for name, bounds in edges.items():
        array = _floats(part[name])
        ok = np.isfinite(array)
        if not bounds:
            histograms[name] = {"selected": [], "rejected": [], "count": 0, "sum": 0.0}
            continue
        kept, _ = np.histogram(array[ok & selected], bounds)
        dropped, _ = np.histogram(array[ok & ~selected], bounds)
        histograms[name] = {"selected": kept.tolist(), "rejected": dropped.tolist(),
                            "count": int(ok.sum()), "sum": float(array[ok].sum())}
    sizes = {}
    for name in clusters:
        values = _floats(part[name])
        ok = ~np.isnan(values)
        ids, rows = np.unique(values[ok].astype(int), return_counts=True)
        kept_ids, kept = np.unique(values[ok & selected].astype(int), return_counts=True)
        kept_of = dict(zip(kept_ids.tolist(), kept.tolist()))
        sizes[name] = {str(c): [int(n), int(kept_of.get(int(c), 0))]
                       for c, n in zip(ids.tolist(), rows.tolist())}
    return {"rows": part.num_rows, "selected": int(selected.sum()), "reasons": dict(reasons),
            "histograms": histograms, "clusters": sizes}


def merge(per_part: list[dict]) -> dict:
    """The sum of parts' `counts`."""
    total: dict[str, Any] = {"rows": 0, "selected": 0, "reasons": Counter(), "histograms": {},
                             "clusters": {}}
    for part in per_part:
        total["rows"] += part["rows"]
        total["selected"] += part["selected"]
        total["reasons"].update(part["reasons"])
        for name, h in part["histograms"].items():
            into = total["histograms"].setdefault(
                name, {"selected": [0] * len(h["selected"]),
                       "rejected": [0] * len(h["rejected"]), "count": 0, "sum": 0.0})
            into["selected"] = [a + b for a, b in zip(into["selected"], h["selected"])]
            into["rejected"] = [a + b for a, b in zip(into["rejected"], h["rejected"])]
            into["count"] += h["count"]
            into["sum"] += h["sum"]
        for name, sizes in part["clusters"].items():
            into = total["clusters"].setdefault(name, {})
            for cluster, (rows, kept) in sizes.items():
                was = into.get(cluster, [0, 0])
                into[cluster] = [was[0] + rows, was[1] + kept]
    return total


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def reason_filter(stage: str, code: str) -> str:
    """The `where` filter selecting the rows `stage` rejected for `code` (as the stats group
    them: the code starts the reason; dedup stages write "<kind> duplicate of <id>")."""
    like = "duplicate of" if code == "duplicate" else code
    return (f"reject_reason LIKE {_quoted(stage + ': %')} AND reject_reason LIKE "
            f"{_quoted('%' + like + '%')}")


def finish(total: dict, edges: dict[str, list[float]]) -> dict[str, Any]:
    """What /stats serves (besides the table's name, version and last run)."""
    by_stage: Counter[str] = Counter()
    by_reason: Counter[tuple[str, str]] = Counter()
    for key, n in total["reasons"].items():
        stage, code = key.split("\n", 1)
        by_stage[stage] += n
        by_reason[(stage, code)] += n
    histograms = {}
    for name, bounds in edges.items():
        h = total["histograms"].get(name)
        if not bounds or not h or not h["count"]:
            histograms[name] = {"edges": [], "selected": [], "rejected": [], "count": 0}
            continue
        histograms[name] = {"edges": [round(float(e), 6) for e in bounds],
                            "selected": h["selected"], "rejected": h["rejected"],
                            "count": h["count"], "mean": round(h["sum"] / h["count"], 6)}
    clusters = {name: [{"cluster": int(c), "rows": rows, "selected": kept}
                       for c, (rows, kept) in sorted(sizes.items(), key=lambda kv: int(kv[0]))]
                for name, sizes in total["clusters"].items()}
    return {
        "rows": total["rows"], "selected": total["selected"],
        "rejected": total["rows"] - total["selected"],
        "rejected_by_stage": dict(by_stage.most_common()),
        "rejected_by_reason": [{"stage": s, "reason": r, "rows": c, "where": reason_filter(s, r)}
                               for (s, r), c in by_reason.most_common()],
        "histograms": histograms, "clusters": clusters,
    }


def columns_for(schema: pa.Schema) -> list[str]:
    floats, clusters = stat_columns(schema)
    return [c for c in ("selected", "reject_reason", *floats, *clusters) if c in schema.names]


def of_parts(gather, map_parts, parts: list, schema: pa.Schema, bins: int = BINS) -> dict:
    """The statistics of a table read as `parts` (each holding `columns_for(schema)`):
    ranges, then counts, both mapped over the parts (`map_parts(parts, fn, args)`) and
    gathered (`gather(refs)`), so only small results come back."""
    floats, clusters = stat_columns(schema)
    edges = edges_of(gather(map_parts(parts, ranges, (floats,))), floats, bins)
    return finish(merge(gather(map_parts(parts, counts, (edges, clusters)))), edges)
