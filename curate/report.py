"""`curate report`: one self-contained HTML file about a table and its latest run (funnel,
per-stage counts and timings, score distributions, cluster sizes, example images)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from curate.catalog import Catalog, CatalogError
from curate.config import StoreConfig

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
table{border-collapse:collapse}td,th{padding:.25rem .6rem;border-bottom:1px solid #eef;
text-align:right}td:first-child,th:first-child{text-align:left}.note{color:#8a5a00}
.grid{display:flex;flex-wrap:wrap;gap:.6rem}.card{width:170px;font-size:12px}
.card img{width:170px;height:130px;object-fit:cover;background:#eee;border-radius:4px}
.card .none{width:170px;height:130px;background:#f3e8e8;display:flex;align-items:center;
justify-content:center;color:#933;border-radius:4px;padding:.4rem;box-sizing:border-box}
.card.strip{width:352px}.card.strip img{width:352px;height:auto}
.charts{display:flex;flex-wrap:wrap;gap:1.2rem}.muted{color:#667}
"""
KEPT, DROPPED = "#2f7d4f", "#c0504d"


def _e(value: Any) -> str:
    return html.escape(str(value))


def bar_chart(rows: list[tuple[str, float, float]], width: int = 700,
              words: tuple[str, str] = ("kept", "out"),
              colors: tuple[str, str] = (KEPT, DROPPED)) -> str:
    """Horizontal bars, one per (label, kept, dropped), kept and dropped stacked (or any
    two amounts, named by `words`)."""
    top = max((k + d for _, k, d in rows), default=0) or 1
    line, label_w = 22, 150
    parts = [f'<svg width="{width}" height="{line * len(rows) + 4}" role="img">']
    for i, (label, kept, dropped) in enumerate(rows):
        y = i * line
        kw = (width - label_w - 80) * kept / top
        dw = (width - label_w - 80) * dropped / top
        parts.append(
            f'<text x="0" y="{y + 15}" font-size="12">{_e(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{kw:.1f}" height="16" fill="{colors[0]}"/>'
            f'<rect x="{label_w + kw:.1f}" y="{y + 3}" width="{dw:.1f}" height="16" '
            f'fill="{colors[1]}"/><text x="{label_w + kw + dw + 4:.1f}" y="{y + 15}" '
            f'font-size="11">{kept:g} {words[0]}, {dropped:g} {words[1]}</text>')
    return "".join(parts) + "</svg>"


def histogram_chart(name: str, hist: dict[str, Any], width: int = 330,
                    height: int = 150) -> str:
    """Stacked columns of selected and rejected rows per bin."""
    edges = hist.get("edges") or []
    if not edges:
        return ""
    totals = [k + d for k, d in zip(hist["selected"], hist["rejected"])]
    top = max(totals) or 1
    step = (width - 10) / len(totals)
    plot = height - 34
    parts = [f'<svg width="{width}" height="{height}" role="img"><text x="0" y="12" '
             f'font-size="12" font-weight="600">{_e(name)}</text>']
    for i, (kept, dropped) in enumerate(zip(hist["selected"], hist["rejected"])):
        x = 5 + i * step
        kh, dh = plot * kept / top, plot * dropped / top
        base = height - 18
        parts.append(f'<rect x="{x:.1f}" y="{base - kh:.1f}" width="{step - 1:.1f}" '
                     f'height="{kh:.1f}" fill="{KEPT}"/><rect x="{x:.1f}" '
                     f'y="{base - kh - dh:.1f}" width="{step - 1:.1f}" height="{dh:.1f}" '
                     f'fill="{DROPPED}"/>')
    parts.append(f'<text x="0" y="{height - 3}" font-size="10">{edges[0]:.3g}</text>'
                 f'<text x="{width}" y="{height - 3}" font-size="10" text-anchor="end">'
                 f'{edges[-1]:.3g}</text>')
    return "".join(parts) + "</svg>"


#: Where in a clip the frames of its strip are taken (fractions of its span).
STRIP_AT = (0.125, 0.375, 0.625, 0.875)


def _clip_strip(catalog: Catalog, sample_id: str, size: int) -> bytes:
    """A clip's frames side by side, one JPEG."""
    from PIL import Image

    frames = [Image.open(io.BytesIO(catalog.thumbnail(sample_id, size // 2, at)))
              for at in STRIP_AT]
    strip = Image.new("RGB", (sum(f.width for f in frames), max(f.height for f in frames)))
    x = 0
    for frame in frames:
        strip.paste(frame.convert("RGB"), (x, 0))
        x += frame.width
    out = io.BytesIO()
    strip.save(out, "JPEG", quality=85)
    return out.getvalue()


def _card(catalog: Catalog, row: dict[str, Any], size: int) -> str:
    caption = _e(row.get("reject_reason") or "selected")
    uri = str(row["uri"])
    name = _e(Path(uri.partition("#")[2] or uri).name)
    clip = row.get("media_type") == "video_clip" and not row.get("error")
    if clip:
        name += (f" · clip {row['clip_index']} · {row['clip_start_s']:.2f}–"
                 f"{row['clip_end_s']:.2f} s")
    try:
        data = _clip_strip(catalog, row["sample_id"], size) if clip else \
            catalog.thumbnail(row["sample_id"], size)
        picture = f'<img alt="{name}" src="data:image/jpeg;base64,' \
            f'{base64.b64encode(data).decode()}">'
    except CatalogError as exc:
        picture = f'<div class="none">{_e(exc.message[:120])}</div>'
    kind = "card strip" if clip else "card"
    return (f'<div class="{kind}">{picture}<div>{name}</div><div class="muted">{caption}'
            "</div></div>")


def _card_columns(catalog: Catalog) -> list[str]:
    """What a card shows: for a clip, also where it lies in its video."""
    clips = ["media_type", "clip_index", "clip_start_s", "clip_end_s", "error"]
    have = catalog.schema().names
    return ["uri", "reject_reason", *(c for c in clips if c in have)]


def render(catalog: Catalog, examples: int = 8, thumb: int = 256) -> str:
    stats = catalog.stats()
    run = catalog.last_run() or {}
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>curate report: "
           f"{_e(stats['table'])}</title><style>{STYLE}</style></head><body>",
           f"<h1>{_e(run.get('pipeline', stats['table']))}: {stats['selected']:,} of "
           f"{stats['rows']:,} samples curated</h1>",
           f"<p class='muted'>table {_e(stats['table'])} at {_e(stats['store'])}, version "
           f"{stats['version']}; run {_e(run.get('run_id', '-'))} finished "
           f"{_e(run.get('finished_at', '-'))} in {run.get('seconds') or 0:.1f} s</p>"]
    out += [f"<p class='note'>Note: {_e(n)}</p>" for n in run.get("notices", [])]
    funnel = stats["funnel"]
    if funnel:
        out.append("<h2>Funnel</h2>")
        out.append(bar_chart([(s["name"], s["kept"], s["dropped"]) for s in funnel]))
        out.append("<table><tr><th>stage</th><th>rows in</th><th>kept</th><th>dropped</th>"
                   "<th>dropped by reason</th><th>computed</th><th>reused</th>"
                   "<th>seconds</th></tr>")
        for s in funnel:
            reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "-"
            # records of earlier releases have neither
            computed, reused = s.get("rows_computed", s.get("processed", 0)), \
                s.get("rows_reused", 0)
            out.append(f"<tr><td>{_e(s['name'])}</td><td>{s['rows_in']:,}</td>"
                       f"<td>{s['kept']:,}</td><td>{s['dropped']:,}</td>"
                       f"<td>{_e(reasons)}</td><td>{computed:,}</td><td>{reused:,}</td>"
                       f"<td>{s['seconds']:.2f}</td></tr>")
        out.append("</table>")
    if stats["histograms"]:
        out.append("<h2>Score distributions</h2><p class='muted'>green: selected, red: "
                   "rejected</p><div class='charts'>")
        out += [histogram_chart(name, h) for name, h in stats["histograms"].items()]
        out.append("</div>")
    for name, clusters in stats["clusters"].items():
        out.append(f"<h2>Cluster sizes ({_e(name)})</h2>")
        out.append(bar_chart([(f"cluster {c['cluster']}", c["selected"],
                               c["rows"] - c["selected"]) for c in clusters]))
    out.append("<h2>Kept</h2><div class='grid'>")
    kept = catalog.samples(selected=True, limit=examples,
                           columns=_card_columns(catalog))["rows"]
    out += [_card(catalog, row, thumb) for row in kept]
    out.append("</div>")
    for group in stats["rejected_by_reason"]:
        stage, reason = group["stage"], group["reason"]
        rows = catalog.samples(where=group["where"], limit=examples,
                               columns=_card_columns(catalog))["rows"]
        out.append(f"<h2>Rejected by {_e(stage)}: {_e(reason)} ({group['rows']:,})</h2>"
                   "<div class='grid'>")
        out += [_card(catalog, row, thumb) for row in rows]
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(store: StoreConfig, out: Path, examples: int = 8) -> None:
    catalog = Catalog(store)
    out.write_text(render(catalog, examples))
