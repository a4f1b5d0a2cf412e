"""Review queues: views of the samples table ordered by how much a person's look is worth.

- `threshold`: rows whose score lies nearest a filter's limit, on both sides (each limit of
  each score filter of the last run's config);
- `disagree`: rows where two scores disagree most: high in one, low in the other, as
  ranks (from the histograms the last run recorded);
- `duplicates`: rows a dedup stage called copies, farthest from their kept copy first
  (the pairs at the edge of `max_distance` / `eps`, inside it), each with its kept copy
  and the distance;
- `near`: rows a dedup stage did not call copies whose nearest row lies just past its
  limit, nearest first, each with that row and the distance (the edge, outside it; for
  stages that record each row's nearest: `Stage.nearest_columns`);
- `audit`: a seeded random sample of the selection (with the rows people rejected since:
  they were judged in it); people's verdicts on it estimate the selection's precision.

Every page comes from scans bounded by a band around what the page needs: a range of the
score (a BTREE index on it keeps that an index lookup, see `index_columns`), a range of
sample ids (indexed already), or the rows a dedup stage marked. The band widens until it
holds the page, and the rows of the band are ordered here. Only the widest band reads a
whole score column: a page past every row the recorded histogram places near a limit,
or low disagreements. Pure Arrow and NumPy over a Lance dataset; no Ray, no HTTP.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import asdict, dataclass
from itertools import permutations
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.filters import ids_in
from curate.reviews import ACCEPT, REJECT, REVIEW_STAGE
from curate.stage import ScoreFilter, Stage

THRESHOLD, DISAGREE, DUPLICATES, NEAR, AUDIT = ("threshold", "disagree", "duplicates",
                                                "near", "audit")
#: The deepest row a queue is paged to: nobody reviews further in one sitting, and it
#: bounds what one page may read.
MAX_DEPTH = 2000
#: Half-widths of the band around a limit whose column has no recorded histogram, as
#: fractions of the limit's magnitude (see band_widths).
THRESHOLD_BANDS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: Least disagreement (difference of ranks) of the rows read, widest band last.
DISAGREE_BANDS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
#: Share of the sample-id space an audit band spans, widest last.
AUDIT_BANDS = (1 / 4096, 1 / 1024, 1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0)
AUDIT_SIZE = 200
#: Rows of marked duplicates read at once (their kept copies are looked up per batch).
PAIR_BATCH = 4096
ID_SPACE = 16 ** 8  # audit bands are ranges of the first 8 hex digits of sample_id


class QueueError(ValueError):
    """A queue that does not exist or a request it cannot answer (the message says why)."""


@dataclass(frozen=True)
class Queue:
    name: str
    kind: str
    title: str
    stage: str | None = None
    column: str | None = None
    other: str | None = None  # disagree: the score that is low
    limit: float | None = None  # threshold: the limit; duplicates, near: the stage's
    side: str | None = None  # threshold: min | max

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def plan(stages: list[Stage], schema: pa.Schema, histograms: dict[str, Any]) -> list[Queue]:
    """The queues a table offers: from the stages of its last run's config (limits, dedup
    stages) and the score histograms that run recorded."""
    names = set(schema.names)
    out = []
    for stage in stages:
        if isinstance(stage, ScoreFilter):
            for limit in stage.thresholds():
                if limit.column not in names:
                    continue
                for side, value in (("min", limit.minimum), ("max", limit.maximum)):
                    if value is not None:
                        out.append(Queue(
                            f"{THRESHOLD}:{stage.name}:{limit.column}:{side}", THRESHOLD,
                            f"{stage.name}: {limit.column} near its {side} {_fmt(value)}",
                            stage.name, limit.column, limit=float(value), side=side))
        if stage.marks_duplicates and stage.pair_columns() and stage.verdict_column in names \
                and all(c in names for c in stage.pair_columns()):
            out.append(Queue(f"{DUPLICATES}:{stage.name}", DUPLICATES,
                             f"{stage.name}: copies farthest from their kept copy (limit "
                             f"{_fmt(stage.pair_limit())})", stage.name,
                             stage.verdict_column, limit=stage.pair_limit()))
        near = stage.nearest_columns() if stage.marks_duplicates else None
        if near and all(c in names for c in near) and stage.pair_limit() is not None:
            out.append(Queue(f"{NEAR}:{stage.name}", NEAR,
                             f"{stage.name}: rows nearest past its limit "
                             f"{_fmt(stage.pair_limit())}, not called copies", stage.name,
                             near[1], other=near[0], limit=stage.pair_limit()))
    scores = [c for c, h in histograms.items() if c.endswith("_score") and c in names
              and len(h.get("edges") or []) > 1]
    for high, low in permutations(scores, 2):
        out.append(Queue(f"{DISAGREE}:{high}:{low}", DISAGREE,
                         f"high {high}, low {low}", column=high, other=low))
    if "selected" in names:
        out.append(Queue(AUDIT, AUDIT, "a seeded random sample of the selection (audit)"))
    return out


def index_columns(queues: list[Queue]) -> list[str]:
    """The score columns whose BTREE index keeps the queues' band scans index lookups."""
    columns = []
    for queue in queues:
        if queue.kind in (THRESHOLD, DISAGREE):
            columns += [queue.column, *([queue.other] if queue.other else [])]
        elif queue.kind == NEAR:
            columns.append(queue.column)
    return list(dict.fromkeys(columns))


def _literal(x: float) -> str:
    """A float as Lance SQL takes it (no exponent)."""
    return np.format_float_positional(float(x), trim="-")


# --- pages ----------------------------------------------------------------------------------
class Pager:
    """Pages of one queue over a Lance dataset (`dataset`: its to_table and count_rows)."""

    def __init__(self, dataset, histograms: dict[str, Any]):
        self.dataset = dataset
        self.histograms = histograms
        self.kept: dict[tuple, tuple] = {}  # whole queues (pairs, audits) of this version
        self.lock = threading.Lock()
        self.making: dict[tuple, threading.Lock] = {}  # one maker per queue at a time

    def page(self, queue: Queue, stage: Stage | None, offset: int, limit: int,
             seed: int = 0, size: int = AUDIT_SIZE) -> dict[str, Any]:
        """{"rows": [{"sample_id", "_queue": {...}}...], "total", "more"}: the rows at
        `offset` of the queue (only their ids and what places them there; the caller
        fetches the columns it shows)."""
        need = offset + limit
        if need > MAX_DEPTH:
            raise QueueError(f"offset + limit is {need}; queues are paged to {MAX_DEPTH} "
                             "rows deep")
        if queue.kind == THRESHOLD:
            ranked, total = self._threshold(queue, need)
        elif queue.kind == DISAGREE:
            ranked, total = self._disagree(queue, need)
        elif queue.kind == DUPLICATES:
            assert stage is not None
            ranked, total = self._whole((queue.name,), self._pairs, queue, stage)
        elif queue.kind == NEAR:
            assert stage is not None
            ranked, total = self._near(queue, stage.verdict_column, need)
        else:
            ranked, total = self._whole((AUDIT, seed, size), self._audit, seed,
                                        min(size, MAX_DEPTH))
        # total None: the band read held the page, and the queue may go on past it
        more = (total is None or total > need) and need < MAX_DEPTH
        return {"total": total, "more": more, "rows": ranked[offset:need]}

    def _whole(self, key: tuple, make, *args):
        """A queue made whole once per table version (its rows are at most MAX_DEPTH);
        requests for it meanwhile wait for that one making. Audits (one per seed asked
        for) are kept 16 at most, the copies of each dedup stage all along."""
        with self.lock:
            making = self.making.setdefault(key, threading.Lock())
        with making:
            with self.lock:
                found = self.kept.get(key)
            if found is None:
                found = make(*args)
                with self.lock:
                    audits = [k for k in self.kept if k[0] == AUDIT]
                    if key[0] == AUDIT and len(audits) >= 16:
                        self.kept.pop(audits[0])
                    self.kept[key] = found
        return found

    def _banded(self, bands: list[tuple[str, Any]], columns: list[str], need: int):
        """The `need` first rows, in key order, of the first band holding that many rows
        whose key is finite; their keys; whether that band was the widest; and how many
        rows with a finite key it holds (with the widest: the whole queue). A band is
        (filter, key): `key(rows)` -> float keys (NaN: not in the queue). The band is read
        in batches, keeping the best `need` (a wide band is never held whole)."""
        for i, (band, key) in enumerate(bands):
            widest = i == len(bands) - 1
            if not widest and self.dataset.count_rows(filter=band) < need:
                continue  # too few rows even before the key's own cut
            rows, keys, found = self._best(band, key, columns, need)
            if found >= need or widest:
                return rows, keys, widest, found
        raise AssertionError("no band")  # the widest band always returns

    def _best(self, band: str, key, columns: list[str], need: int):
        """The `need` rows of `band` with the least finite keys (ties by sample_id: pages
        are stable), their keys, and how many rows have a finite key."""
        scanner = self.dataset.scanner(columns=["sample_id", *columns], filter=band,
                                       batch_size=PAIR_BATCH)
        best, best_keys, found = None, np.empty(0, np.float64), 0
        for batch in scanner.to_batches():
            if not batch.num_rows:
                continue
            rows = pa.Table.from_batches([batch])
            keys = np.asarray(key(rows), np.float64)
            ok = np.isfinite(keys)
            found += int(np.count_nonzero(ok))
            rows = rows.filter(pa.array(ok))
            best = rows if best is None else pa.concat_tables([best, rows])
            best_keys = np.concatenate([best_keys, keys[ok]])
            ids = best["sample_id"].to_numpy(zero_copy_only=False)
            order = np.lexsort((ids, best_keys))[:need]
            best, best_keys = best.take(pa.array(order)), best_keys[order]
        if best is None:
            best = pa.schema([self.dataset.schema.field(c) for c in ["sample_id", *columns]]
                             ).empty_table()
        return best, best_keys, found

    def _threshold(self, queue: Queue, need: int):
        column, at = queue.column, float(queue.limit)
        bands = [f"{column} >= {_literal(at - w)} AND {column} <= {_literal(at + w)}"
                 for w in band_widths(self.histograms.get(column), at, need)]
        bands.append(f"{column} IS NOT NULL")  # past the recorded range

        def key(rows):
            values = pc.fill_null(pc.cast(rows[column], pa.float64()), math.nan).to_numpy()
            return np.abs(values - at)

        rows, _, widest, found = self._banded([(band, key) for band in bands], [column], need)
        values = rows[column].to_pylist()
        failing = (lambda v: v < at) if queue.side == "min" else (lambda v: v > at)
        out = [{"sample_id": i, "_queue": {"value": v, "limit": at, "side": queue.side,
                                            "passes": not failing(v)}}
               for i, v in zip(rows["sample_id"].to_pylist(), values)]
        return out, found if widest else None

    def _disagree(self, queue: Queue, need: int):
        high, low = Rank(self.histograms[queue.column]), Rank(self.histograms[queue.other])

        def key_at(d):  # a band's key: rows whose gap is at least d, largest gap first
            def key(rows):
                gap = high(rows[queue.column]) - low(rows[queue.other])
                return np.where(gap >= d, -gap, np.nan)
            return key

        bands = []
        for d in DISAGREE_BANDS:  # rows with rank(high) - rank(low) >= d lie in this box
            bottom = high.at_least(d)
            parts = [f"{queue.column} >= {_literal(bottom)}" if math.isfinite(bottom)
                     else f"{queue.column} IS NOT NULL"]
            top = low.at_most(1 - d)
            parts.append(f"{queue.other} <= {_literal(top)}" if top is not None
                         else f"{queue.other} IS NOT NULL")
            bands.append((" AND ".join(parts), key_at(d)))

        rows, keys, widest, found = self._banded(bands, [queue.column, queue.other], need)
        out = [{"sample_id": i, "_queue": {queue.column: a, queue.other: b,
                                            "disagreement": round(-k, 4)}}
               for i, a, b, k in zip(rows["sample_id"].to_pylist(),
                                     rows[queue.column].to_pylist(),
                                     rows[queue.other].to_pylist(), keys.tolist())]
        return out, found if widest else None

    def _near(self, queue: Queue, verdict: str, need: int):
        """Rows whose nearest lies past the limit, nearest first: bands of the indexed
        distance just past it, sized from its recorded histogram (a row past the limit
        is no copy: it matched no row within it)."""
        column, at = queue.column, float(queue.limit)
        past = f"{column} > {_literal(at)} AND {verdict} IS NULL"  # (a stored float32
        # just past the limit may stand for a similarity just within it)
        bands = [f"{past} AND {column} <= {_literal(at + w)}" for w in band_widths(
            self.histograms.get(column), at, need, above=True)]
        bands.append(past)

        def key(rows):
            return pc.fill_null(pc.cast(rows[column], pa.float64()), math.nan).to_numpy()

        rows, keys, widest, found = self._banded([(band, key) for band in bands],
                                                 [column, queue.other], need)
        out = [{"sample_id": i, "_queue": {"distance": d, "kept": k, "limit": at}}
               for i, k, d in zip(rows["sample_id"].to_pylist(),
                                  rows[queue.other].to_pylist(), keys.tolist())]
        return out, found if widest else None

    def _pairs(self, queue: Queue, stage: Stage):
        """Every row the stage marked, read in batches with its kept copy; the MAX_DEPTH
        farthest kept (bounded memory, whatever the number of copies)."""
        column, cols = queue.column, list(stage.pair_columns())

        def key(rows):  # farthest first; a copy whose kept copy is gone last
            kept = self.dataset.to_table(columns=["sample_id", *cols],
                                         filter=ids_in(sorted(set(rows[column].to_pylist()))))
            where = pc.index_in(rows[column], value_set=kept["sample_id"])
            kept = kept.take(where)  # null rows where a kept copy is gone: NaN distances
            return -np.nan_to_num(stage.pair_distances(rows, kept), nan=-1.0)

        rows, keys, total = self._best(f"{column} IS NOT NULL", key, [column, *cols],
                                       MAX_DEPTH)
        out = [{"sample_id": i, "_queue": {"distance": None if k > 0 else -k, "kept": c,
                                            "limit": queue.limit}}
               for i, c, k in zip(rows["sample_id"].to_pylist(), rows[column].to_pylist(),
                                  keys.tolist())]
        return out, total

    def _audit(self, seed: int, size: int):
        start = int(hashlib.sha256(f"curate-audit:{seed}".encode()).hexdigest()[:8], 16)
        # the rows the run selected, and those people rejected since (a reject moves a
        # row out of the selection, not out of the sample it was judged in)
        population = "selected = true"
        if "review" in self.dataset.schema.names:
            population = f"(selected = true OR review = '{REJECT}')"
        bands = [f"{population} AND ({_id_range(start, share)})" for share in AUDIT_BANDS]

        def key(rows):  # distance from the start, around the id space
            first = np.array([int(i[:8].ljust(8, "0"), 16) for i in
                              rows["sample_id"].to_pylist()], np.float64)
            return (first - start) % ID_SPACE

        rows, _, _, _ = self._banded([(band, key) for band in bands], [], size)
        ids = rows["sample_id"].to_pylist()[:size]
        return [{"sample_id": i, "_queue": {"audit_rank": n}} for n, i in enumerate(ids)], \
            len(ids)


def band_widths(histogram: dict[str, Any] | None, at: float, need: int,
                above: bool = False) -> list[float]:
    """Half-widths of bands around `at` (`above`: widths of bands from `at` up),
    narrowest first: the first is the narrowest the recorded histogram says holds twice
    `need` rows (linear within a bin), each next twice as wide, the last covering the
    whole recorded range. Without a histogram, fractions of the limit's magnitude."""
    edges = np.asarray((histogram or {}).get("edges") or [], np.float64)
    if len(edges) < 2:
        spread = max(abs(at), 1.0)
        return [spread * w for w in THRESHOLD_BANDS]
    counts = np.asarray(histogram["selected"], np.float64) + np.asarray(
        histogram["rejected"], np.float64)
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    far = max(abs(at - edges[0]), abs(edges[-1] - at), 1e-9)
    want = min(2 * need, cum[-1])

    def held(w):
        return np.interp(at + w, edges, cum) - np.interp(at if above else at - w, edges, cum)

    low, high = 0.0, far
    for _ in range(40):  # the least width holding `want` rows, by bisection
        middle = (low + high) / 2
        low, high = (low, middle) if held(middle) >= want else (middle, high)
    widths = [max(high, far * 1e-9)]
    while widths[-1] < far:
        widths.append(widths[-1] * 2)
    return widths


def _id_range(start: int, share: float) -> str:
    """A filter on sample_id: ids whose first 8 hex digits lie in [start, start + share of
    the space), around the end of the space."""
    if share >= 1.0:
        return "sample_id IS NOT NULL"
    end = start + int(ID_SPACE * share)

    def hexed(x):
        return f"{x % ID_SPACE:08x}"

    if end <= ID_SPACE:
        upper = f" AND sample_id < '{hexed(end)}'" if end < ID_SPACE else ""
        return f"sample_id >= '{hexed(start)}'{upper}"
    return f"sample_id >= '{hexed(start)}' OR sample_id < '{hexed(end)}'"


class Rank:
    """A score's rank (0-1) from a recorded histogram: its CDF, linear within a bin."""

    def __init__(self, histogram: dict[str, Any]):
        self.edges = np.asarray(histogram["edges"], np.float64)
        counts = np.asarray(histogram["selected"], np.float64) + np.asarray(
            histogram["rejected"], np.float64)
        total = counts.sum()
        self.cum = np.concatenate([[0.0], np.cumsum(counts) / total]) if total else \
            np.linspace(0, 1, len(self.edges))

    def __call__(self, values) -> np.ndarray:
        x = pc.fill_null(pc.cast(values, pa.float64()), math.nan).to_numpy()
        return np.interp(x, self.edges, self.cum)  # NaN stays NaN

    def at_least(self, d: float) -> float:
        """A value below every score of rank >= d (a superset bound for a filter)."""
        i = int(np.searchsorted(self.cum, d, side="left"))
        return float(self.edges[max(i - 1, 0)]) if d > 0 else -math.inf

    def at_most(self, r: float) -> float | None:
        """A value above every score of rank <= r (None: no bound)."""
        above = np.flatnonzero(self.cum > r)
        return float(self.edges[above[0]]) if len(above) and r < 1 else None


def wilson(accepted: int, reviewed: int) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a proportion (None with nothing reviewed)."""
    if not reviewed:
        return None
    z = NormalDist().inv_cdf(0.975)
    p = accepted / reviewed
    centre = (p + z * z / (2 * reviewed)) / (1 + z * z / reviewed)
    half = z * math.sqrt(p * (1 - p) / reviewed + z * z / (4 * reviewed ** 2)) / (
        1 + z * z / reviewed)
    return max(0.0, centre - half), min(1.0, centre + half)


# --- what-if: a limit moved, decided from the stored scores ---------------------------------
def limit_param(stage: ScoreFilter, column: str, side: str) -> str:
    """The param of `stage` that sets its `side` limit on `column`, found by what the
    stage's own `thresholds()` says of copies with that param moved."""
    def limit_of(candidate):
        found = next((t for t in candidate.thresholds() if t.column == column), None)
        return None if found is None else (found.minimum if side == "min" else found.maximum)

    for param in stage.threshold_params:
        if not param.startswith(f"{side}_"):
            continue
        probes = (12.5, 13.5)
        copies = [type(stage)(stage.params.model_copy(update={param: v})) for v in probes]
        if tuple(limit_of(c) for c in copies) == probes:
            return param
    raise QueueError(f"no param of stage {stage.name} sets its {side} on {column}")


def projected_funnel(funnel: list[dict[str, Any]], stage: str,
                     dropped_by: dict[tuple[str | None, str | None], int], entering: int,
                     table_wide: set[str]) -> list[dict[str, Any]]:
    """The last run's funnel (`name`, `rows_in`, `kept`, `dropped` per line: the models'
    verdicts, then people's `review` line) as it would read with `stage`'s limit moved.

    `dropped_by`: of the rows the moved limit drops that passed it before, how many the
    models dropped at each later stage (None: kept to the end), by people's verdict on
    them (`accept`, `reject` or None). Each model line after `stage` loses them up to the
    stage that dropped them; the `review` line loses those that reached it (a person's
    reject then drops one row less; a person's accept keeps the row, now as one people
    kept that the models dropped). Exact for row stages. `entering`: rows it passes that
    it dropped; the stages after it have not computed them, so each later line gets them
    as `pending` (their fate unknown until a run). Table-wide stages (`table_wide`)
    decide again over what reaches them: their lines are marked `decided_again` (shown
    as if they decided the same for the rows they kept)."""
    out = [{k: line[k] for k in ("name", "rows_in", "kept", "dropped")} for line in funnel]
    names = [line["name"] for line in out]
    if stage not in names:
        return out
    at = names.index(stage)
    people = names.index(REVIEW_STAGE) if REVIEW_STAGE in names[at + 1:] else None
    leaving = sum(dropped_by.values())
    out[at]["kept"] += entering - leaving
    out[at]["dropped"] += leaving - entering
    for (later, review), rows in dropped_by.items():
        for i in range(at + 1, len(out)):
            if i == people:
                continue
            out[i]["rows_in"] -= rows
            if names[i] == later:
                out[i]["dropped"] -= rows
                break
            out[i]["kept"] -= rows
        if later is None and people is not None:
            line = out[people]
            line["rows_in"] -= rows
            if review == REJECT:
                line["dropped"] -= rows
            elif review != ACCEPT:
                line["kept"] -= rows
    for line in out[at + 1:]:
        line["pending"] = entering
        line["decided_again"] = bool(leaving or entering) and line["name"] in table_wide
    return out


def what_if(pager: Pager, stage: ScoreFilter, queue: Queue, value: float,
            other_verdicts: list[str], strip: int = 24,
            chain: list[tuple[str, str | None]] | None = None) -> dict[str, Any]:
    """What moving a threshold queue's limit to `value` changes, from the stored scores,
    counted by Lance over the rows between the two limits (the score is indexed):

    - `leave`: selected rows the moved limit fails (the other limits of the stage they
      pass already), but those a person accepted;
    - `enter`: rows this stage dropped first for this limit alone (its verdict names one
      failed check, this one's; no other stage's verdict) that the moved limit passes,
      but those a person rejected. A run then computes the stages after it on them, and
      dedup and sampling decide on them again: they enter the row filters.

    The strips are the rows of each nearest the new limit. With `chain` (every stage's
    name and verdict column, in order), `dropped_by` also counts the rows the moved limit
    would drop that passed it (selected or not) by the later stage whose verdict dropped
    them (None: none did) and people's verdict on them, from the verdict columns of the
    rows between the two limits: what `projected_funnel` needs."""
    if not math.isfinite(value):
        raise QueueError(f"value {value} is not a finite number")
    limit_param(stage, queue.column, queue.side)  # the stage has a param for this limit
    column, old = queue.column, float(queue.limit)
    label = next(t.label for t in stage.thresholds() if t.column == column)
    names = set(pager.dataset.schema.names)
    tighter = value > old if queue.side == "min" else value < old
    if queue.side == "min":  # the scores the moved limit fails, or newly passes
        between = f"{column} < {_literal(value)} AND {column} >= {_literal(old)}" if tighter \
            else f"{column} >= {_literal(value)} AND {column} < {_literal(old)}"
    else:
        between = f"{column} > {_literal(value)} AND {column} <= {_literal(old)}" if tighter \
            else f"{column} <= {_literal(value)} AND {column} > {_literal(old)}"
    person = "review" in names
    if tighter:
        where = f"selected = true AND {between}" + (
            " AND (review IS NULL OR review <> 'accept')" if person else "")
    else:
        verdict = stage.verdict_column
        others = " AND ".join(f"{c} IS NULL" for c in other_verdicts if c in names)
        where = (f"selected = false AND {between} AND reject_reason LIKE "
                 f"'{stage.name}: %' AND {verdict} LIKE '{label} %' AND {verdict} NOT LIKE "
                 f"'%; %'" + (f" AND {others}" if others else "")
                 + (f" AND (review IS NULL OR review <> '{REJECT}')" if person else ""))
    count = pager.dataset.count_rows(filter=where)
    selected = pager.dataset.count_rows(filter="selected = true")
    ids: list[str] = []
    if count and strip:
        widths = band_widths(pager.histograms.get(column), value, strip)
        bands = [f"{where} AND {column} >= {_literal(value - w)} AND {column} <= "
                 f"{_literal(value + w)}" for w in widths] + [where]

        def key(rows):
            values = pc.fill_null(pc.cast(rows[column], pa.float64()), math.nan).to_numpy()
            return np.abs(values - value)

        rows, _, _, _ = pager._banded([(band, key) for band in bands], [column],
                                   min(strip, count))
        ids = rows["sample_id"].to_pylist()[:strip]
    leaving, entering = (count, 0) if tighter else (0, count)
    answer = {"queue": queue.to_dict(), "limit": old, "value": value, "selected": selected,
              "leaving": leaving, "entering": entering,
              "selected_after": selected - leaving + entering,
              "leave": ids if tighter else [], "enter": [] if tighter else ids}
    if chain is not None:
        answer["dropped_by"] = _dropped_later(pager, stage, chain, between, names) \
            if tighter else {}
    return answer


def _dropped_later(pager: Pager, stage: Stage, chain: list[tuple[str, str | None]],
                   between: str, names: set[str]) -> dict[tuple[str | None, str | None], int]:
    """Of the rows `between` that passed `stage` (no verdict of it or before it), how
    many the models dropped at each later stage (None: none did), by people's verdict."""
    at = [name for name, _ in chain].index(stage.name)
    alive = [f"{c} IS NULL" for _, c in chain[:at + 1] if c and c in names]
    later = [(name, c) for name, c in chain[at + 1:] if c and c in names]
    columns = [c for _, c in later] + (["review"] if "review" in names else [])
    where = " AND ".join([between, *alive])
    if not columns:
        count = pager.dataset.count_rows(filter=where)
        return {(None, None): count} if count else {}
    verdicts = (None, ACCEPT, REJECT)
    counts = np.zeros(3 * (len(later) + 1), np.int64)  # by first later stage and verdict
    scanner = pager.dataset.scanner(columns=columns, filter=where, batch_size=PAIR_BATCH)
    for rows in scanner.to_batches():  # a far move's band is most of the table
        first = np.full(rows.num_rows, len(later))
        for k in range(len(later) - 1, -1, -1):  # the first later verdict set
            first[pc.is_valid(rows.column(later[k][1])).to_numpy(zero_copy_only=False)] = k
        person = np.zeros(rows.num_rows, np.int64)
        if "review" in columns:
            for code in (1, 2):
                person[pc.fill_null(pc.equal(rows.column("review"), verdicts[code]), False)
                       .to_numpy(zero_copy_only=False)] = code
        counts += np.bincount(first * 3 + person, minlength=len(counts))
    return {(later[k // 3][0] if k // 3 < len(later) else None, verdicts[k % 3]): int(n)
            for k, n in enumerate(counts.tolist()) if n}
