"""The eval table -- base and each stage, one row per task metric, deltas against base -- as one model
that the three renderers (rich in `evals.cli`, HTML and Markdown in `evals.report`) only format.

    table = build_eval_table(results, ["base", "sft", "dpo"])
    for row in table.rows:
        row.task, row.metric, [(cell.text, cell.delta_text, cell.tone) for cell in row.cells]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from alignment.recipe import BASE

# colors: base in slate, stages in order from this palette (Tableau 10, colorblind-friendly)
BASE_COLOR = "#8b95a5"
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]

Tone = Literal["good", "bad", "neutral"]


def fmt(v: Optional[float]) -> str:
    """A metric for a table: 4 significant digits, `–` for none."""
    if v is None:
        return "–"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"


def fmt_delta(d: float) -> str:
    """A signed delta (`+0.25`, `−1.2`, `±0`)."""
    if abs(d) < 1e-12:
        return "±0"
    return ("+" if d > 0 else "−") + fmt(abs(d))


@dataclass
class Cell:
    """One stage's value of one metric.

    `skipped` (the reason) is set on the first row of a task the stage skipped; its later rows are
    plain cells without a value.
    """

    value: Optional[float]
    delta: Optional[float] = None  # against base; None on base and where either value is missing
    tone: Tone = "neutral"  # the delta against the metric's direction
    skipped: Optional[str] = None

    @property
    def text(self) -> str:
        return "skipped" if self.skipped else fmt(self.value)

    @property
    def delta_text(self) -> Optional[str]:
        return None if self.delta is None else fmt_delta(self.delta)


@dataclass
class Row:
    """One metric of one task across the stages (`cells` in `EvalTable.stages` order)."""

    task: str
    metric: str  # "" for a task without metrics (skipped everywhere)
    main: bool  # the task's headline metric
    first: bool  # the task's first row (it names the task)
    last: bool  # the task's last row
    cells: list[Cell]


@dataclass
class EvalTable:
    """Evals across stages: stages (base first) x tasks x metrics, with every cell computed."""

    stages: list[str]
    tasks: list[str]
    rows: list[Row]
    main: dict[str, str]  # task -> headline metric
    colors: dict[str, str]  # stage -> plot / legend color
    entries: dict[str, dict[str, dict]]  # stage -> task -> evals JSON entry (samples for the report)
    skipped: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (task, reason, stages)

    def value(self, stage: str, t: str, metric: str) -> Optional[float]:
        return _value(self.entries, stage, t, metric)


def _value(entries: dict, stage: str, t: str, metric: str) -> Optional[float]:
    v = entries.get(stage, {}).get(t, {}).get("metrics", {}).get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def _tone(delta: Optional[float], direction: Optional[bool]) -> Tone:
    if delta is None or direction is None or abs(delta) < 1e-12:
        return "neutral"
    return "good" if (delta > 0) == direction else "bad"


def build_eval_table(evals: dict[str, dict], order: Optional[list[str]] = None) -> EvalTable:
    """The table of `evals` (stage -> evals/STAGE.json, as `run_evals` returns), stages in `order`."""
    order = order or ([BASE] + [s for s in evals if s != BASE])
    stages = [s for s in order if s in evals]
    entries = {s: evals[s].get("tasks", {}) for s in stages}
    tasks: list[str] = []
    for s in stages:
        tasks += [t for t in entries[s] if t not in tasks]
    main: dict[str, str] = {}
    rows: list[Row] = []
    skipped: list[tuple[str, str, list[str]]] = []
    for t in tasks:
        found = [entries[s][t] for s in stages if t in entries[s]]
        names: list[str] = []
        better: dict[str, bool] = {}
        for e in found:
            names += [m for m in e.get("metrics", {}) if m not in names]
            better.update(e.get("higher_is_better") or {})
        main[t] = next((e["main"] for e in found if e.get("main")), names[0] if names else "")
        metrics = ([main[t]] if main[t] in names else []) + [m for m in names if m != main[t]] or [""]
        for j, m in enumerate(metrics):
            cells = []
            for s in stages:
                reason = entries[s].get(t, {}).get("skipped")
                if reason and j == 0:
                    cells.append(Cell(None, skipped=reason))
                    continue
                value, base = _value(entries, s, t, m), _value(entries, BASE, t, m)
                delta = None if value is None or base is None or s == BASE else value - base
                cells.append(Cell(value, delta, _tone(delta, better.get(m))))
            rows.append(Row(t, m, m == main[t], j == 0, j == len(metrics) - 1, cells))
        reasons: dict[str, list[str]] = {}  # why, once per task and reason
        for s in stages:
            if entries[s].get(t, {}).get("skipped"):
                reasons.setdefault(entries[s][t]["skipped"], []).append(s)
        skipped += [(t, why, names_) for why, names_ in reasons.items()]
    colors = {BASE: BASE_COLOR}
    colors.update({s: PALETTE[i % len(PALETTE)] for i, s in enumerate(s for s in stages if s != BASE)})
    return EvalTable(stages, tasks, rows, main, colors, entries, skipped)
