"""Human-readable output: the per-stage table printed at the end of a run, and the
stage reference generated from the registry."""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic_core import PydanticUndefined
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from curate.engine.run import RunSummary
from curate.registry import stage_types
from curate.stage import GlobalStage, RowStage, Source, Stage, StageParams


def print_summary(summary: RunSummary, console: Console | None = None) -> None:
    console = console or Console()
    if summary.status == "up_to_date":
        console.print(
            f"[green]Nothing to do:[/] {summary.table} at {summary.store_uri} is up to date "
            f"with this config (version {summary.version_after})."
        )
    table = Table(title=f"{summary.pipeline}: per-stage results", title_justify="left")
    for column, justify in (("stage", "left"), ("rows in", "right"), ("kept", "right"),
                            ("dropped", "right"), ("dropped by reason", "left"),
                            ("computed", "right"), ("reused", "right"),
                            ("seconds", "right")):
        table.add_column(column, justify=justify)
    for stage in summary.stages:
        reasons = ", ".join(f"{k} {v}" for k, v in stage.reasons.items()) or "-"
        table.add_row(stage.name, f"{stage.rows_in:,}", f"{stage.kept:,}", f"{stage.dropped:,}",
                      reasons, _computed(stage), f"{stage.rows_reused:,}",
                      f"{stage.seconds:.2f}")
    console.print(table)
    for stage in summary.stages:
        if stage.report:
            facts = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in stage.report.items())
            console.print(f"  {stage.name}: {facts}")
    if summary.pools:
        console.print(_pools_table(summary.pools))
    for notice in summary.notices:
        console.print(f"[yellow]Note:[/] {notice}")
    if summary.status != "up_to_date":
        console.print(
            f"Curated [bold]{summary.selected:,}[/] of {summary.rows_total:,} samples "
            f"({summary.rows_processed:,} read in this run) in {summary.seconds:.1f} s"
            f"{' on Ray' if summary.executor == 'ray' else ', in this process'}."
        )
        console.print(
            f"Table [bold]{summary.table}[/] at {summary.store_uri}, version "
            f"{summary.version_after} (tag {summary.tag})."
        )


def _pools_table(pools: list[dict]) -> Table:
    """The row stream's actor pools: what each worker reserved, how many workers, and how
    many were busy on average (an idle GPU shows here)."""
    table = Table(title="actor pools", title_justify="left")
    for column in ("pool", "GPUs/worker", "CPUs/worker", "workers (start, min-max)",
                   "workers used (peak)", "busy workers", "rows/s"):
        table.add_column(column, justify="left" if column == "pool" else "right")
    for pool in pools:
        table.add_row(" + ".join(pool["stages"]), f"{pool['gpus']:g}", f"{pool['cpus']:g}",
                      f"{pool['workers']} ({pool['min_workers']}-{pool['max_workers']})",
                      f"{pool['workers_used']} ({pool.get('peak_workers', '-')})",
                      f"{pool['busy_workers']:.2f}",
                      f"{pool['rows_per_s']:,.1f}")
    return table


def print_plan(plan, console: Console | None = None) -> None:
    """What a run would compute, per stage and why (`curate run --plan`)."""
    console = console or Console()
    table = Table(title=f"{plan.pipeline}: what a run would compute ({plan.rows_total:,} rows "
                  f"in {plan.table})", title_justify="left")
    for column, justify in (("stage", "left"), ("compute", "right"), ("verdicts", "right"),
                            ("why", "left")):
        table.add_column(column, justify=justify)
    for stage in plan.stages:
        if stage.whole:
            table.add_row(stage.name, "-", "-", "global: over the rows alive, on any change")
            continue
        why = ", ".join(f"{k} {v:,}" for k, v in stage.why.items()) or "-"
        table.add_row(stage.name, f"{stage.computed:,}", f"{stage.verdicts:,}", why)
    console.print(table)
    console.print(f"Inputs to read: {plan.inputs:,}. Nothing was computed or written.")


def _computed(stage) -> str:
    text = f"{stage.rows_computed:,}"
    if stage.verdicts_redecided:
        text += f" (+{stage.verdicts_redecided:,} verdicts)"
    return text


# --- stage reference -----------------------------------------------------------------------


def _example_stage(cls: type[Stage]) -> Stage:
    """A stage with default params, without validation (some params are required)."""
    params = cls.Params.model_construct(type=cls.type)
    return cls(params)


def _default(info) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default_factory() if info.default_factory else info.default
    if isinstance(value, StageParams.model_fields["resources"].annotation):
        return "see resources"
    return repr(value)


def _type_name(annotation) -> str:
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return " / ".join(str(a) for a in args)
    if args and get_origin(annotation) in (Union, UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or None" if type(None) in args else "")
    if args:
        return f"{getattr(annotation, '__name__', annotation)}[{', '.join(map(_type_name, args))}]"
    return getattr(annotation, "__name__", str(annotation))


def stage_reference() -> list[dict[str, Any]]:
    out = []
    for name, cls in stage_types().items():
        stage = _example_stage(cls)
        params = []
        for key, info in cls.Params.model_fields.items():
            if key in ("type", "name", "resources"):
                continue
            description = info.description or ""
            if key in getattr(cls, "threshold_params", ()):
                description += (" (a threshold: a change decides the verdicts again from the "
                                "stored scores, computing nothing)")
            params.append({"name": key, "type": _type_name(info.annotation),
                           "default": _default(info), "description": description.strip()})
        try:
            reads = list(stage.reads())
        except Exception:
            reads = []
        out.append({
            "type": name,
            "summary": (cls.__doc__ or "").strip().splitlines()[0],
            "kind": " + ".join(k for k, on in (("row", isinstance(stage, RowStage)
                                                       and not stage.own_pool),
                                               ("row on its own pool", stage.own_pool),
                                               ("global", isinstance(stage, GlobalStage)),
                                               ("source", isinstance(stage, Source))) if on),
            "params": params,
            "reads": reads,
            "writes": _writes(stage),
            "verdict": stage.verdict_column,
        })
    return out


def _writes(stage: Stage) -> dict[str, str]:
    try:
        return {k: str(v) for k, v in stage.writes().items()}
    except Exception:  # types that depend on the model or on required params
        return {k: "type set by the model or the params" for k in stage.written_names()}


def stage_reference_markdown() -> str:
    lines = [
        "Every stage also takes `name` (used in reasons and reports; default: the type) and",
        "`resources` (`cpus`, `gpus`, `batch_size`, `concurrency`).",
        "",
    ]
    for ref in stage_reference():
        lines += [f"### `{ref['type']}`", "", f"{ref['summary']} ({ref['kind']} stage)", ""]
        lines += ["| parameter | type | default | meaning |", "|---|---|---|---|"]
        for p in ref["params"]:
            lines.append(f"| `{p['name']}` | {p['type']} | `{p['default']}` | "
                         f"{p['description']} |")
        reads = ", ".join(f"`{c}`" for c in ref["reads"]) or "nothing"
        writes = ", ".join(f"`{c}` ({t})" for c, t in ref["writes"].items())
        lines += ["", f"Reads: {reads}. Writes: {writes}.", ""]
        if ref["verdict"]:
            lines += [f"Verdict column: `{ref['verdict']}` (null when the row passes).", ""]
    return "\n".join(lines).rstrip() + "\n"


def print_stage_reference(console: Console | None = None) -> None:
    console = console or Console()
    for ref in stage_reference():
        table = Table(title=escape(f"{ref['type']} ({ref['kind']}): {ref['summary']}"),
                      title_justify="left")
        for column in ("parameter", "type", "default", "meaning"):
            table.add_column(column)
        for p in ref["params"]:  # plain text: "extra [vllm]" is not Rich markup
            table.add_row(*(escape(p[key]) for key in ("name", "type", "default",
                                                      "description")))
        console.print(table)
        console.print(f"  reads: {', '.join(ref['reads']) or '-'}")
        console.print(f"  writes: {', '.join(ref['writes'])}\n")
