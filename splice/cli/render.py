"""rich output for the CLI: the progress bar and report tables. Every string shown is plain text: rich markup
in it is escaped and control characters (a terminal's escape sequences) are shown as `\\xNN`, since much of it
is read from files (manifests, health records, messages) that anyone could have written."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from splice.cli.flags import with_flags

if TYPE_CHECKING:
    from splice.adapters.drift import DriftReport
    from splice.merge.localize_stitch import StitchReport
    from splice.merge.soup import GreedySoupReport
    from splice.merge.stats.datamerge import DataMergeReport
    from splice.registry.health import HealthRecord
    from splice.tensors.stream import StreamReport
    from splice.workflows.continual.predict import LoadedBank, Predictions
    from splice.workflows.continual.report import ContinualReport
    from splice.workflows.deploy import DeploymentRecord
    from splice.workflows.inspect import ModelSummary, PatchSummary
    from splice.workflows.localize import Localization
    from splice.workflows.patch_merge import PatchMergeReport
    from splice.workflows.placement import MaskPlacement
    from splice.workflows.stages import StagesReport
    from splice.workflows.sweep.results import SweepReport
    from splice.workflows.sweep.study import TrialRecord

console = Console()
error_console = Console(stderr=True)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(value: object) -> str:
    """`value` as text that prints as itself: markup escaped, control characters written as \\xNN."""
    return escape(_CONTROL.sub(lambda found: f"\\x{ord(found[0]):02x}", str(value)))


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


_ACTIVE_BARS: list[Progress] = []  # bars still drawing: an error or Ctrl-C mid-run stops them first


def stop_progress() -> None:
    """Stop every bar still drawing, so the line printed next is the last one on the screen."""
    while _ACTIVE_BARS:
        _ACTIVE_BARS.pop().stop()


class ItemRateColumn(ProgressColumn):
    """Items per second (samples/s while training), blank until rich has a rate."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} {self.unit}/s" if task.speed else "")


class RichProgress:
    """Tensors and bytes done, rate and ETA, on stderr; silent when quiet."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._items = 0
        self._total_items = 0
        self._by_items = False

    def start(self, description: str, total_items: int, total_bytes: int, unit: str = "tensors") -> None:
        """A bar over bytes (with size and rate columns), or over items when there are no bytes to count (training
        epochs: samples, with their rate)."""
        if self.quiet:
            return
        self._items, self._total_items = 0, total_items
        self._by_items = total_bytes == 0
        sizes = (ItemRateColumn(unit),) if self._by_items else (DownloadColumn(), TransferSpeedColumn())
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[items]}/{task.fields[total_items]} " + unit),
            *sizes,
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=error_console,
            transient=False,
        )
        self._bar.start()
        _ACTIVE_BARS.append(self._bar)
        total = total_items if self._by_items else total_bytes
        self._task = self._bar.add_task(description, total=max(total, 1), items=0, total_items=total_items)

    def advance(self, items: int, nbytes: int) -> None:
        if self._bar is None or self._task is None:
            return
        self._items += items
        self._bar.update(self._task, advance=items if self._by_items else nbytes, items=self._items)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            if self._bar in _ACTIVE_BARS:
                _ACTIVE_BARS.remove(self._bar)
            self._bar = None


def table(title: str, columns: list[str], rows: Iterable[Sequence[object]]) -> Table:
    out = Table(title=plain(title), title_justify="left")
    for column in columns:
        out.add_column(plain(column), overflow="fold")
    for row in rows:
        out.add_row(*(plain(cell) for cell in row))
    return out


def stream_report_table(title: str, report: StreamReport) -> Table:
    return table(
        title,
        ["output", "tensors", "read", "written", "shards", "device", "seconds"],
        [
            [
                report.out,
                report.tensors,
                human_bytes(report.bytes_read),
                human_bytes(report.bytes_written),
                len(report.shard_files),
                report.device,
                f"{report.seconds:.2f}",
            ]
        ],
    )


def data_merge_line(report: DataMergeReport) -> str:
    """How a RegMean / Fisher merge covered the tensors, and which RegMean systems needed the pseudo-inverse."""
    covered = ", ".join(f"{count} by {rule}" for rule, count in report.rules.items())
    line = f"{report.method}: {covered}"
    if report.solves:
        line += f"; largest condition number {max(s.condition for s in report.solves):.3g}"
    pinv = report.pseudo_inverse_layers
    if pinv:
        line += f"; ill-conditioned, solved by pseudo-inverse: {', '.join(pinv)}"
    return line


def method_report_views(report: DataMergeReport | StitchReport) -> Sequence[RenderableType]:
    """What a merge method says of its run, under the stream's table: a stitch's regions, a RegMean / Fisher merge's
    line."""
    from splice.merge.localize_stitch import StitchReport

    if isinstance(report, StitchReport):
        return stitch_tables(report)
    return [data_merge_line(report)]


STITCH_TENSORS_SHOWN = 20


def stitch_tables(report: StitchReport) -> list[Table]:
    """A Localize-and-Stitch merge: each task's region (its size, the share of it no other region covers), every
    pair's overlap (Jaccard), and the tensors holding the most region entries."""
    models = [task.model for task in report.tasks]
    title = (
        f"{report.method}: {report.covered:,} of {report.parameters:,} entries stitched "
        f"({_share(report.covered, report.parameters)}), {report.shared:,} of them in two or more regions (averaged)"
    )
    carried = sum(task.carried for task in report.tasks)
    if carried:
        title += f"; and {carried:,} entries of tensors regions carry whole (a learned region's head), averaged too"
    tables = [
        table(
            title,
            ["model", "mask", "region", "of the model", "unshared", "kept unshared", "carried whole"],
            [
                [
                    task.model,
                    task.mask,
                    f"{task.entries:,}",
                    _share(task.entries, report.parameters),
                    f"{task.unshared:,}",
                    _percent(task.unshared_share),
                    f"{task.carried:,}" if task.carried else "-",
                ]
                for task in report.tasks
            ],
        )
    ]
    if report.overlaps:
        tables.append(
            table(
                "overlap of the regions",
                ["region", "region", "shared entries", "Jaccard"],
                [[o.first, o.second, f"{o.shared:,}", _figure(o.jaccard, ".4f")] for o in report.overlaps],
            )
        )
    most = {t.name for t in sorted(report.tensors, key=lambda t: sum(t.entries), reverse=True)[:STITCH_TENSORS_SHOWN]}
    shown = [t for t in report.tensors if t.name in most]
    left_out = len(report.tensors) - len(shown)
    which = f"the {len(shown)} holding the most entries of {len(report.tensors)} (--json lists all)" if left_out else ""
    tables.append(
        table(
            f"where the regions fall: {which or f'{len(shown)} tensors'}",
            ["tensor", *models, "in 2+ regions"],
            [[t.name, *(f"{n:,}" for n in t.entries), f"{t.shared:,}"] for t in shown],
        )
    )
    return tables


def _share(part: int, whole: int) -> str:
    """A small share as a percentage with three significant digits (a region is often 0.01% of a model)."""
    return f"{100 * part / whole:.3g}%" if whole else "-"


def stages_report_table(title: str, report: StagesReport) -> Table:
    """One row per stage of a multi-stage recipe: whether it ran or was reused, where it is, what it moved."""
    rows = []
    for stage in report.stages:
        streamed = stage.report
        rows.append(
            [
                stage.name or "(final)",
                stage.status,
                stage.out,
                "" if streamed is None else streamed.tensors,
                "" if streamed is None else human_bytes(streamed.bytes_read),
                "" if streamed is None else human_bytes(streamed.bytes_written),
                "" if streamed is None else f"{streamed.seconds:.2f}",
            ]
        )
    return table(title, ["stage", "status", "output", "tensors", "read", "written", "seconds"], rows)


def greedy_soup_table(report: GreedySoupReport) -> Table:
    return table(
        f"greedy soup -> {report.out}",
        ["ingredient", "held-out score", "soup score", "kept"],
        [
            [
                s.model,
                f"{s.score:.4f}",
                "" if s.soup_score is None else f"{s.soup_score:.4f}",
                ("yes (tie)" if s.tie else "yes") if s.kept else "no",
            ]
            for s in report.steps
        ],
    )


def patch_merge_table(report: PatchMergeReport) -> Table:
    """One row: what the merged patch holds; for LoRA, its ranks and the least energy a matrix kept."""
    ranks = sorted({t.rank for t in report.tensors if t.rank is not None})
    kept = [t for t in report.tensors if t.captured_energy is not None]
    least = min(kept, key=lambda t: t.captured_energy or 0.0) if kept else None
    lora = ["rank", "least energy kept"] if ranks else []
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}" if ranks else ""
    energy = f"{least.captured_energy:.4f} ({least.name})" if least and least.captured_energy is not None else ""
    return table(
        f"{report.method} merge of {len(report.inputs)} {report.kind} patches -> {report.out}",
        ["tensors", *lora, "parameters", "base fingerprint"],
        [
            [
                len(report.tensors),
                *([rank, energy] if ranks else []),
                f"{report.parameters:,}",
                report.base_digest[:19] if report.base_digest else "none",
            ]
        ],
    )


def deployment_table(title: str, record: DeploymentRecord) -> Table:
    """What a deployment carries: one row per patch version."""
    return table(
        title,
        ["ref", "version", "kind", "digest", "base check"],
        [[p.ref, f"{p.name}@{p.version}", p.kind, p.digest[:19], p.base_check] for p in record.patches],
    )


def summary_tables(summary: ModelSummary | PatchSummary) -> list[Table]:
    """What `splice inspect` shows of a model or a patch (statistics among them)."""
    from splice.workflows.inspect import PatchSummary

    if not isinstance(summary, PatchSummary):
        return model_summary_tables(summary)
    statistics = summary.kind == "stats"
    return [
        table(
            f"{summary.location} ({summary.kind}: {summary.settings})",
            ["tensors", "size", "targets", "model fingerprint", "created"],
            [
                [
                    len(summary.tensors),
                    human_bytes(summary.nbytes),
                    summary.targets,
                    (summary.model_fingerprint or "none")[:19],
                    summary.created,
                ]
            ],
        ),
        table(
            "tensors",
            ["tensor", "shape", "dtype", "size", *(["tokens", "layers"] if statistics else [])],
            [
                [
                    t.name,
                    "x".join(map(str, t.shape)),
                    t.dtype,
                    human_bytes(t.nbytes),
                    *([t.tokens if t.tokens is not None else "", t.serves] if statistics else []),
                ]
                for t in summary.tensors
            ],
        ),
        *([placement_table(summary.placement)] if summary.placement is not None else []),
        *(
            [table("metrics", ["metric", "value"], [[k, f"{v:.6g}"] for k, v in summary.metrics.items()])]
            if summary.metrics
            else []
        ),
    ]


def placement_table(placement: MaskPlacement) -> Table:
    """Where a mask patch's entries lie: the entries selected per layer (rows) and module type (columns), with each
    row's and column's totals and the share of the covered entries selected. The row names and totals are never
    folded; a narrow terminal folds the module types' names at their dots."""
    out = Table(
        title="where the mask's entries lie (entries selected; share: of the entries of the tensors it covers)",
        title_justify="left",
    )
    out.add_column("layer", no_wrap=True)
    for module in placement.modules:
        out.add_column(
            Text.from_markup(plain(module).replace(".", ".\n"), justify="left"), justify="right", overflow="fold"
        )
    out.add_column("total", justify="right", no_wrap=True)
    out.add_column("share", justify="right", no_wrap=True)
    columns = placement.columns
    rows = [(row.name, row.cells, row.total) for row in placement.rows] + [("total", columns, placement.total)]
    for name, cells, total in rows:
        counts = (f"{cells[m].selected:,}" if m in cells else "" for m in placement.modules)
        out.add_row(plain(name), *counts, f"{total.selected:,}", f"{total.share:.3g}")
    return out


def model_summary_tables(summary: ModelSummary) -> list[Table]:
    """What `splice inspect` shows of a ModelSummary."""
    tables = [
        table(
            f"{summary.location} ({summary.architecture or 'unknown architecture'})",
            ["tensors", "parameters", "size", "shards"],
            [[summary.tensors, f"{summary.parameters:,}", human_bytes(summary.nbytes), len(summary.shards)]],
        ),
        table(
            "shards", ["file", "tensors", "size"], [[s.file, s.tensors, human_bytes(s.nbytes)] for s in summary.shards]
        ),
        table("dtypes", ["dtype", "parameters"], [[d, f"{n:,}"] for d, n in summary.dtypes.items()]),
        table(
            f"LayerNorm modules ({len(summary.norm_modules)})",
            ["module", "size", "bias"],
            [[m.name, m.size, "yes" if m.has_bias else "no"] for m in summary.norm_modules],
        ),
    ]
    record = summary.deployment
    if record is not None:
        tables.append(
            deployment_table(
                f"deployed patches (from {record.registry}, {record.deployed_at:%Y-%m-%d %H:%M} UTC)", record
            )
        )
    return tables


def jsonable(value: object) -> Any:
    """A library result as plain JSON values: an object's own `as_dict()`, a pydantic model's dump, a dataclass's
    fields and public properties; paths and times as strings, tensors as lists, a number that is not finite as
    null (as the reports splice writes have it)."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        return jsonable(value.as_dict())
    if hasattr(value, "model_dump"):  # a pydantic model
        return {**value.model_dump(mode="json"), **_properties(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name[0] != "_"}
        return {**fields, **_properties(value)}
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if hasattr(value, "tolist"):  # a tensor or an array
        return jsonable(value.tolist())
    raise TypeError(f"no JSON form for {type(value).__name__}")


def _properties(value: object) -> dict[str, Any]:
    """The public properties a result class defines (a manifest's size, a report's verdict), as JSON values."""
    own = [cls for cls in type(value).__mro__ if cls.__module__.startswith("splice.")]
    return {
        name: jsonable(getattr(value, name))
        for cls in reversed(own)
        for name, member in vars(cls).items()
        if isinstance(member, property) and name[0] != "_"
    }


def print_json(result: object) -> None:
    """`--json`: the result as one JSON document on stdout, nothing else there."""
    stop_progress()
    sys.stdout.write(json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def interrupted(kept: str) -> NoReturn:
    """Ctrl-C after part of the work was kept: say what, and exit 130 as an interrupted command does."""
    stop_progress()
    error_console.print(f"interrupted; {plain(kept)}", highlight=False, soft_wrap=True)
    raise SystemExit(130)


def show(renderable: RenderableType, quiet: bool = False) -> None:
    """Print a table or a line, unless --quiet."""
    if not quiet:
        console.print(plain(renderable) if isinstance(renderable, str) else renderable)


def notes(lines: Iterable[str], quiet: bool = False) -> None:
    """`note: ...` lines under a table: what a reader of the table should know."""
    if not quiet:
        for line in lines:
            console.print(f"note: {line}", highlight=False, soft_wrap=True)


def warn(warnings: Iterable[str]) -> None:
    """Library warnings on stderr, each parameter they name as its flag."""
    for warning in warnings:
        error_console.print(f"warning: {plain(with_flags(warning))}", highlight=False, soft_wrap=True)


def _percent(value: float | None, missing: str = "-") -> str:
    from splice.adapters.drift import percent  # one format for the drift tables and the drift verdict

    return missing if value is None else percent(value)


def _figure(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def drift_tables(drift: DriftReport) -> list[Table]:
    """A port's drift report: the bases and the verdict, then one row per patched tensor."""
    summary = table(
        f"port of {drift.patch} ({drift.kind} patch)",
        ["", "value"],
        [
            ["old base", f"{drift.old_base or 'not given'} ({(drift.old_digest or 'no record')[:19]})"],
            ["new base", f"{drift.new_base} ({drift.new_digest[:19]})"],
            [
                "base change",
                _percent(drift.base_change)
                if drift.measured
                else "unknown (no record of the old base: give --from OLD_BASE)"
                if drift.base_change_at_least is None
                else f"at least {_percent(drift.base_change_at_least)} (norms only)",
            ],
            ["cosine (base change, patch update)", _figure(drift.cosine, "+.3f")],
            ["patch update / base change", _figure(drift.update_to_change, ".3g")],
            ["scale", f"{drift.scale:g}"],
            ["verdict", f"{drift.verdict}: {drift.reason}"],
            *(["note", note] for note in drift.notes),
        ],
    )
    rows = [
        [
            t.name,
            _percent(t.base_change)
            if t.change_norm is not None
            else "unknown"
            if t.base_change_at_least is None
            else f">= {_percent(t.base_change_at_least)}",
            _figure(t.cosine, "+.3f"),
            _figure(t.update_to_change, ".3g"),
            {True: "yes", False: "no", None: "?"}[t.changed],
        ]
        for t in drift.tensors
    ]
    return [
        summary,
        table(
            f"per patched tensor ({len(rows)})", ["tensor", "base change", "cosine", "update/change", "changed"], rows
        ),
    ]


def health_table(name: str, records: Iterable[HealthRecord]) -> Table:
    """Every base a name's versions were deployed or ported onto, oldest first."""
    rows = []
    for r in records:
        check = r.base_check + (f" -> {r.ported_to}" if r.ported_to else "")
        drift = f"{_percent(r.drift.base_change)}, cos {_figure(r.drift.cosine, '+.2f')}" if r.drift else "-"
        score = "-" if r.score_after is None else f"{_figure(r.score_before, '.4g')} -> {_figure(r.score_after, '.4g')}"
        rows.append([r.recorded_at.strftime("%m-%d %H:%M"), r.version, r.base, check, drift, score])
    return table(
        f"health of {name}: every deployment and port",
        ["when", "version", "onto", "check", "base drift", "score"],
        rows,
    )


def continual_tables(report: ContinualReport) -> list[Table]:
    """The accuracy matrix (rows: after each task) and the pipeline's metrics."""
    header = ["after", *report.tasks, "average", "task id"]
    rows = [
        [
            task,
            *(f"{a:.3f}" for a in row),
            *([""] * (len(report.tasks) - len(row))),
            f"{report.average_accuracy[i]:.3f}",
            f"{report.task_id_accuracy[i]:.3f}",
        ]
        for i, (task, row) in enumerate(zip(report.tasks, report.accuracy))
    ]
    metrics: list[list[object]] = [
        ["final average accuracy", f"{report.final_average_accuracy:.4f}"],
        ["  with oracle task ids", f"{report.oracle_final_average_accuracy:.4f}"],
        ["average incremental accuracy", f"{report.average_incremental_accuracy:.4f}"],
        ["forgetting", f"{report.forgetting:.4f}"],
        ["backward transfer", f"{report.backward_transfer:+.4f}"],
        ["task-identification accuracy", f"{report.task_id_accuracy[-1]:.4f}"],
        [
            "stored per task",
            f"{max(report.parameters_per_task):,} LayerNorm entries at most + "
            f"{report.key_size} key + {report.head_parameters:,} head parameters",
        ],
        ["tasks resumed from the registry", report.resumed_tasks],
    ]
    return [
        table(f"{report.name}: accuracy after each task", header, rows),
        table(f"{report.name} ({report.protocol})", ["metric", "value"], metrics),
    ]


def prediction_table(result: Predictions, loaded: LoadedBank) -> Table:
    counts: dict[int, int] = {}
    for task in result.tasks.tolist():
        counts[task] = counts.get(task, 0) + 1
    names = loaded.aliases or [f"task-{t + 1}" for t in range(len(loaded.refs))]
    rows = [[names[t], loaded.refs[t], n] for t, n in sorted(counts.items())]
    title = f"{len(result.classes)} inputs routed" + (
        f"; accuracy {result.accuracy:.4f}" if result.accuracy is not None else ""
    )
    return table(title, ["task", "version", "inputs"], rows)


def sweep_table(report: SweepReport, limit: int | None = None) -> Table:
    """A sweep's trials, best first (failed ones last, with their error)."""
    ranked = report.ranked()
    shown = ranked if limit is None else ranked[:limit]
    title = f"sweep {report.source}: {len(report.trials)} trials ({report.method}, {report.direction})"
    return sweep_rows_table(title, report.parameters, shown)


def sweep_rows_table(title: str, parameters: Sequence[str], trials: Iterable[TrialRecord]) -> Table:
    rows = [
        [
            t.number,
            *(_sweep_value(t.values.get(name)) for name in parameters),
            "failed" if t.score is None else f"{t.score:.6g}",
            f"{t.merge_seconds:.2f}",
            f"{t.eval_seconds:.2f}",
            t.error or "",
        ]
        for t in trials
    ]
    return table(title, ["trial", *parameters, "score", "merge s", "eval s", "error"], rows)


def _sweep_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def localization_table(outcome: Localization, out: object) -> Table:
    """The test-split scores of the fine-tune, the learned and magnitude grafts and the pretrained model, with the
    share of the fine-tune's accuracy each keeps."""
    names = {
        "fine_tuned": "fine-tune",
        "learned_graft": "learned graft",
        "magnitude_graft": "magnitude graft",
        "pretrained": "pretrained",
    }
    tuned = outcome.scores["fine_tuned"].accuracy
    rows = [
        [names[name], f"{s.accuracy:.4f}", f"{s.ece:.4f}", _percent(s.accuracy / tuned if tuned else None)]
        for name, s in outcome.scores.items()
    ]
    carried = f"; head carried whole ({len(outcome.carried)} tensors)" if outcome.carried else ""
    title = (
        f"localized mask patch -> {out}: {outcome.selected:,} of {outcome.eligible:,} layer entries "
        f"({outcome.selected / outcome.parameters:.4%} of the model){carried}; best step {outcome.best_step} of "
        f"{len(outcome.losses) - 1}, {outcome.seconds:.1f} s"
    )
    return table(title, ["model", "test accuracy", "ECE", "of the fine-tune's accuracy"], rows)
