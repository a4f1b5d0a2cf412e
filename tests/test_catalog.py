"""The catalog (the API's read side) directly on a copy of the demo table: filter checks,
and the vector index built once enough rows have vectors and kept up to date."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curate.catalog import Catalog, CatalogError
from curate.config import StoreConfig
from curate.filters import check_where

from .conftest import copy_store


@pytest.fixture()
def catalog(demo_store, tmp_path):
    return Catalog(StoreConfig(uri=str(copy_store(demo_store, tmp_path / "store"))))


@pytest.mark.parametrize("where", [
    "uri = 'width; nope'",                      # words inside strings are not columns
    "lower(format) = 'jpeg' AND width > 100",   # functions are not columns
    "`selected` = true AND reject_reason IS NULL",
    "aesthetic_score BETWEEN -1 AND 1 OR nsfw_score > 0.5",
    "uri LIKE '%.jpg' AND NOT (width < 10)",
])
def test_valid_filters_pass_the_check_and_run(catalog, where):
    assert check_where(where, catalog.schema().names, catalog.max_filter_chars) == where
    catalog.samples(where=where)


@pytest.mark.parametrize(("where", "says"), [
    ("password = 'x'", "unknown column 'password'"),
    ("width > 1; select 1", "';' is not allowed"),
    ("uri = 'open", "unterminated quote"),
    ("\"hidden\" > 1", "unknown column 'hidden'"),
])
def test_filters_naming_other_things_are_refused(catalog, where, says):
    with pytest.raises(CatalogError, match=says) as error:
        catalog.samples(where=where)
    assert error.value.status == 400


def test_the_vector_index_is_built_and_kept_fresh(catalog):
    table = catalog.store.table()
    with_vectors = table.count_rows("clip_embedding IS NOT NULL")
    assert catalog.ensure_vector_index(with_vectors + 1).startswith("exact search")
    assert not [ix for ix in table.list_indices() if "clip_embedding" in ix.columns]
    assert catalog.ensure_vector_index(10) == f"index built over {with_vectors} vectors"
    assert catalog.ensure_vector_index(10) == "index up to date"
    # a later run adds rows: the next refresh indexes them
    rows = table.to_arrow().filter(pc.is_valid(table.to_arrow()["clip_embedding"])).slice(0, 5)
    fresh = rows.set_column(0, "sample_id", pa.array([f"{i:032x}" for i in range(5)]))
    table.add(fresh)
    stats = table.index_stats("clip_embedding_idx")
    assert stats.num_unindexed_rows == 5
    assert catalog.ensure_vector_index(10) == "index updated with 5 new rows"
    latest = lancedb.connect(catalog.store.uri).open_table("samples")
    assert latest.index_stats("clip_embedding_idx").num_unindexed_rows == 0
    # and the new rows are found (their vectors equal rows already there)
    vector = np.asarray(fresh["clip_embedding"][0].as_py(), np.float32)
    import time

    time.sleep(1.1)  # the catalog rereads the table at most every second
    found = [r["sample_id"] for r in catalog.search(vector, k=4)]
    assert fresh["sample_id"][0].as_py() in found


def test_stats_come_from_the_run_record_and_match_a_scan(catalog, monkeypatch):
    """The run recorded the statistics over fragments; /stats serves them without reading
    a column, and they equal what a plain scan of the whole table counts."""
    table = lancedb.connect(catalog.store.uri).open_table("samples").to_arrow()
    selected = pc.fill_null(table["selected"], False).to_numpy(zero_copy_only=False)

    def scan(*args, **kwargs):
        raise AssertionError("read columns although the run recorded the statistics")

    monkeypatch.setattr(catalog, "_scan", scan)
    got = catalog.stats()
    assert got["rows"] == table.num_rows and got["selected"] == selected.sum()
    stages = [r.split(": ")[0] for r in table["reject_reason"].to_pylist() if r]
    assert got["rejected_by_stage"] == {s: stages.count(s) for s in set(stages)}
    assert set(got["histograms"]) >= {"blur", "aesthetic_score", "nsfw_score"}
    for name, histogram in got["histograms"].items():
        values = table[name].to_numpy(zero_copy_only=False).astype(float)
        ok = np.isfinite(values)
        edges = np.linspace(values[ok].min(), values[ok].max(), 21)
        assert np.allclose(histogram["edges"], edges, atol=1e-6), name
        kept, _ = np.histogram(values[ok & selected], edges)
        dropped, _ = np.histogram(values[ok & ~selected], edges)
        assert histogram["selected"] == kept.tolist() and histogram["rejected"] == \
            dropped.tolist(), name
        assert histogram["mean"] == pytest.approx(values[ok].mean(), abs=1e-5)
    clusters = table["diversity_cluster"].to_numpy(zero_copy_only=False)
    for entry in got["clusters"]["diversity_cluster"]:
        mine = clusters == entry["cluster"]
        assert entry["rows"] == mine.sum() and entry["selected"] == (mine & selected).sum()
    monkeypatch.undo()
    assert len(catalog.stats(bins=10)["histograms"]["blur"]["edges"]) == 11  # from a scan


def test_a_copy_of_a_dropped_copy_is_in_the_group_of_the_final_kept_row(catalog):
    """A kept copy that a later dedup dropped as a copy of another row: its own copies join
    that row's group. The demo's chains come from a random stand-in model, so one is made
    here: a row with copies is marked a semantic copy of another kept row."""
    table = lancedb.connect(catalog.store.uri).open_table("samples")
    rows = table.to_arrow().to_pylist()
    kept = sorted({r["duplicate_of"] for r in rows if r["duplicate_of"]})
    middle, final = kept[0], next(r["sample_id"] for r in rows if r["sample_id"] not in kept
                                  and not r["duplicate_of"] and not r["error"])
    table.update(where=f"sample_id = '{middle}'",
                 values={"duplicate_of": final, "semantic_duplicate_of": final})
    parent = {r["sample_id"]: r["duplicate_of"] for r in rows if r["duplicate_of"]}
    parent[middle] = final

    def root_of(sample_id):
        while sample_id in parent:
            sample_id = parent[sample_id]
        return sample_id

    expected = {r["sample_id"] for r in rows if root_of(r["sample_id"]) == final}
    assert len(expected) >= 3  # the final row, the middle one and the middle one's copies
    for member in expected:
        group = catalog.duplicates(member)
        members = [m["sample_id"] for m in group["members"]]
        assert group["kept"] == final and members[0] == final and set(members) == expected
        via = {m["sample_id"]: m["via"] for m in group["members"]}
        assert via[final] is None and via[middle] == "semantic"
        for copy in group["members"][1:]:  # each points at a member by the column it names
            assert copy[f"{copy['via']}_duplicate_of"] in members, (copy, via)
