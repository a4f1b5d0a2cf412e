"""`curate`: run, validate, list stages, submit to a cluster, serve, report, export.

Exit codes: 0 done; 1 the run failed; 2 the config (or a command line) is invalid;
130 interrupted (Ctrl-C), 143 stopped by SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from curate.errors import ConfigError, CurateError

app = typer.Typer(
    help="Curate image and video datasets with Ray into one LanceDB table.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
if not console.is_terminal:
    console.width = 120  # logs and pipes: wide enough for the per-stage table
err = Console(stderr=True, soft_wrap=True)  # an error is one line, never wrapped
#: -v: tracebacks of unexpected failures are printed, not only their one line
VERBOSE = False


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("-v", "--verbose",
                                          help="show tracebacks and library logs")] = False,
) -> None:
    global VERBOSE
    VERBOSE = verbose


def _unexpected(exc: BaseException, more: str = "") -> None:
    """One line for a failure that is not curate's own error (a worker died, the disk
    filled): what it was, and how to see more. -v adds the traceback."""
    import traceback

    from curate.errors import describe_failure

    if VERBOSE:
        traceback.print_exception(exc)
    hint = "" if VERBOSE else " (run with -v for the traceback)"
    err.print(f"[red]error:[/] {describe_failure(exc)}{hint}{more}", highlight=False)

@contextlib.contextmanager
def _quiet(store_uri: str, table: str):
    """Ray's, Lance's and FFmpeg's output goes to a log file under the store unless -v;
    curate's errors end the command in one line naming that log (yields that note)."""
    from curate.logs import library_output_to, log_path

    log = None if VERBOSE else log_path(store_uri, table)
    with library_output_to(log) as terminal:
        err.file = terminal  # None: stderr, as always
        more = f" (libraries' log: {log})" if terminal else ""
        try:
            yield more
        except CurateError as exc:
            err.print(f"[red]error:[/] {exc}{more}", highlight=False)
            raise typer.Exit(1) from None
        except (typer.Exit, KeyboardInterrupt):
            raise
        except Exception as exc:  # a worker's failure, the machine's: one line
            _unexpected(exc, more)
            raise typer.Exit(1) from None
        finally:
            err.file = None

def _store_of(config: Path | None, store: str | None, table: str):
    """The store a command works on: the one a config names, or --store and --table."""
    from curate.config import StoreConfig

    if config is not None:
        return _load(config, None).store
    if store is not None:
        return StoreConfig(uri=store, table=table)
    err.print("[red]error:[/] pass --config CONFIG or --store URI", highlight=False)
    raise typer.Exit(2)


SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045  (typer needs Optional here)
    typer.Option("--set", help="override a config value: dotted.key=value (repeatable)"),
]
ConfigArg = Annotated[Path, typer.Argument(help="pipeline config (YAML)")]


def _load(config: Path, overrides: list[str] | None):
    from curate.config import load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def validate(config: ConfigArg, set_: SetOption = None) -> None:
    """Check a config without running it (exit 0 valid, 2 invalid)."""
    cfg = _load(config, set_)
    names = ", ".join(p.name or p.type for p in cfg.stages)
    console.print(f"[green]valid[/]: {cfg.name}, {len(cfg.stages)} stages ({names}); "
                  f"config hash {cfg.config_hash()}")


@app.command()
def run(
    config: ConfigArg,
    set_: SetOption = None,
    address: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Ray cluster to join ('auto' on a cluster node); default: local"),
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    json_out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--json", help="also write the run summary as JSON to this file"),
    ] = None,
    force_after: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--force-after", metavar="SECONDS",
                     help="take over the table from a run not heard from for this long "
                          "(default: 600; a run whose process is gone is taken over at once)"),
    ] = None,
    plan: Annotated[bool, typer.Option(
        "--plan", help="only say what a run would compute, per stage and why")] = False,
) -> None:
    """Run (or resume) a pipeline, then print what each stage did."""
    from curate import stopping
    from curate.pipeline import Pipeline
    from curate.summary import print_plan, print_summary

    cfg = _load(config, set_)
    pipeline = Pipeline.from_config(cfg)
    if plan:
        with _quiet(cfg.store.uri, cfg.store.table):
            planned = pipeline.plan(address=address)
        print_plan(planned, console)
        if json_out:
            json_out.write_text(json.dumps(dataclasses.asdict(planned), indent=2))
        return
    show_progress = progress and sys.stderr.isatty()
    # Ctrl-C and SIGTERM interrupt the run (it resumes); Ray stops with the command
    with stopping.on_signals():
        with _quiet(cfg.store.uri, cfg.store.table):
            try:
                summary = pipeline.run(progress=show_progress, address=address,
                                       force_after_s=force_after)
            except KeyboardInterrupt:
                err.print("[yellow]interrupted[/]: finished batches are in the table; run "
                          "the same command again to resume.")
                raise typer.Exit(stopping.exit_code()) from None
        print_summary(summary, console)
        if json_out:  # before the shutdown, which a deadline may end with the process
            json_out.write_text(json.dumps(summary.to_dict(), indent=2, default=str))


@app.command()
def stages(
    markdown: Annotated[bool, typer.Option(help="print the Markdown reference")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the registered stages: parameters, defaults, columns read and written."""
    from curate.summary import print_stage_reference, stage_reference, stage_reference_markdown

    if markdown:
        sys.stdout.write(stage_reference_markdown())
    elif as_json:
        sys.stdout.write(json.dumps(stage_reference(), indent=2) + "\n")
    else:
        print_stage_reference(console)


@app.command()
def submit(
    config: ConfigArg,
    address: Annotated[str, typer.Option(help="Ray dashboard address, http://HEAD:8265")],
    set_: SetOption = None,
    wait: Annotated[bool, typer.Option(help="stream the job's logs until it ends")] = True,
    working_dir: Annotated[
        Path, typer.Option(help="uploaded as the job's working directory")
    ] = Path("."),
    pip: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="pip requirement for the job (repeatable; default: curate's own "
                     "and those of the extras the config's stages need)"),
    ] = None,
    no_pip: Annotated[
        bool, typer.Option("--no-pip", help="install nothing: the cluster has the packages")
    ] = False,
) -> None:
    """Submit a run as a Ray job; exit with the job's status (0 succeeded)."""
    from curate.submit import submit_run

    _load(config, set_)  # a bad config fails here, not on the cluster
    try:
        code = submit_run(config, address=address, overrides=set_ or [], wait=wait,
                          working_dir=working_dir, pip=None if no_pip else pip,
                          install=not no_pip, console=console)
    except CurateError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


Opt = Optional  # typer needs Optional; the alias keeps these signatures short


@app.command()
def serve(
    config: Annotated[Opt[Path], typer.Option(help="serve config (YAML)")] = None,
    store: Annotated[Opt[str], typer.Option(help="LanceDB store URI")] = None,
    table: Annotated[Opt[str], typer.Option(help="samples table")] = None,
    host: Annotated[Opt[str], typer.Option(help="bind address")] = None,
    port: Annotated[Opt[int], typer.Option(help="HTTP port")] = None,
    token: Annotated[Opt[str], typer.Option(
        help="require Authorization: Bearer TOKEN (default: $CURATE_TOKEN)",
        envvar="CURATE_TOKEN")] = None,
    pipeline: Annotated[Opt[Path], typer.Option(
        help="pipeline whose model stages compute features (default: the latest run's)"
    )] = None,
    address: Annotated[Opt[str], typer.Option(
        help="Ray cluster to join; default: local")] = None,
    set_: SetOption = None,
) -> None:
    """Serve the table: REST API, on-demand features and the gallery, on Ray Serve."""
    import time

    from curate.serve.config import load_serve_config

    flags = {"store.uri": store, "store.table": table, "host": host, "port": port,
             "token": token, "pipeline": str(pipeline) if pipeline else None}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(set_ or [])
    try:
        cfg = load_serve_config(config, overrides)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    from curate import stopping
    from curate.serve.server import start, stop

    # Ctrl-C or SIGTERM (whatever the process inherited) stops Serve, then Ray and every
    # process it started, within CURATE_STOP_TIMEOUT seconds
    with stopping.on_signals():
        try:
            url = start(cfg, address=address)
            console.print(f"Serving [bold]{cfg.store.table}[/] of {cfg.store.uri} at "
                          f"[bold]{url}/[/] (API docs {url}/docs)"
                          f"{' with a token' if cfg.token else ''}. Ctrl-C stops.",
                          soft_wrap=True)  # one line: a URL is never cut
            sys.stdout.flush()  # out now, even where the stop must end the process hard
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("stopping")
        except CurateError as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        finally:
            stop()


@app.command(name="plan")
def plan_command(
    config: ConfigArg,
    sample: Annotated[int, typer.Option(min=2, help="inputs of the seeded sample to run")] = 200,
    target: Annotated[Opt[int], typer.Option(
        min=1, help="inputs of the whole corpus (default: all the config lists)")] = None,
    cluster: Annotated[Opt[str], typer.Option(
        help="project onto cpus=N,gpus=N,nodes=N (default: this machine)")] = None,
    seed: Annotated[int, typer.Option(help="which sample")] = 0,
    set_: SetOption = None,
    json_out: Annotated[Opt[Path], typer.Option("--json", help="write the plan as JSON")] = None,
    html_out: Annotated[Opt[Path], typer.Option(
        "--html", help="write a small HTML report with a bar per stage")] = None,
    scratch: Annotated[Opt[Path], typer.Option(
        help="keep the sample's stores here (default: a temporary directory, removed)")] = None,
) -> None:
    """Run the config on a seeded sample into a scratch store and project the whole corpus:
    wall time, GPU- and CPU-hours per stage, the bottleneck, table and export size."""
    from curate.forecast import Cluster, plan, print_plan, render_html

    cfg = _load(config, set_)
    try:
        where = Cluster.parse(cluster) if cluster else None
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    with _quiet(cfg.store.uri, cfg.store.table):
        try:
            result = plan(cfg, sample, target, where, seed, scratch)
        except ConfigError as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
    print_plan(result, console)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    if html_out:
        html_out.write_text(render_html(result))


@app.command()
def report(
    store: Annotated[str, typer.Option(help="LanceDB store URI")] = "./curate_data",
    table: Annotated[str, typer.Option(help="samples table")] = "samples",
    out: Annotated[Path, typer.Option(help="HTML file to write")] = Path("report.html"),
    examples: Annotated[int, typer.Option(help="example images per grid")] = 8,
) -> None:
    """Write one self-contained HTML report of the table's latest run."""
    from curate.config import StoreConfig
    from curate.report import write_report

    try:
        write_report(StoreConfig(uri=store, table=table), out, examples)
    except CurateError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"Report written to [bold]{out}[/] ({out.stat().st_size / 1e3:.0f} kB).")


@app.command()
def export(
    out: Annotated[str, typer.Option(
        help="directory, or object-store prefix (s3://bucket/prefix), to write into")],
    format: Annotated[str, typer.Option(help="webdataset | parquet")] = "webdataset",
    config: Annotated[Opt[Path], typer.Option(help="pipeline config naming the store")] = None,
    store: Annotated[Opt[str], typer.Option(help="LanceDB store URI")] = None,
    table: Annotated[str, typer.Option(help="samples table")] = "samples",
    where: Annotated[Opt[str], typer.Option(help="filter rows (the API's language)")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="every row, not only selected")] = False,
    limit: Annotated[Opt[int], typer.Option(help="at most this many samples")] = None,
    seed: Annotated[Opt[int], typer.Option(help="shuffle deterministically")] = None,
    columns: Annotated[Opt[str], typer.Option(
        help="metadata columns, comma-separated (default: every scalar column)")] = None,
    shard_size: Annotated[Opt[int], typer.Option(
        help="samples per shard (default 1000) or Parquet part (default 50000)")] = None,
    shard_bytes: Annotated[Opt[int], typer.Option(help="bytes per shard, about")] = None,
    prefix: Annotated[str, typer.Option(help="shard names: PREFIX-000000.tar")] = "shard",
    image_format: Annotated[Opt[str], typer.Option(
        help="re-encode images as jpg | png | webp (default: the original bytes)")] = None,
    max_side: Annotated[Opt[int], typer.Option(help="downscale media to this side")] = None,
    buckets: Annotated[Opt[str], typer.Option(
        help="aspect-ratio buckets: sdxl or WxH,WxH,...")] = None,
    group_by_bucket: Annotated[bool, typer.Option(help="shards of one bucket each")] = False,
    media: Annotated[str, typer.Option(help="parquet: bytes | uri")] = "bytes",
    version: Annotated[Opt[str], typer.Option(help="table version or tag")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier export in --out")] = False,
    storage_option: Annotated[Opt[list[str]], typer.Option(
        help="KEY=VALUE, repeated: how to reach an object-store --out (aws_endpoint, "
             "aws_region, ...); default: the store's media_storage_options, else the "
             "environment's credentials")] = None,
    address: Annotated[Opt[str], typer.Option(help="Ray cluster to join; default: local")] = None,
    executor: Annotated[str, typer.Option(
        help="ray | local (threads here) | auto: local for a table of up to 20,000 rows "
             "when no cluster is given")] = "auto",
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Export the selection as WebDataset shards or Parquet, for training."""
    from curate.export import export as run_export
    from curate.export import parse_options

    store_config = _store_of(config, store, table)
    pairs = [item.partition("=") for item in storage_option or []]
    if any(not key or not sep for key, sep, _ in pairs):
        err.print("[red]error:[/] --storage-option takes KEY=VALUE", highlight=False)
        raise typer.Exit(2)
    raw = {"format": format, "out": out, "where": where, "all": all_rows,
           "storage_options": {key: value for key, _, value in pairs},
           "limit": limit, "seed": seed, "shard_size": shard_size,
           "shard_bytes": shard_bytes, "prefix": prefix, "image_format": image_format,
           "max_side": max_side, "buckets": buckets, "group_by_bucket": group_by_bucket,
           "media": media, "overwrite": overwrite, "executor": executor,
           "columns": [c.strip() for c in columns.split(",") if c.strip()] if columns else None,
           "version": int(version) if version and version.isdigit() else version}
    try:
        options = parse_options(raw)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    with _quiet(store_config.uri, store_config.table):
        summary = run_export(store_config, options, progress=progress and sys.stderr.isatty(),
                             address=address)
    kind = "shards" if summary.format == "webdataset" else "parts"
    console.print(f"Exported [bold]{summary.written:,}[/] of {summary.selected:,} selected "
                  f"samples of {summary.table} (version {summary.version}) as "
                  f"{len(summary.files)} {summary.format} {kind} into {summary.out} in "
                  f"{summary.seconds:.1f} s; index: {summary.index}")
    if summary.reviewed:
        console.print(f"{summary.reviewed:,} of the selection carry a person's verdict")
    for reason, count in sorted(summary.skipped.items()):
        console.print(f"[yellow]left out[/] {count:,} ({reason}), e.g. "
                      f"{summary.skipped_examples.get(reason, '')}", highlight=False)


@app.command()
def repair(
    config: Annotated[Opt[Path], typer.Option(help="pipeline config naming the store")] = None,
    store: Annotated[Opt[str], typer.Option(help="LanceDB store URI")] = None,
    table: Annotated[str, typer.Option(help="samples table")] = "samples",
    address: Annotated[Opt[str], typer.Option(help="Ray cluster to join; default: local")] = None,
) -> None:
    """Keep one row of each sample_id that a table holds more than once (left by runs that
    shared it), under the table's run lease. The next `curate run` sets the verdicts again."""
    from curate.engine.backend import choose
    from curate.engine.tasks import remove_duplicate_rows
    from curate.table.lease import RunLease
    from curate.table.store import Store

    store_config = _store_of(config, store, table)
    try:
        target = Store(store_config)
        if target.table() is None:
            raise CurateError(f"no table {target.name} at {target.uri}")
        with RunLease(target, "repair"):
            removed = remove_duplicate_rows(choose("auto", address), target)
    except CurateError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"{target.name} at {target.uri}: "
                  + (f"removed {removed:,} duplicate rows; run the pipeline again to set "
                     "the verdicts" if removed else "no duplicate sample_ids"))


def main() -> None:
    try:
        app()
    except Exception as exc:  # anything a command did not turn into its own error
        _unexpected(exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
