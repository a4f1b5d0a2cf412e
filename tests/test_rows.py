"""The row model on a real Ray and a real Lance table: a source may read one input into many
rows, work is decided and redone per input, and the global stages that ran as tasks over
fragments agree with the same stages run in one process."""

from __future__ import annotations

import hashlib
import sys

import cloudpickle
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curate import Pipeline, load_config
from curate.registry import get_stage_class, register
from curate.stage import FanOut, GlobalStage, StageParams, count_input_rows
from curate.stages.image.ingest_images import IngestImages
from curate.verdicts import alive_before

# Ray workers unpickle the test source by value: this module is not on their path.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class IngestHalves(IngestImages):
    """Each image becomes two rows, its left and right halves (a stand-in for a video cut
    into clips); a file that cannot be read stays one row with its error."""

    type = "ingest_halves"

    def writes(self):
        return {**super().writes(), "half": pa.int32()}

    def load(self, items: pa.Table):
        rows, images = super().load(items)
        out, media = [], []
        for i, image in enumerate(images):
            row = rows.slice(i, 1)
            if image is None:
                out.append(row.append_column("half", pa.array([None], pa.int32())))
                media.append(None)
                continue
            w, h = image.size
            for half in (0, 1):
                box = (0, 0, w // 2, h) if half == 0 else (w // 2, 0, w, h)
                piece = image.crop(box)
                sample_id = hashlib.blake2b(f"{row['input_id'][0]}#{half}".encode(),
                                            digest_size=16).hexdigest()
                part = row.set_column(row.column_names.index("sample_id"), "sample_id",
                                      pa.array([sample_id]))
                part = part.set_column(part.column_names.index("width"), "width",
                                       pa.array([piece.size[0]], pa.int32()))
                out.append(part.append_column("half", pa.array([half], pa.int32())))
                media.append(piece)
        return pa.concat_tables(out), media


@pytest.fixture()
def halves_stage():
    """`ingest_halves` registered for the test only (the stage reference lists built-in
    stages)."""
    from curate import registry

    register("ingest_halves")(IngestHalves)
    yield IngestHalves
    del registry._STAGES["ingest_halves"]


def halves_config(media, store, min_blur: float = 1.0, reduction: str | None = None) -> dict:
    return {
        "name": "halves",
        "store": {"uri": str(store)},
        "run": {"commit_every": 8},
        "stages": [
            {"type": "ingest_halves", "paths": [str(media)], "resources": {"batch_size": 4}},
            {"type": "image_quality", "min_side": 32, "min_blur": min_blur,
             "reduction": reduction},
            {"type": "exact_dedup"},
            {"type": "phash_dedup", "max_distance": 4},
        ],
    }


def table_of(store) -> pa.Table:
    return lancedb.connect(str(store)).open_table("samples").to_arrow().sort_by("sample_id")


def test_one_input_many_rows_redone_per_input(ray_session, halves_stage, demo_media, tmp_path):
    store = tmp_path / "store"
    first = Pipeline.from_config(load_config(halves_config(demo_media, store))).run(
        progress=False)
    table = table_of(store)
    by_input = pc.value_counts(table["input_id"]).to_pylist()
    failed = table.filter(pc.is_valid(table["error"]))
    read = table.filter(pc.is_null(table["error"]))
    # every readable input is two rows, every unreadable one a single row with its error
    assert all(c["counts"] == 2 for c in by_input
               if c["values"] in set(read["input_id"].to_pylist()))
    assert set(failed["input_id"].to_pylist()).isdisjoint(read["input_id"].to_pylist())
    assert table.num_rows == first.rows_total == 2 * len(set(read["input_id"].to_pylist())) \
        + failed.num_rows
    assert len(set(table["sample_id"].to_pylist())) == table.num_rows
    assert sorted(set(read["half"].to_pylist())) == [0, 1]
    # ids are stable: a rerun reads nothing
    again = Pipeline.from_config(load_config(halves_config(demo_media, store))).run(
        progress=False)
    assert again.status == "up_to_date"
    # a threshold decides the verdicts again from the stored scores: nothing is read
    changed = Pipeline.from_config(load_config(halves_config(demo_media, store, 3000.0))).run(
        progress=False)
    redecided = table_of(store)
    assert changed.rows_processed == 0
    assert {s.name: s.verdicts_redecided for s in changed.stages}["image_quality"] == \
        table.num_rows
    assert redecided["blur"].equals(table["blur"])
    assert pc.sum(pc.is_valid(redecided["quality_reason"])).as_py() > \
        pc.sum(pc.is_valid(table["quality_reason"])).as_py()
    # a changed row stage, where rows are pieces of their input, redoes every input: all
    # of its rows are replaced, none left over
    changed = Pipeline.from_config(load_config(halves_config(
        demo_media, store, 3000.0, "max"))).run(progress=False)
    redone = table_of(store)
    assert changed.rows_processed == redone.num_rows == table.num_rows
    assert redone["sample_id"].equals(table["sample_id"])
    assert redone["quality_reason"].equals(redecided["quality_reason"])
    # an input with only some of its rows (a run cut off between two commits of its rows)
    # is read again, and its leftover row replaced
    victim = read["input_id"][0].as_py()
    lancedb.connect(str(store)).open_table("samples").delete(
        f"input_id = '{victim}' AND half = 1")
    healed = Pipeline.from_config(load_config(halves_config(
        demo_media, store, 3000.0, "max"))).run(progress=False)
    assert healed.rows_processed == 2
    assert table_of(store)["sample_id"].equals(table["sample_id"])


def test_global_stages_on_fragments_equal_one_process(demo_store):
    """Each global stage, run again in this process over the whole table read back, gives
    exactly what the run wrote from tasks over fragments."""
    import yaml

    db = lancedb.connect(str(demo_store))
    table = db.open_table("samples").to_arrow().sort_by("sample_id")
    runs = db.open_table("samples_runs").to_arrow().to_pylist()
    config = load_config(yaml.safe_load(runs[-1]["config_yaml"]))
    stages = [get_stage_class(p.type)(p) for p in config.stages]
    checked = 0
    for i, stage in enumerate(stages):
        if not isinstance(stage, GlobalStage) or stage.type == "diversity_sample":
            continue
        alive = alive_before(table, stages, i)
        for name, values in stage.run_global(table, alive).items():
            assert values.equals(table[name].combine_chunks()), (stage.name, name)
            checked += 1
    assert checked >= 4  # exact, phash, semantic (two columns)
    # diversity: the same choice too (its random order is a seeded hash of each sample_id)
    index = [s.type for s in stages].index("diversity_sample")
    div = stages[index].run_global(table, alive_before(table, stages, index))
    assert div["diversity_reason"].equals(table["diversity_reason"].combine_chunks())
    assert np.array_equal(pc.is_null(table["reject_reason"]).to_numpy(zero_copy_only=False),
                          table["selected"].to_numpy(zero_copy_only=False))


@pytest.mark.parametrize("parts", [1, 3])
def test_scan_and_write_columns_round_trip(ray_session, tmp_path, parts):
    """Columns written back per fragment land on the right rows, others get nulls, one
    commit; scans see only the filtered rows."""
    import lance

    from curate.config import StoreConfig
    from curate.engine.backend import InlineBackend, RayBackend
    from curate.engine.tasks import map_parts, scan, write_columns
    from curate.parts import ROWADDR
    from curate.table.store import Store

    # one partition in this process, and three on Ray
    backend = RayBackend() if parts > 1 else InlineBackend()

    store = Store(StoreConfig(uri=str(tmp_path / "db")))
    schema = pa.schema([("sample_id", pa.string()), ("n", pa.int64()), ("tag", pa.string())])
    store.ensure_table(schema)
    for lo in range(0, 30, 10):  # three fragments
        lance.write_dataset(pa.table({"sample_id": [f"s{i:02d}" for i in range(lo, lo + 10)],
                                      "n": list(range(lo, lo + 10)), "tag": [None] * 10},
                                     schema=schema), store.uri_of_table, mode="append")
    before = store.version()
    found = scan(backend, store, ["sample_id", "n"], "n % 3 = 0")
    assert sum(backend.gather(map_parts(backend, found, _rows))) == 10

    def tagged(part: pa.Table) -> pa.Table:
        return pa.table({ROWADDR: part[ROWADDR],
                         "tag": pc.binary_join_element_wise("t", pc.cast(part["n"], pa.string()),
                                                            "")})

    version = write_columns(backend, store, map_parts(backend, found, tagged),
                            pa.schema([("tag", pa.string())]), n=parts)
    assert version == before + 1
    out = store.read(["sample_id", "n", "tag"]).sort_by("sample_id").to_pylist()
    assert [r["tag"] for r in out] == [f"t{r['n']}" if r["n"] % 3 == 0 else None for r in out]


def _rows(part: pa.Table) -> int:
    return part.num_rows


class Repeat(FanOut):
    """A fan-out row stage: every decoded row becomes `copies` rows."""

    type = "repeat_rows"
    Params = StageParams

    def __init__(self, copies: int):
        super().__init__()
        self.copies = copies

    def expand(self, rows, media):
        keep = [i for i, m in enumerate(media) for _ in range(self.copies if m else 1)]
        out = rows.take(pa.array(keep))
        ids = [f"{sid}-{k}" for k, sid in enumerate(out["sample_id"].to_pylist())]
        out = out.set_column(out.column_names.index("sample_id"), "sample_id", pa.array(ids))
        out = out.set_column(out.column_names.index("input_rows"), "input_rows",
                             count_input_rows(out["input_id"]))
        yield out, [media[i] for i in keep]


def test_a_fan_out_stage_reshapes_rows_in_the_worker(demo_media):
    """SegmentWorker (no Ray) after a fan-out stage: more rows, input_rows counts them per
    input, and the stages after it see the new rows."""
    from curate.engine.workers import FanOutWorker
    from curate.stages import ImageQuality

    source = IngestImages(paths=[str(demo_media / "photos")])
    items = source.list_inputs()
    worker = FanOutWorker([source, Repeat(3), ImageQuality(min_side=8)], [], last=True,
                          row_stages_hash="h")
    out = pa.concat_tables(list(worker(items)))
    assert out.num_rows == 3 * items.num_rows
    assert set(out["input_rows"].to_pylist()) == {3}
    assert out["quality_reason"].null_count == out.num_rows
    assert pc.count_distinct(out["sample_id"]).as_py() == out.num_rows
    assert sorted(set(out["input_id"].to_pylist())) == sorted(items["input_id"].to_pylist())
