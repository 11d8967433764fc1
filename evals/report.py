"""The run report: `runs/NAME/report/index.html` (one self-contained file from
`templates/report.html.j2`: inline CSS, SVG plots as data URIs) and `report.md` with the SVGs beside it.
The plots are drawn by `evals/svg.py`.

Sections: stages (manifests: status, time, final metrics), evals (base and each stage, deltas
against base, a bar chart of each task's main metric), training curves per stage (from
`STAGE/metrics.jsonl`: whichever of loss, rewards, margins, accuracy, KL, learning rate... exist),
sample generations side by side (wrong answers marked), and the resolved recipe.

    alignkit report runs/quickstart-arith
"""
from __future__ import annotations

import base64
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alignment.metrics import PANELS, describe
from alignment.recipe import BASE
from alignment.rundir import RunDir
from evals import svg
from evals.table import PALETTE, EvalTable, build_eval_table, fmt

SAMPLE_CHARS = 600  # longer completions are cut in the report (the JSON keeps them whole)
TEMPLATE = "report.html.j2"  # in evals/templates/

# ---------------------------------------------------------------- reading the run directory


@dataclass
class RunData:
    run_dir: Path
    name: str
    recipe_text: str
    base_model: str
    stages: list[str]  # in pipeline order
    methods: dict[str, str]
    manifests: dict[str, dict] = field(default_factory=dict)
    curves: dict[str, list[dict]] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)  # stage (base first) -> evals/STAGE.json
    warnings: list[str] = field(default_factory=list)  # reward-hacking alarms (evals.alarm), decontamination counts


def read_run(run_dir: Path) -> RunData:
    """Everything the report shows, from the files of a run directory."""
    import yaml

    rundir = RunDir(run_dir)
    recipe_file = rundir.recipe_file
    if not recipe_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no recipe.yaml); run `alignkit run RECIPE` first")
    text = recipe_file.read_text()
    raw = yaml.safe_load(text) or {}
    stages = _stage_order(text, raw)
    data = RunData(rundir.path, raw.get("name", rundir.path.name), text, str((raw.get("model") or {}).get("name_or_path", "")),
                   stages, {s: (raw.get("stages") or {}).get(s, {}).get("method", "?") for s in stages})
    for st in stages:
        man = rundir.read_manifest(st)
        if man is not None:
            data.manifests[st] = man
        rows = rundir.read_metrics(st)
        if rows:
            data.curves[st] = rows
    for st in [BASE] + stages:
        ev = rundir.read_evals(st)
        if ev is not None:
            data.evals[st] = ev
    data.warnings = _warnings(text, rundir.path) + _decontamination(data)
    return data


def _decontamination(data: RunData) -> list[str]:
    """Per stage and training set: the rows that shared an n-gram with an eval set (manifest `info.data_report`)."""
    from alignment.data import CHANGES

    out = []
    for st in data.stages:
        for dataset, kinds in ((data.manifests.get(st, {}).get("info") or {}).get("data_report") or {}).items():
            for kind in ("contaminated", "overlapping"):
                if kind in kinds:
                    out.append(f"{st}: training set '{dataset}': {kinds[kind]['rows']} row(s) {kind} -- {CHANGES[kind]}; "
                               f"e.g. {kinds[kind]['examples'][0]}")
    return out


def _warnings(text: str, run_dir: Path) -> list[str]:
    """The run's reward-hacking alarms (none for a recipe.yaml this version cannot read)."""
    import pydantic

    from alignment.recipe import parse_resolved
    from evals.alarm import reward_hacking_alarms

    try:
        recipe = parse_resolved(text)
    except pydantic.ValidationError:
        return []
    return [a.message for a in reward_hacking_alarms(recipe, run_dir)]


def _stage_order(text: str, raw: dict) -> list[str]:
    try:
        from alignment.recipe import parse_resolved

        return parse_resolved(text).order()
    except Exception:  # an older or hand-edited recipe.yaml: keep the file's order
        return list(raw.get("stages") or {})


# ---------------------------------------------------------------- plots


def curve_panels(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """(panel title, keys) for the keys logged at two or more steps, each on the panel alignment/metrics.py
    declares for it (undeclared keys and those without a panel are not plotted), in `PANELS` order."""
    counts: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                counts[k] = counts.get(k, 0) + 1
    panels: dict[str, list[str]] = {}
    for k, n in counts.items():
        metric = describe(k)
        if n >= 2 and metric is not None and metric.panel is not None:
            panels.setdefault(metric.panel, []).append(k)
    return [(title, panels[title]) for title in PANELS if title in panels]


def _ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _points(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` where it was logged as a finite number (a row without `step`: its index)."""
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
           if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(stage: str, rows: list[dict], path: Path) -> bool:
    """Small multiples of a stage's training curves (`curve_panels`, up to 8 keys a panel) as an SVG at
    `path`; False (nothing written) when nothing was logged twice."""
    panels = []
    for title, keys in curve_panels(rows):
        series = []
        for j, key in enumerate(keys[:8]):
            xs, ys = _points(rows, key)
            color = PALETTE[j % len(PALETTE)]
            if len(ys) > 40:  # noisy: raw faint, smoothed bold
                series.append(svg.Series(key, xs, ys, color, width=1, opacity=0.25, legend=False))
                series.append(svg.Series(key, xs, _ema(ys, 0.15), color))
            else:
                series.append(svg.Series(key, xs, ys, color, markers=True))
        sci = (-2, 3) if title == "learning rate" else svg.SCI_LIMITS  # 1e-5: scientific; 0.01: not
        panels.append(svg.LinePanel(title if len(keys) > 1 else keys[0], series, xlabel="step", x_integer=True,
                                    legend=len(keys) > 1, sci_limits=sci))  # one line: its key is the title
    if not panels:
        return False
    _write(path, svg.figure(panels, cols=3, title=stage))
    return True


def plot_evals(table: EvalTable, path: Path) -> bool:
    """One bar chart per eval task (its main metric on base and each stage, in the table's stage colours)
    as an SVG at `path`; False (nothing written) when no task has a main metric value."""
    tasks = [t for t in table.tasks if any(table.value(st, t, table.main[t]) is not None for st in table.stages)]
    if not tasks:
        return False
    panels = []
    for t in tasks:
        values = [table.value(st, t, table.main[t]) for st in table.stages]
        panels.append(svg.BarPanel(f"{t} · {table.main[t]}", list(table.stages), values, [fmt(v) for v in values],
                                   [table.colors[st] for st in table.stages], rotate=len(table.stages) > 4))
    width = max(320, 90 * len(table.stages) + 140)
    _write(path, svg.figure(panels, cols=3, panel_width=width, panel_height=290))
    return True


# ---------------------------------------------------------------- the stage table


def _fmt_seconds(s) -> str:
    if not isinstance(s, (int, float)):
        return "–"
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _final_metrics(man: dict, limit: int = 4) -> list[tuple[str, float]]:
    metrics = {k: v for k, v in (man.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and k not in ("step", "time", "epoch")
               and not any(p in k for p in ("runtime", "per_second", "flos"))}
    first = [k for k in ("train_loss", "loss") if k in metrics]
    return [(k, metrics[k]) for k in (first + [k for k in metrics if k not in first])[:limit]]


def stage_rows(data: RunData) -> list[dict]:
    """Per stage: name, method, from, status, time, final metrics [(key, value)], fingerprint."""
    rows = []
    for st in data.stages:
        man = data.manifests.get(st, {})
        rows.append({"stage": st, "method": data.methods.get(st, man.get("method", "?")),
                     "from": (man.get("inputs") or {}).get("from", ""), "status": man.get("status", "missing"),
                     "time": _fmt_seconds(man.get("seconds")), "final": _final_metrics(man),
                     "fingerprint": man.get("fingerprint", "")})
    return rows


# ---------------------------------------------------------------- samples side by side


# sample keys from the dataset (shown once, beside the prompt) and those not shown as numbers
DATA_KEYS = ("answer", "target", "chosen", "rejected")
NOT_NUMBERS = ("correct",)


def sample_rows(table: EvalTable, t: str) -> list[dict]:
    """Per sample index: the prompt, its data fields (answer, target, chosen, rejected), and one cell
    per stage (the stage's completion, whether it is correct, its numbers)."""
    per_stage = {s: table.entries.get(s, {}).get(t, {}).get("samples") or [] for s in table.stages}
    count = max((len(v) for v in per_stage.values()), default=0)
    rows = []
    for i in range(count):
        cells = {s: per_stage[s][i] for s in table.stages if i < len(per_stage[s])}
        first = next(iter(cells.values()))
        rows.append({"prompt": first.get("prompt", ""), "cells": cells,
                     "data": [(k, first[k]) for k in DATA_KEYS if first.get(k) is not None]})
    return rows


def sample_numbers(cell: dict) -> list[tuple[str, float]]:
    return [(k, v) for k, v in cell.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_NUMBERS]


# ---------------------------------------------------------------- HTML


def _data_uri(path: Path) -> str:
    """The SVG at `path` as a data URI: the page stays one file, and an SVG shown through <img> runs no script."""
    return "data:image/svg+xml;base64," + base64.b64encode(path.read_bytes()).decode()


def _cut(text, n: int = SAMPLE_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[:n] + " …"


def _template():
    """`templates/report.html.j2`, autoescaped, with the filters it formats values with."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("evals", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(fmt=fmt, cut=_cut, numbers=sample_numbers)
    return env.get_template(TEMPLATE)


def render_html(data: RunData, table: EvalTable, images: dict[str, Path]) -> str:
    samples = [(t, rows) for t in table.tasks if (rows := sample_rows(table, t))]
    return _template().render(
        name=data.name, base_model=data.base_model, stages=data.stages, run_dir=str(data.run_dir),
        recipe_text=data.recipe_text, generated=time.strftime("%Y-%m-%d %H:%M"), stage_rows=stage_rows(data),
        warnings=data.warnings,
        table=table, samples=samples, evals_image=_data_uri(images["evals"]) if "evals" in images else None,
        curves=[(s, _data_uri(images[f"curves-{s}"])) for s in data.stages if f"curves-{s}" in images])


# ---------------------------------------------------------------- Markdown


def _md(text, n: int = 200) -> str:
    """A prompt or completion as one Markdown table cell: HTML-escaped (a model's `<script>` stays text in a viewer
    that renders raw HTML), `|` escaped, newlines shown as ⏎."""
    return html.escape(_cut(text, n), quote=False).replace("|", "\\|").replace("\n", "⏎ ")


def markdown_eval_table(table: EvalTable) -> list[str]:
    """The eval table as Markdown lines (base and each stage, deltas against base; the report and the model card)."""
    out = ["| task | metric | " + " | ".join(table.stages) + " |", "|---|---|" + "---:|" * len(table.stages)]
    for row in table.rows:
        cells = [c.text + (f" ({c.delta_text})" if c.delta_text is not None else "") for c in row.cells]
        name = f"**{row.metric}**" if row.main and row.metric else row.metric
        out.append(f"| {row.task if row.first else ''} | {name} | " + " | ".join(cells) + " |")
    return out + [f"\n_{t} on {', '.join(stages)}: skipped: {why}_" for t, why, stages in table.skipped]


def render_markdown(data: RunData, table: EvalTable, images: dict[str, Path]) -> str:
    out = [f"# {data.name}", "", f"alignkit report · base model `{data.base_model}` · stages: {' → '.join(data.stages)}", ""]
    if data.warnings:
        out += ["## Warnings", ""] + [f"- **{w}**" for w in data.warnings] + [""]
    out += ["## Stages", "", "| stage | method | status | time | final metrics |", "|---|---|---|---:|---|"]
    for st in stage_rows(data):
        final = ", ".join(f"{k} {fmt(v)}" for k, v in st["final"]) or "–"
        out.append(f"| {st['stage']} | {st['method']} | {st['status']} | {st['time']} | {final} |")
    out += ["", "## Evals", ""]
    if table.tasks:
        out += markdown_eval_table(table)
        if "evals" in images:
            out += ["", f"![eval metrics by stage]({images['evals'].name})"]
    else:
        out.append("No eval results yet.")
    out += ["", "## Training curves", ""]
    for s in data.stages:
        if f"curves-{s}" in images:
            out += [f"### {s}", "", f"![training curves of {s}]({images[f'curves-{s}'].name})", ""]
    out += ["## Sample generations", ""]
    for t in table.tasks:
        rows = sample_rows(table, t)
        if not rows:
            continue
        out += [f"### {t}", "", "| prompt | " + " | ".join(table.stages) + " |", "|---|" + "---|" * len(table.stages)]
        for r in rows:
            prompt = _md(r["prompt"]) + "".join(f" <br>**{k}** {_md(v, 120)}" for k, v in r["data"])
            cells = []
            for s in table.stages:
                c = r["cells"].get(s) or {}
                ok = c.get("correct")
                mark = "" if ok is None else ("✓ " if ok else "✗ ")
                numbers = ", ".join(f"{k} {fmt(v)}" for k, v in sample_numbers(c))
                text = _md(c["completion"]) if "completion" in c else ""
                cells.append(f"{mark}{text}" + (f" ({numbers})" if numbers else ""))
            out.append(f"| {prompt} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## Recipe", "", "```yaml", data.recipe_text.rstrip(), "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- entry point


def write_report(run_dir: Path | str) -> Path:
    """Write `run_dir/report/index.html`, `report.md` and the SVG plots; return the HTML's path.

    Raises:
        FileNotFoundError: `run_dir` has no recipe.yaml (not a run directory).
    """
    data = read_run(Path(run_dir))
    table = build_eval_table(data.evals, [BASE] + data.stages)
    out = RunDir(data.run_dir).report_dir
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    for old in [*out.glob("*.svg"), *out.glob("*.png")]:  # *.png: an older report's plots (matplotlib)
        old.unlink()
    if plot_evals(table, out / "evals.svg"):
        images["evals"] = out / "evals.svg"
    for i, st in enumerate(data.stages):
        path = out / f"curves-{i:02d}-{_safe(st)}.svg"
        if data.curves.get(st) and plot_curves(st, data.curves[st], path):
            images[f"curves-{st}"] = path
    _write(out / "report.md", render_markdown(data, table, images))
    _write(out / "index.html", render_html(data, table, images))
    return out / "index.html"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
