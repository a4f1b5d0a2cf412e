"""`curate plan`: what a config will cost on the whole corpus, before it runs.

The pipeline runs as `curate run` runs it, in processes of its own, on a seeded sample of
the inputs, into a scratch store: first on up to 2 inputs (the cold start: the interpreter
and its imports, workers, model loads, commits), then on half the sample and on all of
it. Each phase of a run (start, stream, finish) is fitted through the three as seconds per
input; the fixed costs are the cold run less its inputs' share of those, measured apart
and never multiplied: a projection is the fixed costs plus the seconds per input times the
corpus. From the full sample's run it reads, per stage, the busy seconds per row its
workers spent (the stream's own timings), the rows each filter dropped, the rows per
input (clips per video), the bytes its columns take; per pool, its workers' peak memory.
On a declared cluster (`--cluster`), each pool is sized as `curate run` plans it there
(curate.engine.pools.plan_pools): the bottleneck is the slowest pool at those sizes, and
the stream lasts as long as the slowest pool once the GPU pools share the GPUs by their
work (`balanced`). Uncertainty is two standard errors of the sample's means: the
batches' seconds per row and the rows per input, each filter's drop fraction, the rows'
bytes and the inputs' sizes.

Only the sample is listed where the source's listing comes in units (directories, runs of
files, manifest parts): units are listed in a seeded order until ten times the sample's
inputs are listed, then the sample is the inputs of smallest seeded hash among them."""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.errors import ConfigError, CurateError
from curate.stage import first_of_each_input

#: Units of the listing are listed until this many times the sample's inputs are.
LIST_FACTOR = 10
#: Inputs of the cold run (the fixed costs), at most.
COLD_INPUTS = 2
#: Two standard errors: the range holds the mean about 95 times in 100.
Z = 2.0


@dataclass
class Cluster:
    """Where the projection runs: CPUs and GPUs in all, and nodes."""

    cpus: float
    gpus: float = 0.0
    nodes: int = 1
    #: True when given (--cluster); False: this machine
    declared: bool = False

    @classmethod
    def parse(cls, text: str) -> Cluster:
        """`cpus=64,gpus=16,nodes=2`; ConfigError naming what is wrong."""
        values: dict[str, float] = {}
        for item in filter(None, (i.strip() for i in text.split(","))):
            key, sep, value = item.partition("=")
            if key not in ("cpus", "gpus", "nodes") or not sep:
                raise ConfigError([("--cluster", f"{item!r}: give cpus=N,gpus=N,nodes=N")])
            try:
                values[key] = float(value)
            except ValueError:
                raise ConfigError([("--cluster", f"{key}={value!r} is not a number")]) from None
            if not math.isfinite(values[key]) or values[key] < 0:
                raise ConfigError([("--cluster", f"{key} must be a number, 0 or more")])
        if not values.get("cpus"):
            raise ConfigError([("--cluster", "cpus=N (more than 0) is required")])
        nodes = values.get("nodes", 1.0)
        if nodes < 1 or nodes != int(nodes):
            raise ConfigError([("--cluster", f"nodes={nodes:g}: give a whole number, 1 or more")])
        return cls(values["cpus"], values.get("gpus", 0.0), int(nodes), True)

    def check(self, config: Config) -> None:
        """Refuse, as `curate run` would on such a cluster, GPU pools its nodes (each with
        an equal share of the GPUs) cannot hold."""
        from curate.engine.pools import check_gpus
        from curate.plan import build_stages, row_chain, segments

        stages = build_stages(config)
        check_gpus(segments(row_chain(stages)), [self.gpus / self.nodes] * self.nodes,
                   {s.name: i for i, s in enumerate(stages)}, "--cluster")

    @classmethod
    def here(cls) -> Cluster:
        return cls(float(os.cpu_count() or 1), float(local_gpus()), 1, False)


def local_gpus() -> int:
    """GPUs this machine can run models on (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --- the sample ---------------------------------------------------------------------------


@dataclass
class Sample:
    listing: pa.Table  # the sample's inputs as the source lists them, smallest key first
    listed: int  # inputs listed to choose them from
    units_listed: int
    units: int
    input_bytes: list[int]  # sizes of the sample's inputs, where known


def sample_inputs(source, count: int, seed: int) -> Sample:
    """A seeded sample of `count` inputs: units listed in a seeded order until
    LIST_FACTOR x `count` inputs are listed, then those of smallest seeded hash (a
    uniform choice, the same for the same seed and listing)."""
    units = source.list_entries()
    random.Random(seed).shuffle(units)
    tables, listed, done = [], 0, 0
    for unit in units:
        table = source.list_entry(unit)
        done += 1
        if table.num_rows:
            tables.append(table)
            listed += table.num_rows
        if listed >= count * LIST_FACTOR:
            break
    if not tables:
        raise ConfigError([("stages.0.paths", "the source lists no inputs")])
    items = first_of_each_input(pa.concat_tables(tables, promote_options="default"))
    keys = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8],
                                    "big") for i in items["input_id"].to_pylist()],
                    dtype=np.uint64)
    chosen = items.take(pa.array(np.argsort(keys, kind="stable")[:count]))
    return Sample(chosen, items.num_rows, done, len(units), _sizes(chosen))


def _sizes(listing: pa.Table) -> list[int]:
    """The inputs' sizes where the listing or the file system knows them."""
    out = []
    known = listing["_size"].to_pylist() if "_size" in listing.column_names else \
        [-1] * listing.num_rows
    for uri, size in zip(listing["uri"].to_pylist(), known):
        if size is not None and size >= 0:
            out.append(size)
        elif os.path.isfile(uri):
            out.append(os.path.getsize(uri))
    return out


# --- measuring ----------------------------------------------------------------------------


@dataclass
class Measured:
    """What the sample's runs measured. A run is a summary (RunSummary.to_dict) with the
    whole command's wall seconds (`wall`) and, for the full sample, its batches."""

    sample: Sample
    cold_inputs: int
    cold: dict
    half: dict
    full: dict
    half_inputs: int
    batches: list[tuple[int, dict[str, float]]]
    scaled_bytes: int  # the full sample's table written at the target's size
    scaled_rows: int
    row_bytes: dict[str, float]  # column -> mean Arrow bytes a row
    row_bytes_se: float  # standard error of a row's mean bytes
    per_input_rows: list[int]  # rows each input of the full sample made
    export: dict[str, float]  # samples, bytes of an export of the full sample's rows
    peak_mb: float  # the full sample's run: its process (an inline run's workers too)
    gpus_stripped: list[str] = field(default_factory=list)


def runnable_here(config: Config) -> tuple[Config, list[str]]:
    """`config` with the GPUs its stages ask for dropped when this machine has none (the
    sample then measures the models on CPU: said in the plan), and those stages' names."""
    if local_gpus() or config.run.ray_address:
        return config, []
    stripped: list[str] = []
    stages = []
    for params in config.stages:
        if params.resources.gpus:
            stripped.append(params.name or params.type)
            params = params.model_copy(update={"resources": params.resources.model_copy(
                update={"gpus": 0.0})})
        stages.append(params)
    return config.model_copy(update={"stages": stages}), stripped


def _stored_in(config: Config, store: Path) -> Config:
    return config.model_copy(update={"store": config.store.model_copy(
        update={"uri": str(store)})})


def _run_here(config_path: str, listing_path: str, out: str) -> None:
    """In the run's own process (`python -m curate.forecast`): run the config on the listed
    inputs, as `curate run` would, and write its summary, batches and peak memory."""
    import json
    import resource

    import pyarrow.parquet as pq

    from curate.config import load_config
    from curate.engine.run import _Execution

    execution = _Execution(load_config(config_path), progress=False)
    execution.listing = [pq.read_table(listing_path)]
    execution.keep_batches = True
    summary = execution.run()
    Path(out).write_text(json.dumps({
        "summary": summary.to_dict(), "batches": execution.batches,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, default=str))


def _run(config: Config, listing: pa.Table, where: Path, label: str) -> dict:
    """The config run on `listing` in a process of its own, as `curate run` runs (a fresh
    interpreter: its imports, model loads and exit are counted); its summary, with the
    whole command's wall seconds."""
    import json

    import pyarrow.parquet as pq
    import yaml

    from curate.errors import RunError

    where.mkdir(parents=True, exist_ok=True)
    config_path, listing_path, out = (where / f"{label}{ext}" for ext in
                                      (".yaml", ".parquet", ".json"))
    # the secrets the run needs, in a file only this user reads
    descriptor = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
    pq.write_table(listing, listing_path)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "curate.forecast", str(config_path),
                           str(listing_path), str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode or not out.exists():
        log = where / f"{label}.log"
        log.write_text(done.stdout + done.stderr)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunError(f"the sample's run on {listing.num_rows} inputs failed: {last} "
                       f"(its output: {log})")
    body = json.loads(out.read_text())
    return {**body["summary"], "wall": wall, "batches": body["batches"],
            "peak_mb": body["peak_mb"]}


def table_bytes(store) -> int:
    """Bytes of the table's current version: its data files, deletion files and indexes
    (what it holds once older versions are cleaned up)."""
    return _dataset_bytes(store.dataset())


def _dataset_bytes(dataset) -> int:
    base = dataset.uri.rstrip("/")
    total = 0
    for fragment in dataset.get_fragments():
        for data in fragment.data_files():
            size = data.file_size_bytes
            total += size if size else os.path.getsize(f"{base}/data/{data.path}")
        deletion = fragment.metadata.deletion_file
        if deletion is not None:
            total += os.path.getsize(f"{base}/{deletion.path(fragment.fragment_id)}")
    return total + sum(index.total_size_bytes or 0 for index in dataset.describe_indices())


#: The most rows `scaled_bytes` writes: past it, a row costs what it costs there.
SCALED_ROWS = 20_000


def scaled_bytes(table: pa.Table, indexes, rows: int, where: Path) -> tuple[int, int]:
    """(bytes, rows written): the sample's table written at the size of `rows` (at most
    SCALED_ROWS), with the same indexes (`describe_indices` of its dataset). Lance encodes
    a column in pages and compresses a full page better than a sample's few rows
    (bit-packing, FSST on strings), so bytes per row fall as a table grows: the sample's
    rows are repeated up to that size, each copy of a column whose values are mostly
    distinct (ids, hashes, paths) made distinct again (`_copy`), so no repetition is found
    that the whole corpus lacks."""
    import lance

    if not table.num_rows:
        return 0, 0
    size = max(min(rows, SCALED_ROWS), table.num_rows)
    copies = math.ceil(size / max(table.num_rows, 1))
    columns = {}
    for name in table.column_names:
        values = table[name].combine_chunks()
        kind = values.type
        present = len(values) - values.null_count
        distinct = present and not pa.types.is_nested(kind) and \
            len(pc.unique(values)) >= present / 2
        copied = [_copy(values, j) if distinct else values for j in range(copies)]
        columns[name] = pa.concat_arrays(copied).slice(0, size)
    scaled = lance.write_dataset(pa.table(columns), str(where))
    for index in indexes:
        if index.index_type.upper().startswith("BTREE"):
            scaled.create_scalar_index(index.field_names[0], "BTREE")
    written = _dataset_bytes(lance.dataset(str(where)))
    shutil.rmtree(where, ignore_errors=True)
    return written, size


def _copy(values: pa.Array, j: int) -> pa.Array:
    """The `j`th copy of a column of mostly distinct values, distinct from the others and
    about as compressible: strings and bytes shifted (`_shifted`), numbers moved by a
    hair."""
    kind = values.type
    if j == 0:
        return values
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or \
            pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        # rotated by `j` characters, and past a whole turn two neighbours swapped: what
        # values share (a prefix, a path, a word) mostly stays whole, as a page's
        # compression finds it in a corpus, yet no copy equals another
        return pa.array([_shifted(value, j) for value in values.to_pylist()], kind)
    if pa.types.is_floating(kind):
        return pc.multiply(values, pa.scalar(1 + j * 1e-6, kind))
    if pa.types.is_integer(kind):
        try:
            return pc.add_checked(values, pa.scalar(j, kind))
        except pa.ArrowInvalid:  # at the type's edge: left as they are
            return values
    return values


def _shifted(value, j: int):
    if not value:
        return value
    size = len(value)
    turned = value[j % size:] + value[:j % size]
    swap = (j // size - 1) % size
    if j < size or size < 2 or swap == size - 1:
        return turned
    return turned[:swap] + turned[swap + 1:swap + 2] + turned[swap:swap + 1] + turned[swap + 2:]


def _row_bytes(table: pa.Table) -> tuple[dict[str, float], float, list[int]]:
    """Mean Arrow bytes a row of each column, the standard error of a row's mean bytes (its
    strings and binaries vary; the rest is fixed), and the rows of each input, in the
    sample's table."""
    means = {name: table[name].nbytes / max(table.num_rows, 1) for name in table.column_names}
    varying = np.zeros(table.num_rows)
    for name in table.column_names:
        kind = table.schema.field(name).type
        if pa.types.is_string(kind) or pa.types.is_binary(kind) or \
                pa.types.is_large_string(kind):
            varying += pc.fill_null(pc.binary_length(table[name]), 0).to_numpy(
                zero_copy_only=False)
    se = float(np.std(varying, ddof=1) / math.sqrt(table.num_rows)) if table.num_rows > 1 \
        else 0.0
    counts = table.group_by("input_id").aggregate([("input_id", "count")])
    return means, se, counts["input_id_count"].to_pylist()


def _export(store_config, out: Path) -> dict[str, float]:
    """An export (WebDataset, the original bytes) of the sample's rows that have media."""
    from curate.export import export

    summary = export(store_config, {"format": "webdataset", "out": str(out), "all": True,
                                    "where": "error IS NULL", "executor": "local"})
    return {"samples": summary.written, "bytes": sum(f["bytes"] for f in summary.files)}


def measure(config: Config, count: int, seed: int, scratch: Path, target: int | None = None
            ) -> Measured:
    """Run `config` on a seeded sample of `count` inputs into stores under `scratch`;
    `target`: the inputs the table's size is measured for (default: the listed)."""
    from curate.plan import build_stages
    from curate.table.store import Store

    for old in ("cold", "half", "full", "export", "scaled.lance"):  # a --scratch used before
        shutil.rmtree(scratch / old, ignore_errors=True)
    here, stripped = runnable_here(config)
    sample = sample_inputs(build_stages(here)[0], count, seed)
    if target is None and sample.units_listed < sample.units:
        raise ConfigError([("--target", "give the corpus's inputs: the sample listed "
                            f"{sample.units_listed} of {sample.units} listing units")])
    count = sample.listing.num_rows
    cold_n = min(COLD_INPUTS, max(count // 4, 1))
    half_n = max(count // 2, cold_n + 1) if count > cold_n + 1 else count
    cold = _run(_stored_in(here, scratch / "cold"), sample.listing.slice(count - cold_n),
                scratch, "cold")
    half = _run(_stored_in(here, scratch / "half"), sample.listing.slice(0, half_n), scratch,
                "half")
    full_cfg = _stored_in(here, scratch / "full")
    full = _run(full_cfg, sample.listing, scratch, "full")
    # the scratch table holds the sample's rows only (--sample inputs and what they made):
    # read once here, for the bytes of a row and for the table written at scale
    dataset = Store(full_cfg.store).dataset()
    table = dataset.to_table()
    means, se, per_input = _row_bytes(table)
    rows = round(np.mean(per_input) * (target or sample.listed)) if per_input else 0
    written, scaled_rows = scaled_bytes(table, dataset.describe_indices(), rows,
                                        scratch / "scaled.lance")
    return Measured(
        sample=sample, cold_inputs=cold_n, cold=cold, half=half, full=full,
        half_inputs=half_n, batches=full["batches"], scaled_bytes=written,
        scaled_rows=scaled_rows, row_bytes=means, row_bytes_se=se, per_input_rows=per_input,
        export=_export(full_cfg.store, scratch / "export"), peak_mb=full["peak_mb"],
        gpus_stripped=stripped)


# --- projecting ---------------------------------------------------------------------------


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares seconds per input through the runs' (inputs, seconds); never below
    0."""
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if len(set(x)) < 2:
        return 0.0
    return max(float(np.polyfit(x, y, 1)[0]), 0.0)


def _rse(batches: list[tuple[int, dict[str, float]]]) -> float:
    """Relative standard error of the mean seconds per input, from the batches."""
    per_row = np.array([sum(s.values()) / rows for rows, s in batches if rows])
    weights = np.array([rows for rows, _ in batches if rows], dtype=float)
    if len(per_row) < 2 or not per_row.any():
        return 0.0
    mean = float(np.average(per_row, weights=weights))
    k = len(per_row)
    spread = math.sqrt(float(np.average((per_row - mean) ** 2, weights=weights)) * k / (k - 1))
    return spread / math.sqrt(k) / mean if mean else 0.0


def _range(value: float, rse: float) -> dict[str, float]:
    return {"estimate": value, "low": value * max(1 - Z * rse, 0.0), "high": value * (1 + Z * rse)}


def project(config: Config, measured: Measured, target: int, cluster: Cluster,
            seed: int = 0) -> dict:
    """The plan: the sample's measures projected to `target` inputs on `cluster`."""
    from curate.engine.pools import plan_pools
    from curate.plan import build_stages, row_chain, segments

    stages = build_stages(config)
    by_name = {s.name: s for s in stages}
    n, half_n = measured.sample.listing.num_rows, measured.half_inputs
    full, half, cold = measured.full, measured.half, measured.cold
    # every run is a whole command in a fresh process, so each pays the same fixed costs:
    # the seconds per input are the slope through all three
    runs = [(measured.cold_inputs, cold), (half_n, half), (n, full)]
    if len({inputs for inputs, _ in runs}) > 1:
        slopes = {phase: _slope([(inputs, run["phases"].get(phase, 0.0))
                                 for inputs, run in runs])
                  for phase in ("start", "stream", "finish")}
    else:  # one input: every second counted per input (an upper bound)
        slopes = {phase: full["phases"].get(phase, 0.0) / n
                  for phase in ("start", "stream", "finish")}
    rse = _rse(measured.batches)
    # rows: the funnel scaled; a stage that keeps a set number keeps at most that many
    scale = target / n
    funnel, capped = [], None
    for count in full["stages"]:
        stage = by_name.get(count["name"])
        if stage is None:  # a line of no stage (people's verdicts): none in a scratch store
            continue
        rows_in = capped if capped is not None else count["rows_in"] * scale
        kept = rows_in * (count["kept"] / count["rows_in"]) if count["rows_in"] else 0.0
        limit = getattr(getattr(stage, "params", None), "target", None)
        keeps_a_number = isinstance(limit, int) and not isinstance(limit, bool)
        if keeps_a_number:  # diversity_sample
            kept = min(float(limit), rows_in)
        capped = kept
        p = count["dropped"] / count["rows_in"] if count["rows_in"] else 0.0
        if keeps_a_number and rows_in:
            p = 1 - kept / rows_in  # a set number kept: its own fraction at the target
        funnel.append((count, rows_in, kept, p,
                       math.sqrt(p * (1 - p) / count["rows_in"]) if count["rows_in"] else 0.0))
    pools = segments(row_chain(stages))
    sizes = plan_pools(pools, cluster.cpus, cluster.gpus, target)
    pool_of = {s.name: i for i, pool in enumerate(pools) for s in pool}
    stage_rows = []
    for count, rows_in, kept, p, p_se in funnel:
        stage = by_name[count["name"]]
        computed = count["rows_computed"]
        per_row = count["seconds"] / computed if computed else 0.0
        busy = count["seconds"] * scale  # worker-seconds at the target
        pool = pool_of.get(count["name"])
        # what the pool's worker reserves while the stage works (a stage fused into a
        # model's pool holds that model's GPUs)
        cpus = sizes[pool].cpus if pool is not None else 1.0
        gpus = sizes[pool].gpus if pool is not None else 0.0
        columns = [c for c in stage.written_names() if c in measured.row_bytes]
        stage_rows.append({
            "name": count["name"], "type": count["type"],
            "pool": None if pool is None else " + ".join(sizes[pool].stages),
            "rows_in": round(rows_in), "kept": round(kept),
            "drop_fraction": round(p, 4), "drop_fraction_se": round(p_se, 4),
            "seconds_per_row": round(per_row, 6),
            "rows_per_s_per_worker": round(1 / per_row, 1) if per_row else None,
            "cpu_hours": round(busy * cpus / 3600, 3),
            "gpu_hours": round(busy * gpus / 3600, 3),
            "bytes_per_row": round(sum(measured.row_bytes[c] for c in columns), 1),
            "gpus_per_worker": gpus, "measured_on_cpu": count["name"] in measured.gpus_stripped,
        })
    seconds = {c["name"]: c["seconds"] for c in full["stages"]}
    pool_rows = []
    for size, workers in zip(sizes, balanced(sizes, seconds, cluster.gpus)):
        work = sum(seconds.get(name, 0.0) for name in size.stages) / n  # per input
        pool_rows.append({
            "stages": list(size.stages), "cpus": size.cpus, "gpus": size.gpus,
            "workers": size.workers, "work_seconds_per_input": round(work, 6),
            "seconds": round(work * target / size.workers, 1),
            "balanced_workers": workers,
            "balanced_seconds": round(work * target / workers, 1),
            "worker_peak_mb": next((p.get("worker_peak_mb") for p in full["pools"]
                                    if p["stages"] == list(size.stages)), None)})
    # the bottleneck: the slowest pool at the sizes `curate run` starts them with
    top = max(pool_rows, key=lambda row: row["seconds"])
    top_stage = max(top["stages"], key=lambda s: seconds.get(s, 0.0))
    gpu_work = sum(r["work_seconds_per_input"] * r["gpus"] for r in pool_rows)
    cpu_pool = pool_rows[0]
    cpu_rate = cpu_pool["workers"] / cpu_pool["work_seconds_per_input"] \
        if cpu_pool["work_seconds_per_input"] else math.inf
    # the cold run less its inputs' marginal seconds: the interpreter, the start (the lease,
    # the table, Ray where it runs), workers with their model loads and engine warm-up,
    # and the finish's commits and indexes
    fixed = {"process": cold["wall"] - cold["seconds"], "start": cold["phases"].get("start", 0.0),
             "workers_and_models": max(cold["phases"].get("stream", 0.0) - slopes["stream"]
                           * measured.cold_inputs, 0.0),
             "finish": max(cold["phases"].get("finish", 0.0) - slopes["finish"]
                           * measured.cold_inputs, 0.0)}
    here = Cluster.here()
    if cluster.declared:  # the GPU pools grown to their balance, as the autoscaler does
        stream = max(row["balanced_seconds"] for row in pool_rows)
        finish = slopes["finish"] * target * here.cpus / cluster.cpus
        start = slopes["start"] * target * here.cpus / cluster.cpus
    else:
        stream, finish, start = (slopes[p] * target for p in ("stream", "finish", "start"))
        if not slopes["stream"]:  # runs too short to tell: the slowest pool here
            stream = top["seconds"]
    variable = stream + finish + start
    wall = sum(fixed.values()) + variable
    fan = np.array(measured.per_input_rows, dtype=float)
    fan_se = float(fan.std(ddof=1) / math.sqrt(len(fan))) if len(fan) > 1 else 0.0
    # a batch's seconds are per row: how many rows an input makes (clips per video) varies
    # apart from them
    wall_rse = math.hypot(rse, fan_se / fan.mean() if len(fan) and fan.mean() else 0.0)
    rows_target = fan.mean() * target if len(fan) else 0.0
    per_row_disk = measured.scaled_bytes / measured.scaled_rows if measured.scaled_rows else 0.0
    mean_row = sum(measured.row_bytes.values())
    size_rse = math.hypot(measured.row_bytes_se / mean_row if mean_row else 0.0,
                          fan_se / fan.mean() if len(fan) and fan.mean() else 0.0)
    selected = funnel[-1][2] if funnel else 0.0
    sizes_in = np.array(measured.sample.input_bytes, dtype=float)
    export_per = measured.export["bytes"] / measured.export["samples"] \
        if measured.export["samples"] else 0.0
    export_rse = float(sizes_in.std(ddof=1) / math.sqrt(len(sizes_in)) / sizes_in.mean()) \
        if len(sizes_in) > 1 and sizes_in.mean() else 0.0
    notes = []
    if measured.gpus_stripped:
        notes.append(f"{', '.join(measured.gpus_stripped)} asked for GPUs; this machine has "
                     "none, so their seconds were measured on its CPUs. GPU-hours and the "
                     "stream's time use those CPU seconds as if they were GPU seconds: on "
                     "GPUs these models run many times faster; plan again on a GPU node.")
    if any(s.marks_duplicates for s in stages):
        notes.append("dedup stages find more copies in a larger corpus than in a sample: "
                     "their drop fractions here are a lower bound.")
    if cluster.declared:
        notes.append("the stream is projected as its slowest pool once the GPU pools share "
                     "the GPUs by their work, as the autoscaler grows them from the sizes "
                     "`curate run` starts them with; start-up, model loads and the table-wide "
                     "stages' fixed costs are this machine's.")
    if len(measured.batches) < 3:
        notes.append(f"the sample made {len(measured.batches)} batch(es): too few to "
                     "measure how seconds per input vary; a larger --sample gives a range.")
    plan = {
        "pipeline": config.name,
        "target_inputs": target,
        "cluster": asdict(cluster),
        "measured_on": {"cpus": here.cpus, "gpus": here.gpus, "executor": full["executor"]},
        "sample": {"inputs": n, "seed": seed, "listed": measured.sample.listed,
                   "units_listed": measured.sample.units_listed,
                   "units": measured.sample.units,
                   "input_mb": _quantiles(sizes_in / 1e6)},
        "fixed_seconds": {k: round(v, 2) for k, v in fixed.items()},
        "seconds_per_input_here": {k: round(v, 6) for k, v in slopes.items()},
        "rows_per_input": _range(float(fan.mean()) if len(fan) else 0.0,
                                 fan_se / fan.mean() if len(fan) and fan.mean() else 0.0),
        "stages": stage_rows,
        "pools": pool_rows,
        "bottleneck": {"pool": top["stages"], "stage": top_stage,
                       "seconds": top["seconds"]},
        "gpus_to_keep_up_with_decoding": round(gpu_work * cpu_rate, 1)
        if gpu_work and math.isfinite(cpu_rate) else None,
        "wall_seconds": {"estimate": wall, "low": wall - variable * min(Z * wall_rse, 1.0),
                         "high": wall + variable * Z * wall_rse, "fixed": sum(fixed.values())},
        "gpu_hours": round(sum(r["gpu_hours"] for r in stage_rows), 3),
        "cpu_hours": round(sum(r["cpu_hours"] for r in stage_rows), 3),
        "rows": round(rows_target),
        "selected": round(selected),
        "table_bytes": _range(per_row_disk * rows_target, size_rse),
        "export_bytes": _range(export_per * selected, export_rse),
        "peak_mb_here": round(measured.peak_mb, 1),
        "notes": notes,
    }
    return plan


def balanced(sizes, seconds: dict[str, float], gpus: float) -> list[int]:
    """Workers of each pool once the GPU pools that autoscale share the GPUs by their work
    (GPU-seconds per input: the slowest gets the most, as Ray Data's autoscaler grows the
    pools where batches queue), each between 1 and its most; the others as planned."""
    auto = [i for i, size in enumerate(sizes)
            if size.gpus and size.min_workers != size.max_workers]
    fixed = sum(size.gpus * size.workers for i, size in enumerate(sizes) if i not in auto)
    work = {i: sum(seconds.get(n, 0.0) for n in sizes[i].stages) * sizes[i].gpus
            for i in auto}
    total = sum(work.values())
    out = [size.workers for size in sizes]
    # one worker each first (a pool never has none), then the rest by work
    left = max(gpus - fixed - sum(sizes[i].gpus for i in auto), 0.0)
    for i in auto:
        share = left * (work[i] / total if total else 1 / len(auto))
        out[i] = min(sizes[i].max_workers, 1 + int(share / sizes[i].gpus + 1e-6))
    return out


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"p10": round(float(p10), 3), "p50": round(float(p50), 3),
            "p90": round(float(p90), 3)}


def rerun_cost(config: Config, plan: dict) -> dict | None:
    """What a run of `config` on its existing table would compute (`curate run --plan`),
    costed with the sample's seconds per row; None where the table does not exist."""
    from curate.engine.run import plan_run
    from curate.table.store import Store

    if Store(config.store).dataset() is None:
        return None
    planned = plan_run(config)
    per_row = {s["name"]: s for s in plan["stages"]}
    stages, busy = [], 0.0
    for stage in planned.stages:
        rows = planned.rows_total if stage.whole else stage.computed
        measured = per_row.get(stage.name, {})
        seconds = rows * measured.get("seconds_per_row", 0.0)
        busy += seconds
        stages.append({"name": stage.name, "rows": rows, "why": stage.why,
                       "busy_seconds": round(seconds, 1),
                       "gpu_hours": round(seconds * measured.get("gpus_per_worker", 0.0)
                                          / 3600, 3)})
    return {"table_rows": planned.rows_total, "inputs_to_read": planned.inputs,
            "stages": stages, "busy_seconds": round(busy, 1)}


def plan(config: Config, sample: int, target: int | None, cluster: Cluster | None = None,
         seed: int = 0, scratch: Path | None = None) -> dict:
    """Measure `config` on a sample of `sample` inputs and project it to `target` inputs
    (default: the sample's listing, when it is the whole listing) on `cluster` (default:
    this machine). The scratch stores are removed unless `scratch` is given."""
    if cluster is not None and cluster.declared:
        cluster.check(config)  # before any work
    owned = scratch is None
    where = Path(tempfile.mkdtemp(prefix="curate-plan-")) if owned else Path(scratch)
    try:
        measured = measure(config, sample, seed, where, target)
    finally:
        if owned:
            shutil.rmtree(where, ignore_errors=True)
    if target is None:
        target = measured.sample.listed
    result = project(config, measured, target, cluster or Cluster.here(), seed)
    try:
        result["rerun"] = rerun_cost(config, result)
    except CurateError as exc:  # an unreachable store: the plan stands without it
        result["rerun"] = None
        result["notes"].append(f"what a rerun would compute is unknown: {exc}")
    return result


# --- output -------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:,.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds:,.1f} s"


def _bytes(value: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def _where(result: dict) -> str:
    c = result["cluster"]
    if c["declared"]:
        return (f"a cluster of {c['cpus']:g} CPUs and {c['gpus']:g} GPUs on {c['nodes']} "
                "node" + ("s" if c["nodes"] != 1 else ""))
    return f"this machine ({c['cpus']:g} CPUs, {c['gpus']:g} GPUs)"


def summary_lines(result: dict) -> list[str]:
    """The plan's totals, one line each (the CLI prints them under its tables)."""
    wall, fixed = result["wall_seconds"], result["fixed_seconds"]
    top = result["bottleneck"]
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in fixed.items())
    lines = [
        f"Wall time: {_duration(wall['estimate'])} ({_duration(wall['low'])} to "
        f"{_duration(wall['high'])}), of which fixed {_duration(wall['fixed'])} ({parts}).",
        f"Bottleneck: {top['stage']} (pool {' + '.join(top['pool'])}): "
        f"{_duration(top['seconds'])} of stream at the workers a run starts it with.",
        f"Peak memory: {result['peak_mb_here']:,.0f} MB for the sample's run process"
        + (" (its workers are its threads)" if result["measured_on"]["executor"] == "local"
           else "; per worker, see the pools") + ".",
        f"GPU-hours {result['gpu_hours']:,.2f}, CPU-hours {result['cpu_hours']:,.2f}.",
        f"Rows: {result['rows']:,} ({result['rows_per_input']['estimate']:.2f} per input, "
        f"{result['rows_per_input']['low']:.2f} to {result['rows_per_input']['high']:.2f}); "
        f"selected {result['selected']:,}.",
        f"Table: {_bytes(result['table_bytes']['estimate'])} "
        f"({_bytes(result['table_bytes']['low'])} to {_bytes(result['table_bytes']['high'])}); "
        f"export (WebDataset, original media): {_bytes(result['export_bytes']['estimate'])} "
        f"({_bytes(result['export_bytes']['low'])} to "
        f"{_bytes(result['export_bytes']['high'])}).",
    ]
    if result.get("gpus_to_keep_up_with_decoding"):
        lines.append(f"GPUs for the GPU pools to keep up with decoding: "
                     f"{result['gpus_to_keep_up_with_decoding']:g}.")
    rerun = result.get("rerun")
    if rerun:
        work = ", ".join(f"{s['name']} {s['rows']:,}" for s in rerun["stages"] if s["rows"])
        lines.append(f"A rerun on the existing table ({rerun['table_rows']:,} rows) would "
                     f"read {rerun['inputs_to_read']:,} inputs and compute: {work or 'nothing'}"
                     f"; {_duration(rerun['busy_seconds'])} of workers' time.")
    return lines


def print_plan(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    sample = result["sample"]
    title = (f"{result['pipeline']}: {result['target_inputs']:,} inputs on {_where(result)}, "
             f"from a sample of {sample['inputs']:,} (seed {sample['seed']}; "
             f"{sample['listed']:,} inputs listed in {sample['units_listed']} of "
             f"{sample['units']} listing units)")
    table = Table(title=title, title_justify="left")
    for column in ("stage", "rows in", "kept", "dropped", "s/row", "rows/s/worker",
                   "CPU-h", "GPU-h", "bytes/row"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for s in result["stages"]:
        cpu_note = " (CPU)" if s["measured_on_cpu"] else ""
        table.add_row(s["name"] + cpu_note, f"{s['rows_in']:,}", f"{s['kept']:,}",
                      f"{100 * s['drop_fraction']:.1f}% ±{200 * s['drop_fraction_se']:.1f}",
                      f"{s['seconds_per_row']:.4f}",
                      f"{s['rows_per_s_per_worker'] or 0:,.1f}", f"{s['cpu_hours']:,.2f}",
                      f"{s['gpu_hours']:,.2f}", f"{s['bytes_per_row']:,.0f}")
    console.print(table)
    pools = Table(title="actor pools at the target", title_justify="left")
    for column in ("pool", "CPUs/GPUs per worker", "workers", "busy s/input", "stream",
                   "balanced workers", "stream balanced", "worker peak MB"):
        pools.add_column(column, justify="left" if column == "pool" else "right")
    for p in result["pools"]:
        pools.add_row(" + ".join(p["stages"]), f"{p['cpus']:g}/{p['gpus']:g}",
                      f"{p['workers']}", f"{p['work_seconds_per_input']:.4f}",
                      _duration(p["seconds"]), f"{p['balanced_workers']:,}",
                      _duration(p["balanced_seconds"]),
                      "-" if p["worker_peak_mb"] is None else f"{p['worker_peak_mb']:,.0f}")
    console.print(pools)
    for line in summary_lines(result):
        console.print(line, highlight=False)
    for note in result["notes"]:
        console.print(f"[yellow]Note:[/] {note}", highlight=False)


def render_html(result: dict) -> str:
    """A small self-contained report: the totals and a bar per stage of its hours."""
    import html

    from curate.report import STYLE, bar_chart

    rows = [(s["name"], s["gpu_hours"], s["cpu_hours"]) for s in result["stages"]]
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(result))
    notes = "".join(f"<p class='note'>Note: {html.escape(n)}</p>" for n in result["notes"])
    cells = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td>{s['rows_in']:,}</td><td>{s['kept']:,}</td>"
        f"<td>{s['seconds_per_row']:.4f}</td><td>{s['gpu_hours']:,.2f}</td>"
        f"<td>{s['cpu_hours']:,.2f}</td></tr>" for s in result["stages"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>curate plan: "
            f"{html.escape(result['pipeline'])}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(result['pipeline'])}: {result['target_inputs']:,} inputs on "
            f"{html.escape(_where(result))}</h1><ul>{lines}</ul>{notes}"
            "<h2>Hours per stage</h2><p class='muted'>blue: GPU-hours, grey: CPU-hours</p>"
            + bar_chart(rows, words=("GPU-h", "CPU-h"), colors=("#3b6fb6", "#9aa3ad"))
            + "<h2>Stages</h2><table><tr><th>stage</th><th>rows in</th><th>kept</th>"
            f"<th>s/row</th><th>GPU-h</th><th>CPU-h</th></tr>{cells}</table></body></html>")


if __name__ == "__main__":  # a sample's run, in a process of its own (see `_run`)
    _run_here(*sys.argv[1:4])
