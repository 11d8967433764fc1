"""The run report: `runs/NAME/report/index.html` (one self-contained file: inline CSS, PNG plots as
data URIs) and `report.md` with the PNGs beside it.

Sections: stages (manifests: status, time, final metrics), evals (base and each stage, deltas
against base, a bar chart of each task's main metric), training curves per stage (from
`STAGE/metrics.jsonl`: whichever of loss, rewards, margins, accuracy, KL, learning rate... exist),
sample generations side by side (wrong answers marked), and the resolved recipe.

    alignkit report runs/quickstart-arith
"""
from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from alignment.recipe import BASE

SAMPLE_CHARS = 600  # longer completions are cut in the report (the JSON keeps them whole)

# colors: base in slate, stages in order from this palette (Tableau 10, colorblind-friendly)
BASE_COLOR = "#8b95a5"
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]

# training-curve panels: title -> which metrics.jsonl keys go on it (first match wins)
CURVE_PANELS: list[tuple[str, Callable[[str], bool]]] = [
    ("loss", lambda k: k.endswith("loss")),
    ("margin", lambda k: "margin" in k),
    ("accuracy", lambda k: "accurac" in k),
    ("reward", lambda k: "reward" in k),
    ("KL", lambda k: k == "kl" or k.startswith("kl/") or k.endswith("/kl") or k.startswith("objective/kl")),
    ("learning rate", lambda k: k == "learning_rate"),
    ("grad norm", lambda k: k == "grad_norm"),
    ("entropy", lambda k: "entropy" in k),
    ("length", lambda k: "length" in k),
]
NOT_CURVES = ("step", "time", "epoch", "total_flos")
NOT_CURVE_PARTS = ("runtime", "per_second", "train_loss", "num_tokens", "timing/")


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


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_run(run_dir: Path) -> RunData:
    """Everything the report shows, from the files of a run directory."""
    import yaml

    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no recipe.yaml); run `alignkit run RECIPE` first")
    text = recipe_file.read_text()
    raw = yaml.safe_load(text) or {}
    stages = _stage_order(text, raw)
    data = RunData(run_dir, raw.get("name", run_dir.name), text, str((raw.get("model") or {}).get("name_or_path", "")),
                   stages, {s: (raw.get("stages") or {}).get(s, {}).get("method", "?") for s in stages})
    for st in stages:
        man = _read_json(run_dir / st / "manifest.json")
        if man is not None:
            data.manifests[st] = man
        lines = run_dir / st / "metrics.jsonl"
        if lines.exists():
            data.curves[st] = [json.loads(line) for line in lines.read_text().splitlines() if line.strip()]
    for st in [BASE] + stages:
        ev = _read_json(run_dir / "evals" / f"{st}.json")
        if ev is not None:
            data.evals[st] = ev
    return data


def _stage_order(text: str, raw: dict) -> list[str]:
    try:
        from alignment.recipe import parse_resolved

        return parse_resolved(text).order()
    except Exception:  # an older or hand-edited recipe.yaml: keep the file's order
        return list(raw.get("stages") or {})


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e5e7eb",
        "grid.linewidth": 0.8, "axes.edgecolor": "#9ca3af", "axes.labelcolor": "#374151",
        "xtick.color": "#6b7280", "ytick.color": "#6b7280", "legend.frameon": False, "legend.fontsize": 8,
        "figure.dpi": 110, "savefig.bbox": "tight", "savefig.facecolor": "white",
    })
    return plt


def curve_panels(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """(panel title, keys) for the keys logged at two or more steps, in CURVE_PANELS order."""
    counts: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                counts[k] = counts.get(k, 0) + 1
    keys = [k for k, n in counts.items()
            if n >= 2 and k not in NOT_CURVES and not any(p in k for p in NOT_CURVE_PARTS)]
    panels: dict[str, list[str]] = {}
    for k in keys:
        for title, match in CURVE_PANELS:
            if match(k):
                panels.setdefault(title, []).append(k)
                break
    return [(title, panels[title]) for title, _ in CURVE_PANELS if title in panels]


def _ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_curves(plt, stage: str, rows: list[dict], path: Path) -> bool:
    """Small multiples of a stage's training curves; False when nothing was logged twice."""
    panels = curve_panels(rows)
    if not panels:
        return False
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.1 * cols, 2.7 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for j, key in enumerate(keys[:8]):
            pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            color = PALETTE[j % len(PALETTE)]
            if len(ys) > 40:  # noisy: raw faint, smoothed bold
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
                ax.plot(xs, _ema(ys, 0.15), color=color, linewidth=1.8, label=key)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.8, marker="o", markersize=2.5, label=key)
        ax.set_title(title if len(keys) > 1 else keys[0], loc="left")  # one line: its key is the title
        ax.set_xlabel("step")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len(keys) > 1:
            ax.legend(loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(stage, x=0.01, ha="left", fontsize=11, fontweight="bold", color="#111827")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_evals(plt, table: "EvalTable", path: Path) -> bool:
    """One bar chart per eval task: its main metric on base and each stage."""
    tasks = [t for t in table.tasks if any(table.value(st, t, table.main[t]) is not None for st in table.stages)]
    if not tasks:
        return False
    cols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(3.2, 0.9 * len(table.stages) + 1.4) * cols, 2.9 * nrows), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        metric = table.main[t]
        values = [table.value(st, t, metric) for st in table.stages]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(table.stages, heights, color=[table.color(st) for st in table.stages], width=0.62)
        for bar, v in zip(bars, values):
            label = "–" if v is None else _fmt(v)
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8, color="#374151")
        ax.set_title(f"{t} · {metric}", loc="left")
        ax.grid(axis="x", visible=False)
        ax.margins(y=0.18)
        if all(v is None or 0 <= v <= 1 for v in values) and any(v is not None for v in values):
            ax.set_ylim(0, 1.12)
        ax.tick_params(axis="x", labelrotation=20 if len(table.stages) > 4 else 0)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- the eval table


@dataclass
class EvalTable:
    """Evals across stages: stages (base first) x tasks x metrics."""

    stages: list[str]
    tasks: list[str]
    entries: dict[str, dict[str, dict]]  # stage -> task -> evals JSON entry
    main: dict[str, str]
    better: dict[str, dict[str, bool]]  # task -> metric -> higher is better
    metrics: dict[str, list[str]]  # task -> metric names, main first
    colors: dict[str, str]

    def value(self, stage: str, t: str, metric: str) -> Optional[float]:
        v = self.entries.get(stage, {}).get(t, {}).get("metrics", {}).get(metric)
        return float(v) if isinstance(v, (int, float)) else None

    def skipped(self, stage: str, t: str) -> Optional[str]:
        return self.entries.get(stage, {}).get(t, {}).get("skipped")

    def delta(self, stage: str, t: str, metric: str) -> Optional[float]:
        a, b = self.value(stage, t, metric), self.value(BASE, t, metric)
        return None if a is None or b is None or stage == BASE else a - b

    def tone(self, t: str, metric: str, delta: Optional[float]) -> str:
        """good | bad | neutral: the delta's direction against the metric's."""
        direction = self.better.get(t, {}).get(metric)
        if delta is None or direction is None or abs(delta) < 1e-12:
            return "neutral"
        return "good" if (delta > 0) == direction else "bad"

    def color(self, stage: str) -> str:
        return self.colors[stage]


def eval_table(data: RunData) -> EvalTable:
    return build_eval_table(data.evals, [BASE] + data.stages)


def build_eval_table(evals: dict[str, dict], order: Optional[list[str]] = None) -> EvalTable:
    """The table of `evals` (stage -> evals/STAGE.json, as `run_evals` returns), stages in `order`."""
    order = order or ([BASE] + [s for s in evals if s != BASE])
    stages = [s for s in order if s in evals]
    entries = {s: evals[s].get("tasks", {}) for s in stages}
    tasks: list[str] = []
    for s in stages:
        tasks += [t for t in entries[s] if t not in tasks]
    main, better, metrics = {}, {}, {}
    for t in tasks:
        found = [entries[s][t] for s in stages if t in entries[s]]
        names: list[str] = []
        for e in found:
            names += [m for m in e.get("metrics", {}) if m not in names]
            better.setdefault(t, {}).update(e.get("higher_is_better") or {})
        main[t] = next((e["main"] for e in found if e.get("main")), names[0] if names else "")
        metrics[t] = ([main[t]] if main[t] in names else []) + [m for m in names if m != main[t]]
    colors = {BASE: BASE_COLOR}
    colors.update({s: PALETTE[i % len(PALETTE)] for i, s in enumerate(s for s in stages if s != BASE)})
    return EvalTable(stages, tasks, entries, main, better, metrics, colors)


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "–"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"


def _fmt_delta(d: float) -> str:
    if abs(d) < 1e-12:
        return "±0"
    return ("+" if d > 0 else "−") + _fmt(abs(d))


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

CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--card:#fff;--good:#15803d;--good-bg:#dcfce7;
--bad:#b91c1c;--bad-bg:#fee2e2;--accent:#4e79a7}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
header{background:linear-gradient(120deg,#1e293b,#334155);color:#f8fafc;padding:28px 40px 22px}
header h1{margin:0 0 4px;font-size:26px;font-weight:650;letter-spacing:-.01em}
header .sub{color:#cbd5e1;font-size:13px}
header code{background:rgba(255,255,255,.1);padding:1px 6px;border-radius:4px;color:#e2e8f0}
nav{position:sticky;top:0;z-index:2;background:rgba(255,255,255,.92);backdrop-filter:blur(6px);
border-bottom:1px solid var(--line);padding:10px 40px;display:flex;gap:22px;font-size:13px}
nav a{color:var(--muted);text-decoration:none;font-weight:500}nav a:hover{color:var(--accent)}
main{max-width:1280px;margin:0 auto;padding:8px 40px 60px}
section{margin-top:34px}
h2{font-size:18px;margin:0 0 12px;font-weight:650;letter-spacing:-.01em}
h3{font-size:14px;margin:22px 0 8px;color:#374151}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;
box-shadow:0 1px 2px rgba(0,0,0,.03);overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:7px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);font-weight:600;
background:#f9fafb;white-space:nowrap}
tr:last-child td{border-bottom:none}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th.num{text-align:right}
tr.main td{font-weight:600}
td.task{font-weight:600;color:#1f2937}td.metric{color:#374151}
.delta{display:inline-block;margin-left:6px;padding:0 6px;border-radius:9px;font-size:11px;font-weight:600}
.delta.good{color:var(--good);background:var(--good-bg)}.delta.bad{color:var(--bad);background:var(--bad-bg)}
.delta.neutral{color:var(--muted);background:#f3f4f6}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px;vertical-align:middle}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:11px;font-weight:600}
.badge.done{color:var(--good);background:var(--good-bg)}.badge.failed{color:var(--bad);background:var(--bad-bg)}
.badge.running,.badge.missing{color:#92400e;background:#fef3c7}
.muted{color:var(--muted)}.skipped{color:var(--muted);font-style:italic}
img.plot{max-width:100%;height:auto;display:block;margin:6px auto}
.samples td{min-width:200px;max-width:420px}
.gen{white-space:pre-wrap;word-break:break-word;font:12px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
background:#f9fafb;border:1px solid var(--line);border-radius:6px;padding:6px 8px;margin-top:4px}
td.ok .gen{background:#f0fdf4;border-color:#bbf7d0}td.wrong .gen{background:#fef2f2;border-color:#fecaca}
.mark{font-weight:700;margin-right:4px}td.ok .mark{color:var(--good)}td.wrong .mark{color:var(--bad)}
.score{font-size:11px;color:var(--muted)}
.answer{font-size:12px;color:var(--muted);margin-top:6px}.answer b{color:#374151}
pre.recipe{margin:0;font:12px/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre}
details summary{cursor:pointer;color:var(--muted);font-size:13px}
footer{color:var(--muted);font-size:12px;text-align:center;padding:20px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _cut(text, n: int = SAMPLE_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[:n] + " …"


def _html_stage_table(data: RunData) -> str:
    rows = []
    for st in data.stages:
        man = data.manifests.get(st, {})
        status = man.get("status", "missing")
        final = ", ".join(f"{_e(k)} <b>{_fmt(v)}</b>" for k, v in _final_metrics(man)) or '<span class="muted">–</span>'
        spec_from = (man.get("inputs") or {}).get("from", "")
        rows.append(f"<tr><td><b>{_e(st)}</b></td><td>{_e(data.methods.get(st, man.get('method', '?')))}</td>"
                    f"<td>{_e(spec_from)}</td><td><span class='badge {_e(status)}'>{_e(status)}</span></td>"
                    f"<td class='num'>{_fmt_seconds(man.get('seconds'))}</td><td>{final}</td>"
                    f"<td class='muted'>{_e(man.get('fingerprint', ''))}</td></tr>")
    head = "<tr><th>stage</th><th>method</th><th>from</th><th>status</th><th class='num'>time</th><th>final metrics</th><th>fingerprint</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _html_eval_table(table: EvalTable) -> str:
    head = "<tr><th>task</th><th>metric</th>" + "".join(
        f"<th class='num'><span class='dot' style='background:{table.color(s)}'></span>{_e(s)}</th>" for s in table.stages) + "</tr>"
    rows = []
    for t in table.tasks:
        metrics = table.metrics[t] or [""]
        for j, m in enumerate(metrics):
            cells = []
            for s in table.stages:
                skipped = table.skipped(s, t)
                if skipped and j == 0:
                    cells.append(f"<td class='num skipped' title='{_e(skipped)}'>skipped</td>")
                    continue
                v, d = table.value(s, t, m), table.delta(s, t, m)
                badge = f"<span class='delta {table.tone(t, m, d)}'>{_fmt_delta(d)}</span>" if d is not None else ""
                cells.append(f"<td class='num'>{_fmt(v)}{badge}</td>")
            task_cell = f"<td class='task'>{_e(t)}</td>" if j == 0 else "<td></td>"
            cls = " class='main'" if m == table.main[t] else ""
            rows.append(f"<tr{cls}>{task_cell}<td class='metric'>{_e(m)}</td>{''.join(cells)}</tr>")
    return f"<table class='evals'>{head}{''.join(rows)}</table>"


def _gen_box(text) -> str:
    text = "" if text is None else str(text)
    if not text.strip():
        return "<div class='gen'><span class='muted'>(blank)</span></div>"
    return f"<div class='gen'>{_e(_cut(text))}</div>"


def _html_samples(table: EvalTable, t: str) -> str:
    rows = sample_rows(table, t)
    if not rows:
        return ""
    head = "<tr><th>prompt</th>" + "".join(
        f"<th><span class='dot' style='background:{table.color(s)}'></span>{_e(s)}</th>" for s in table.stages) + "</tr>"
    body = []
    for r in rows:
        extra = ""
        for key, value in r["data"]:
            if key == "answer":
                extra += f"<div class='answer'><b>answer</b> {_e(value)}</div>"
            else:
                extra += f"<div class='answer'><b>{_e(key)}</b></div>{_gen_box(value)}"
        cells = []
        for s in table.stages:
            c = r["cells"].get(s)
            if c is None:
                cells.append("<td class='muted'>–</td>")
                continue
            ok = c.get("correct")
            cls = "" if ok is None else (" class='ok'" if ok else " class='wrong'")
            mark = "" if ok is None else f"<span class='mark'>{'✓' if ok else '✗'}</span>"
            numbers = " · ".join(f"{_e(k)} {_fmt(v)}" for k, v in sample_numbers(c))
            numbers = f"<span class='score'>{numbers}</span>" if numbers else ""
            gen = _gen_box(c["completion"]) if "completion" in c else ""
            cells.append(f"<td{cls}>{mark}{numbers}{gen}</td>")
        body.append(f"<tr><td>{_gen_box(r['prompt'])}{extra}</td>{''.join(cells)}</tr>")
    return f"<h3>{_e(t)}</h3><div class='card'><table class='samples'>{head}{''.join(body)}</table></div>"


def render_html(data: RunData, table: EvalTable, images: dict[str, Path]) -> str:
    generated = time.strftime("%Y-%m-%d %H:%M")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>{_e(data.name)} · alignkit report</title><style>{CSS}</style></head><body>",
             f"<header><h1>{_e(data.name)}</h1><div class='sub'>alignkit report · base model <code>{_e(data.base_model)}</code> · "
             f"{len(data.stages)} stage(s): {_e(' → '.join(data.stages))} · generated {generated}</div></header>",
             "<nav><a href='#stages'>Stages</a><a href='#evals'>Evals</a><a href='#curves'>Training curves</a>"
             "<a href='#samples'>Samples</a><a href='#recipe'>Recipe</a></nav><main>"]
    parts.append(f"<section id='stages'><h2>Stages</h2><div class='card'>{_html_stage_table(data)}</div></section>")
    parts.append("<section id='evals'><h2>Evals</h2>")
    if table.tasks:
        parts.append(f"<div class='card'>{_html_eval_table(table)}<p class='muted'>Deltas are against base; "
                     f"green is better, red worse (by each metric's direction), grey has no direction.</p></div>")
        if "evals" in images:
            parts.append(f"<div class='card' style='margin-top:14px'><img class='plot' alt='eval metrics by stage' src='{_data_uri(images['evals'])}'></div>")
    else:
        parts.append("<div class='card muted'>No eval results yet (add <code>evals:</code> to the recipe, then <code>alignkit eval RECIPE</code>).</div>")
    parts.append("</section><section id='curves'><h2>Training curves</h2>")
    curves = [s for s in data.stages if f"curves-{s}" in images]
    for s in curves:
        parts.append(f"<div class='card' style='margin-bottom:14px'><img class='plot' alt='training curves of {_e(s)}' src='{_data_uri(images[f'curves-{s}'])}'></div>")
    if not curves:
        parts.append("<div class='card muted'>No training metrics logged yet.</div>")
    parts.append("</section><section id='samples'><h2>Sample generations</h2>")
    samples = "".join(_html_samples(table, t) for t in table.tasks)
    parts.append(samples or "<div class='card muted'>No samples.</div>")
    parts.append(f"</section><section id='recipe'><h2>Recipe</h2><div class='card'><details open><summary>recipe.yaml (resolved)</summary>"
                 f"<pre class='recipe'>{_e(data.recipe_text)}</pre></details></div></section></main>"
                 f"<footer>{_e(data.run_dir)}</footer></body></html>")
    return "".join(parts)


# ---------------------------------------------------------------- Markdown


def _md(text, n: int = 200) -> str:
    return _cut(text, n).replace("|", "\\|").replace("\n", "⏎ ")


def render_markdown(data: RunData, table: EvalTable, images: dict[str, Path]) -> str:
    out = [f"# {data.name}", "", f"alignkit report · base model `{data.base_model}` · stages: {' → '.join(data.stages)}", "",
           "## Stages", "", "| stage | method | status | time | final metrics |", "|---|---|---|---:|---|"]
    for st in data.stages:
        man = data.manifests.get(st, {})
        final = ", ".join(f"{k} {_fmt(v)}" for k, v in _final_metrics(man)) or "–"
        out.append(f"| {st} | {data.methods.get(st, '?')} | {man.get('status', 'missing')} | {_fmt_seconds(man.get('seconds'))} | {final} |")
    out += ["", "## Evals", ""]
    if table.tasks:
        out.append("| task | metric | " + " | ".join(table.stages) + " |")
        out.append("|---|---|" + "---:|" * len(table.stages))
        for t in table.tasks:
            for j, m in enumerate(table.metrics[t] or [""]):
                cells = []
                for s in table.stages:
                    if table.skipped(s, t) and j == 0:
                        cells.append("skipped")
                        continue
                    d = table.delta(s, t, m)
                    cells.append(_fmt(table.value(s, t, m)) + (f" ({_fmt_delta(d)})" if d is not None else ""))
                name = f"**{m}**" if m and m == table.main[t] else m
                out.append(f"| {t if j == 0 else ''} | {name} | " + " | ".join(cells) + " |")
        for t in table.tasks:  # why, once per task and reason
            reasons: dict[str, list[str]] = {}
            for s in table.stages:
                if table.skipped(s, t):
                    reasons.setdefault(table.skipped(s, t), []).append(s)
            out += [f"\n_{t} on {', '.join(stages)}: skipped: {why}_" for why, stages in reasons.items()]
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
                numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in sample_numbers(c))
                text = _md(c["completion"]) if "completion" in c else ""
                cells.append(f"{mark}{text}" + (f" ({numbers})" if numbers else ""))
            out.append(f"| {prompt} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## Recipe", "", "```yaml", data.recipe_text.rstrip(), "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- entry point


def write_report(run_dir: Path | str) -> Path:
    """Write `run_dir/report/index.html`, `report.md` and the PNGs; return the HTML's path.

    Raises:
        FileNotFoundError: `run_dir` has no recipe.yaml (not a run directory).
    """
    data = read_run(Path(run_dir))
    table = eval_table(data)
    out = data.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    images: dict[str, Path] = {}
    for old in out.glob("*.png"):
        old.unlink()
    if plot_evals(plt, table, out / "evals.png"):
        images["evals"] = out / "evals.png"
    for i, st in enumerate(data.stages):
        path = out / f"curves-{i:02d}-{_safe(st)}.png"
        if data.curves.get(st) and plot_curves(plt, st, data.curves[st], path):
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
