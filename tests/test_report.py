"""`curate report`: one self-contained HTML file about the demo table's run."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser

import lancedb


class Page(HTMLParser):
    """The parts of the report the tests read: headings, images, external references."""

    def __init__(self):
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2"):
            self._in_heading = True
            self.headings.append("")
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith("data:"):
                self.external.append(value)
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag in ("h1", "h2"):
            self._in_heading = False

    def handle_data(self, data):
        if self._in_heading:
            self.headings[-1] += data


def test_report_is_one_self_contained_file(demo_store, tmp_path):
    out = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "curate", "report", "--store",
                             str(demo_store), "--out", str(out), "--examples", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    page = Page()
    page.feed(out.read_text())
    assert page.external == []  # everything inline: opens anywhere, offline
    assert page.headings[0] == "demo: 8 of 33 samples curated"
    table = lancedb.connect(str(demo_store)).open_table("samples").to_arrow().to_pylist()
    reasons = {}
    for row in table:
        if row["reject_reason"]:
            stage, _, rest = row["reject_reason"].partition(": ")
            code = "duplicate" if "duplicate of" in rest else re.split(r"[: ]", rest)[0]
            reasons[(stage, code)] = reasons.get((stage, code), 0) + 1
    for (stage, code), count in reasons.items():
        assert f"Rejected by {stage}: {code} ({count})" in page.headings
    assert {"Funnel", "Score distributions", "Kept"} <= set(page.headings)
    assert "Cluster sizes (diversity_cluster)" in page.headings
    # example grids: 4 kept, and up to 4 per reason; broken files show their reason instead
    expected = 4 + sum(min(4, n) for n in reasons.values())
    pictures = [src for src in page.images if src.startswith("data:image/jpeg;base64,")]
    html = out.read_text()
    placeholders = html.count('class="none"')
    assert len(pictures) + placeholders == expected
    assert placeholders >= 1 and "has no media: empty" in html
    for stage in ("ingest_images", "image_quality", "phash_dedup", "clip_embed",
                  "semantic_dedup", "diversity_sample"):
        assert f"<td>{stage}</td>" in html


def test_report_of_a_missing_table_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "curate", "report", "--store",
                             str(tmp_path / "none"), "--out", str(tmp_path / "r.html")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    said = " ".join(result.stderr.split())  # the console wraps long lines
    assert "no table 'samples'" in said and "run `curate run` first" in said
