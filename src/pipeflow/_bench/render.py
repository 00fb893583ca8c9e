"""How a bench is shown: rich tables, JSON or CSV files, and a throughput chart."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .figures import BenchResult, PointResult, StageFigures, short_names

__all__ = ["PlotUnavailable", "check_plotting", "print_bench", "write_plot", "write_results"]


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# the columns whose cells are names, which wrap between words; figures never wrap
_WORDS = ("point", "stage", "kind", "slowest stage")


def print_bench(console: Console, result: BenchResult) -> None:
    """The points table, the per-stage table and the recommendation."""
    plan = result.plan
    title = (
        f"{result.pipeline}: {len(result.points)} points x {plan.repeat} runs "
        f"(+{plan.warmup} warm-up); times in seconds, figures of the median run"
    )
    columns = [
        "point",
        "wall min",
        "median",
        "max",
        "items/s",
        "pool start",
        "stop",
        "pickling",
        "parent CPU",
        "slowest stage",
        "RSS MB parent",
        "workers",
        "output",
    ]
    best = result.best
    differing = {id(point) for point in result.differing}
    rows: list[list[str | Text]] = []
    for point in result.points:
        if not point.ok:
            rows.append([point.label, Text(f"failed: {point.error}", style="red")])
            continue
        run = point.median_run
        slowest = run.slowest_stage
        walls = point.walls
        output = Text("differs", style="red") if id(point) in differing else Text("same")
        rows.append(
            [
                Text(point.label, style="bold green" if point is best else ""),
                _s(min(walls)),
                _s(point.wall_median),
                _s(max(walls)),
                f"{point.items_per_s:,.0f}",
                _s(run.pool_start_s),
                _s(run.pool_stop_s),
                _s(run.serialise_s if any(s.serialise_s is not None for s in run.stages) else None),
                f"{run.parent_cpu_s:.2f}s",
                f"{slowest.name} {slowest.utilisation:.0%}",
                _mb(run.parent_rss_mb),
                _mb(run.workers_rss_total_mb),
                output,
            ]
        )
    _print_fitted(console, title, columns, rows, keys=1)
    stage_columns = [
        "point",
        "stage",
        "kind",
        "workers",
        "calls",
        "busy",
        "util",
        "idle",
        "blocked",
        "queue peak",
        "pickling",
        "bytes in/out",
    ]
    stage_rows: list[list[str | Text]] = []
    for point in result.points:
        if not point.ok:
            continue
        for stage in point.median_run.stages:
            stage_rows.append(
                [
                    point.label,
                    stage.name,
                    stage.kind,
                    str(stage.workers),
                    str(stage.calls),
                    _s(stage.busy_s),
                    f"{stage.utilisation:.0%}",
                    _s(stage.idle_s),
                    _s(stage.blocked_s),
                    f"{stage.queue_high_water}",
                    _s(stage.serialise_s),
                    _bytes(stage),
                ]
            )
    _print_fitted(console, "stages (median run)", stage_columns, stage_rows, keys=2)
    console.print(Text("Recommendation", style="bold"))
    console.print(result.recommendation, soft_wrap=True, highlight=False, markup=False)


def _print_fitted(
    console: Console,
    title: str,
    columns: list[str],
    rows: list[list[str | Text]],
    keys: int,
) -> None:
    """`rows` as one table, or as several that each fit the console's width.

    Every table repeats the first `keys` columns, which name the row. Headers and names
    wrap between words when the console is narrow; figures keep their width, so nothing
    is cut.
    """
    whole = [row for row in rows if len(row) == len(columns)]  # a failed point is shorter

    def widths(index: int) -> tuple[int, int]:
        """The column's width with its header on one line, and its least width."""
        column = (row[index] for row in whole)
        cells = [Text(cell) if isinstance(cell, str) else cell for cell in column]
        if columns[index] in _WORDS:
            least = [len(word) for cell in cells for word in cell.plain.split()]
            natural = [cell.cell_len for cell in cells]
        else:
            least = natural = [cell.cell_len for cell in cells]
        header = columns[index]
        return max([len(header), *natural]), max([len(w) for w in header.split()] + least)

    natural, least = zip(*(widths(index) for index in range(len(columns))), strict=True)

    def fits(shown: list[int], sizes: tuple[int, ...]) -> bool:
        # cells, 3 columns between two of them, 1 at each edge
        return sum(sizes[i] for i in shown) + 3 * (len(shown) - 1) + 2 <= console.width

    groups: list[list[int]] = [[]]
    for index in range(keys, len(columns)):
        if groups[-1] and not fits([*range(keys), *groups[-1], index], least):
            groups.append([])
        groups[-1].append(index)
    for number, group in enumerate(groups):
        table = Table(
            title=Text(title, style="bold") if number == 0 else None,
            title_justify="left",
            header_style="bold",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        shown = [*range(keys), *group]
        sizes = natural if fits(shown, natural) else least
        for index in shown:
            words = columns[index] in _WORDS
            table.add_column(
                columns[index],
                justify="left" if words else "right",
                min_width=sizes[index] if words else None,
                width=None if words else sizes[index],
                overflow="fold",
            )
        for row in rows:
            table.add_row(*(row[index] if index < len(row) else "" for index in shown))
        console.print(table)


def _bytes(stage: StageFigures) -> str:
    if stage.bytes_in is None or stage.bytes_out is None:
        return "-"
    return f"{stage.bytes_in:.0f}/{stage.bytes_out:.0f}"


# --- files --------------------------------------------------------------------------------


def _point_dict(point: PointResult, reference: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"label": point.label, "params": point.params, "ok": point.ok}
    if not point.ok:
        data["error"] = point.error
        return data
    run = point.median_run
    walls = point.walls
    data.update(
        kind=point.kind,
        workers=point.workers,
        wall_s={"min": min(walls), "median": point.wall_median, "max": max(walls), "runs": walls},
        items=run.items,
        items_per_s=point.items_per_s,
        pool_start_s=run.pool_start_s,
        pool_stop_s=run.pool_stop_s,
        serialise_s=run.serialise_s,
        parent_cpu_s=run.parent_cpu_s,
        parent_rss_mb=run.parent_rss_mb,
        workers_rss_mb=run.workers_rss_mb,
        workers_rss_total_mb=run.workers_rss_total_mb,
        output_hash=run.output_hash,
        output_same=all(r.output_hash == reference for r in point.runs),
        slowest_stage=run.slowest_stage.name,
        stages=[vars(stage).copy() for stage in run.stages],
    )
    return data


def bench_dict(result: BenchResult) -> dict[str, Any]:
    """The bench as plain data, as `--output FILE.json` writes it."""
    best = result.best
    done = [point for point in result.points if point.ok]
    reference = done[0].runs[0].output_hash if done else None
    return {
        "config": result.plan.config,
        "pipeline": result.pipeline,
        "matrix": result.plan.matrix,
        "sets": result.plan.sets,
        "repeat": result.plan.repeat,
        "warmup": result.plan.warmup,
        "points": [_point_dict(point, reference) for point in result.points],
        "best": best.label if best else None,
        "results_identical": not result.differing,
        "differing_points": [point.label for point in result.differing],
        "failed_points": [point.label for point in result.failed],
        "recommendation": result.recommendation,
    }


_CSV_POINT = (
    "items",
    "items_per_s",
    "pool_start_s",
    "pool_stop_s",
    "serialise_s",
    "parent_cpu_s",
    "parent_rss_mb",
    "workers_rss_total_mb",
    "output_same",
)
_CSV_STAGE = (
    "name",
    "kind",
    "workers",
    "calls",
    "busy_s",
    "utilisation",
    "idle_s",
    "blocked_s",
    "queue_high_water",
    "serialise_s",
)


def write_results(result: BenchResult, path: Path) -> None:
    """JSON, or CSV (one row per point and stage) when the name ends in `.csv`."""
    data = bench_dict(result)
    if path.suffix.lower() != ".csv":
        path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        return
    header = ["point", "wall_min_s", "wall_median_s", "wall_max_s", *_CSV_POINT]
    header += [f"stage_{key}" for key in _CSV_STAGE]
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for point in data["points"]:
            if not point["ok"]:
                writer.writerow([point["label"]])
                continue
            wall = point["wall_s"]
            head = [point["label"], wall["min"], wall["median"], wall["max"]]
            head += [point[key] for key in _CSV_POINT]
            for stage in point["stages"]:
                writer.writerow(head + [stage[key] for key in _CSV_STAGE])


# --- the chart ----------------------------------------------------------------------------


def check_plotting() -> None:
    """Raise PlotUnavailable unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'pipeflow[plot]'") from None


def write_plot(result: BenchResult, path: Path) -> None:
    """Throughput against workers, one line per value of the other axes (the kind, say).

    Without a `workers` axis, the first axis is the x axis. Error bars span the fastest
    and the slowest run of each point.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    check_plotting()
    from matplotlib.figure import Figure

    paths = list(result.plan.matrix)
    x_path = next((p for p in paths if p.split(".")[-1] == "workers"), paths[0])
    names = short_names(paths)
    lines: dict[str, list[tuple[Any, PointResult]]] = {}
    for point in result.points:
        if not point.ok:
            continue
        rest = [f"{names[p]}={v}" for p, v in point.params.items() if p != x_path]
        label = " ".join(rest) or _KIND_LABELS.get(point.kind, point.kind)
        lines.setdefault(label, []).append((point.params[x_path], point))
    numeric = all(isinstance(x, int | float) for line in lines.values() for x, _ in line)
    figure = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    categories = list(dict.fromkeys(x for line in lines.values() for x, _ in line))
    for label, line in lines.items():
        line.sort(key=lambda entry: entry[0] if numeric else categories.index(entry[0]))
        xs = [x if numeric else categories.index(x) for x, _ in line]
        ys = [point.items_per_s for _, point in line]
        low = [
            y - point.median_run.items / max(point.walls)
            for y, (_, point) in zip(ys, line, strict=True)
        ]
        high = [
            point.median_run.items / min(point.walls) - y
            for y, (_, point) in zip(ys, line, strict=True)
        ]
        axes.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4, label=label)
    if numeric:
        ticks = sorted({x for line in lines.values() for x, _ in line})
        if len(ticks) > 2 and ticks[0] > 0 and ticks[-1] / ticks[0] >= 8:
            axes.set_xscale("log", base=2)
        axes.set_xticks(ticks, [str(t) for t in ticks])
    else:
        axes.set_xticks(range(len(categories)), [str(c) for c in categories])
    axes.set_ylim(bottom=0)
    axes.set_xlabel(f"workers ({x_path})" if x_path.endswith("workers") else x_path)
    axes.set_ylabel(f"throughput, items/s (median of {result.plan.repeat} runs)")
    axes.set_title(f"{result.pipeline}: throughput against workers")
    axes.grid(True, alpha=0.3)
    axes.legend(title=_legend_title(paths, x_path, names))
    figure.savefig(path)


_KIND_LABELS = {"process": "processes", "thread": "threads", "async": "async"}


def _legend_title(paths: list[str], x_path: str, names: dict[str, str]) -> str:
    rest = [names[p] for p in paths if p != x_path]
    return ", ".join(rest) if rest else "kind"
