"""The report's SVG plots (evals/svg.py, evals.report.plot_curves / plot_evals): valid XML, what each
panel holds, values mapped to the right pixels, nice ticks, escaping, and degenerate series."""
from __future__ import annotations

import base64
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from evals import svg
from evals.report import plot_curves, plot_evals, write_report
from evals.table import PALETTE, build_eval_table

NS = "{http://www.w3.org/2000/svg}"
EVIL = "<img src=x onerror=alert(1)>&<script>alert(2)</script>"


def _parse(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == f"{NS}svg"
    return root


def _panels(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iter(f"{NS}g") if "panel" in g.get("class", "").split()]


def _of_class(el: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in el.iter(f"{NS}{tag}") if cls in e.get("class", "").split()]


def _points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


def _label_value(text: str) -> float:
    return float(text.replace(svg.MINUS, "-"))


# ---------------------------------------------------------------- ticks


@pytest.mark.parametrize("lo, hi", [(0, 1), (0.2, 2.0), (1, 10), (1e-5, 1e-3), (-3, 7), (-0.017, 0.013), (1, 1e6),
                                    (0.5, 0.5), (0, 0), (-4, -4), (1e9, 1e9 + 1e-6), (123456, 123457), (3, 1e12),
                                    (-2e8, -1e8), (1e-300, 1e-300), (7, 8), (0, 13), (0.1, 1.4)])
def test_ticks_are_nice_and_cover_the_range(lo, hi):
    ticks = svg.nice_ticks(lo, hi)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6  # 1, 2 or 5 x 10^k
    assert all(math.isclose(b - a, step, rel_tol=1e-6) for a, b in zip(ticks, ticks[1:]))  # evenly spaced
    assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 12
    if hi - lo > 1e-9 * max(abs(lo), abs(hi)):
        assert ticks[0] > lo - step and ticks[-1] < hi + step  # no wider than the data needs
    else:  # flat: widened around the value
        assert ticks[0] < lo and ticks[-1] > hi
    assert all(round(t / step) * step == pytest.approx(t, rel=1e-9, abs=step * 1e-9) for t in ticks)  # multiples of step
    assert len(set(svg.tick_labels(ticks))) == len(ticks)  # distinct labels


def test_nice_ticks_refuses_non_finite_or_reversed():
    for lo, hi in [(math.nan, 1), (0, math.inf), (2, 1)]:
        with pytest.raises(ValueError, match="finite lo <= hi"):
            svg.nice_ticks(lo, hi)


def test_tick_labels_fixed_or_scientific():
    lr = svg.nice_ticks(1e-5, 1e-3)
    assert svg.tick_labels(lr, (-2, 3)) == ["0", "2e-4", "4e-4", "6e-4", "8e-4", "1e-3"]  # the learning-rate panel
    assert svg.tick_labels(lr) == ["0", "0.0002", "0.0004", "0.0006", "0.0008", "0.0010"]  # 1e-3 is not "very small"
    assert svg.tick_labels(svg.nice_ticks(1, 1e6)) == ["0", "2e5", "4e5", "6e5", "8e5", "1e6"]  # a huge step count
    assert svg.tick_labels(svg.nice_ticks(-1e-7, 2e-6))[:3] == [svg.MINUS + "5e-7", "0", "5e-7"]
    assert svg.tick_labels(svg.nice_ticks(-3, 7)) == [svg.MINUS + "4", svg.MINUS + "2", "0", "2", "4", "6", "8"]
    assert svg.tick_labels(svg.nice_ticks(0.2, 2.0)) == ["0", "0.5", "1.0", "1.5", "2.0"]
    assert svg.tick_labels(svg.nice_ticks(2.2, 2.6)) == ["2.2", "2.3", "2.4", "2.5", "2.6"]  # 2.3 - 2.2 < 0.1
    assert svg.tick_labels([123456.0, 123456.5, 123457.0]) == ["123456.0", "123456.5", "123457.0"]  # sci is longer


# ---------------------------------------------------------------- curves


def _rows(n_long: int = 60) -> list[dict]:
    rows = [{"step": s, "loss": 2.0 / s, "learning_rate": 2e-4 * (1 - s / 20), "reward/mean": 0.1 * s,
             "reward/f/mean": -0.05 * s} for s in range(1, 11)]
    # grad_norm logged at many more steps: raw + smoothed lines
    rows += [{"step": 10 + s, "grad_norm": 1.0 + (s % 7) / 10} for s in range(1, n_long + 1)]
    return rows


def test_curves_have_a_panel_per_group_and_the_right_lines(tmp_path):
    path = tmp_path / "c.svg"
    assert plot_curves("sft", _rows(), path)
    root = _parse(path.read_text())
    assert [t.text for t in _of_class(root, "text", "suptitle")] == ["sft"]
    panels = _panels(root)
    titles = [_of_class(p, "text", "title")[0].text for p in panels]
    assert titles == ["loss", "reward", "learning_rate", "grad_norm"]  # one key: the key is the title; PANELS order
    lines = {t: p.findall(f"{NS}polyline") for t, p in zip(titles, panels)}
    assert [len(lines[t]) for t in titles] == [1, 2, 1, 2]  # grad_norm: 60 points > 40, raw + EMA
    raw, ema = lines["grad_norm"]
    assert raw.get("stroke-opacity") == "0.25" and ema.get("stroke-opacity") is None
    assert len(_points(raw)) == len(_points(ema)) == 60 and _points(raw) != _points(ema)
    assert [e.get("stroke") for e in lines["reward"]] == PALETTE[:2]
    # markers on the short series only, one per point; a legend on the two-key panel only
    markers = {t: len(_of_class(p, "circle", "marker")) for t, p in zip(titles, panels)}
    assert markers == {"loss": 10, "reward": 20, "learning_rate": 10, "grad_norm": 0}
    legends = [len(_of_class(p, "g", "legend")) for p in panels]
    assert legends == [0, 1, 0, 0]
    assert [t.text for t in _of_class(panels[1], "g", "legend")[0].iter(f"{NS}text")] == ["reward/mean", "reward/f/mean"]
    assert all(t.text == "step" for t in _of_class(root, "text", "xlabel"))
    lr_ticks = [t.text for t in _of_class(panels[2], "text", "ytick")]
    assert lr_ticks == ["1e-4", "1.2e-4", "1.4e-4", "1.6e-4", "1.8e-4", "2e-4"]  # scientific on the learning-rate panel


def test_a_larger_value_lies_higher_and_within_the_ticks(tmp_path):
    rows = [{"step": s, "loss": v} for s, v in [(1, 3.0), (2, -1.5), (5, 0.25), (9, 2.0), (1000, 0.75)]]
    path = tmp_path / "c.svg"
    assert plot_curves("s", rows, path)
    panel = _panels(_parse(path.read_text()))[0]
    pts = _points(panel.find(f"{NS}polyline"))
    steps, values = [r["step"] for r in rows], [r["loss"] for r in rows]
    by_value = [y for _, y in sorted(zip(values, (p[1] for p in pts)))]
    assert by_value == sorted(by_value, reverse=True)  # SVG y grows downwards: larger value, smaller y
    assert [x for x, _ in pts] == sorted(x for x, _ in pts) and pts[0][0] < pts[1][0] < pts[-1][0]
    # the ticks' own positions map the same way, and the data lies between the end ticks
    yt = [(_label_value(t.text), float(t.get("y"))) for t in _of_class(panel, "text", "ytick")]
    assert [y for _, y in yt] == sorted((y for _, y in yt), reverse=True)
    assert yt[0][0] <= min(values) and yt[-1][0] >= max(values)
    xt = [(_label_value(t.text), float(t.get("x"))) for t in _of_class(panel, "text", "xtick")]
    assert xt[0][0] <= 1 and xt[-1][0] >= 1000
    # linear: a point's pixel is where the ticks put its value (tick labels are drawn 4 px below their line)
    (v0, y0), (v1, y1) = yt[0], yt[-1]
    for v, (_, py) in zip(values, pts):
        assert py == pytest.approx(y0 - 4 + (v - v0) / (v1 - v0) * (y1 - y0), abs=0.1)
    (s0, x0), (s1, x1) = xt[0], xt[-1]
    for s, (px, _) in zip(steps, pts):
        assert px == pytest.approx(x0 + (s - s0) / (s1 - s0) * (x1 - x0), abs=0.1)


def test_flat_single_point_and_non_finite_series_do_not_break_the_plot(tmp_path):
    rows = [{"step": s, "loss": 0.5, "grad_norm": [math.nan, 2.0, math.inf, 3.0, -math.inf, 1.0][s],
             "reward/mean": 1.0 if s == 2 else None, "reward/std": 0.0, "learning_rate": 1e-5}
            for s in range(6)]
    rows.append({"step": math.nan, "loss": 0.7})  # a step that is not a number: skipped
    path = tmp_path / "c.svg"
    assert plot_curves("s", rows, path)
    text = path.read_text()
    assert "nan" not in text.lower() and "inf" not in text.lower()
    panels = _panels(_parse(text))
    titles = [_of_class(p, "text", "title")[0].text for p in panels]
    assert titles == ["loss", "reward/std", "learning_rate", "grad_norm"]  # reward/mean was logged once: not plotted
    loss, std, lr, grad = (p.find(f"{NS}polyline") for p in panels)
    assert len(_points(loss)) == 6 and len({y for _, y in _points(loss)}) == 1  # flat, inside its (widened) ticks
    assert [_label_value(t.text) for t in _of_class(panels[0], "text", "ytick")][::3] == pytest.approx([0.44, 0.5, 0.56])
    assert [_label_value(t.text) for t in _of_class(panels[1], "text", "ytick")] == [-1.0, -0.5, 0.0, 0.5, 1.0]  # flat 0
    assert len(_points(grad)) == 3  # the three finite values


def test_steps_are_ticked_at_integers(tmp_path):
    rows = [{"step": s, "loss": 3.0 - s, "grad_norm": 1.0} for s in (1, 2)]  # a 2-step run (the bench's)
    assert plot_curves("s", rows, tmp_path / "c.svg")
    for panel in _panels(_parse((tmp_path / "c.svg").read_text())):
        assert [t.text for t in _of_class(panel, "text", "xtick")] == ["1", "2"]
    assert svg.nice_ticks(5, 5, min_step=1) == [4, 5, 6]  # a single step
    assert svg.nice_ticks(0, 2000, min_step=1)[1] == 500  # a large count: min_step does not matter


def test_single_points_and_empty_series_in_the_writer():
    one = svg.LinePanel("one", [svg.Series("a", [5], [2.0], "#000", markers=True)])
    empty = svg.LinePanel("none", [svg.Series("a", [1, 2], [math.nan, math.inf], "#000"), svg.Series("b", [], [], "#111")],
                          legend=True)
    root = _parse(svg.figure([one, empty]))
    a, b = _panels(root)
    assert len(_points(a.find(f"{NS}polyline"))) == 1 and len(_of_class(a, "circle", "marker")) == 1
    assert b.findall(f"{NS}polyline") == [] and len(_of_class(b, "text", "ytick")) >= 2


def test_nothing_logged_twice_writes_no_file(tmp_path):
    assert not plot_curves("s", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": math.nan}], tmp_path / "c.svg")
    assert not (tmp_path / "c.svg").exists()


# ---------------------------------------------------------------- eval bars


def _evals(stages: dict[str, dict[str, float | None]]) -> dict:
    return {st: {"stage": st, "tasks": {t: ({"metrics": {"m": v}, "main": "m"} if v is not None else {"skipped": "no"})
                                        for t, v in tasks.items()}} for st, tasks in stages.items()}


def test_eval_bars_one_panel_per_task_one_bar_per_value(tmp_path):
    table = build_eval_table(_evals({"base": {"acc": 0.25, "kl": -0.5, "len": 40.0},
                                     "sft": {"acc": 0.5, "kl": 0.3, "len": None},
                                     "dpo": {"acc": 1.0, "kl": 0.7, "len": 31.0}}))
    path = tmp_path / "e.svg"
    assert plot_evals(table, path)
    panels = _panels(_parse(path.read_text()))
    assert [_of_class(p, "text", "title")[0].text for p in panels] == ["acc · m", "kl · m", "len · m"]
    bars = [_of_class(p, "rect", "bar") for p in panels]
    assert [len(b) for b in bars] == [3, 3, 2]  # sft skipped len: no bar
    assert [b.get("fill") for b in bars[0]] == [table.colors[s] for s in ("base", "sft", "dpo")]
    assert [t.text for t in _of_class(panels[2], "text", "value")] == ["40", "–", "31"]
    assert [t.text for t in _of_class(panels[0], "text", "xtick")] == ["base", "sft", "dpo"]
    # heights in proportion to the values; accuracy-like values get the axis 0..1
    acc = [float(b.get("height")) for b in bars[0]]
    assert acc[1] == pytest.approx(2 * acc[0], abs=0.15) and acc[2] == pytest.approx(4 * acc[0], abs=0.15)
    assert [_label_value(t.text) for t in _of_class(panels[0], "text", "ytick")] == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    # a negative bar hangs from the zero line, a positive one stands on it
    neg, pos = bars[1][0], bars[1][1]
    assert float(neg.get("y")) == pytest.approx(float(pos.get("y")) + float(pos.get("height")), abs=0.1)


def test_no_eval_values_writes_no_file(tmp_path):
    assert not plot_evals(build_eval_table(_evals({"base": {"acc": None}})), tmp_path / "e.svg")
    assert not (tmp_path / "e.svg").exists()


def test_many_stages_rotate_their_names(tmp_path):
    table = build_eval_table(_evals({s: {"acc": 0.1 * i} for i, s in enumerate(["base", "a", "b", "c", "d"])}))
    assert plot_evals(table, tmp_path / "e.svg")
    ticks = _of_class(_parse((tmp_path / "e.svg").read_text()), "text", "xtick")
    assert len(ticks) == 5 and all(t.get("transform", "").startswith("rotate(-20") for t in ticks)


# ---------------------------------------------------------------- escaping


def test_names_from_recipes_are_escaped(tmp_path):
    table = build_eval_table(_evals({"base": {EVIL: 0.5}, EVIL: {EVIL: 0.75}}))
    assert plot_evals(table, tmp_path / "e.svg")
    assert plot_curves(EVIL, [{"step": s, f"reward/{EVIL}/mean": s, "reward/mean": 1.0 * s} for s in (1, 2)],
                       tmp_path / "c.svg")
    for name in ("e.svg", "c.svg"):
        text = (tmp_path / name).read_text()
        assert "<script" not in text and "<img" not in text
        texts = [e.text for e in _parse(text).iter() if e.text]
        assert any(EVIL in t for t in texts)  # shown as text, the same characters
    assert svg.escape("a\x00b\x1bc'\"") == "abc&#39;&quot;"  # control characters are not XML


def test_report_embeds_its_svgs_and_escapes_a_hostile_stage_name(tmp_path):
    """write_report on a hand-made run directory (no models): data URIs of the SVGs in the HTML, the SVG
    files beside report.md, stale PNGs of an older report removed, no markup from the run's names."""
    evil = "<img src=x onerror=alert(1)>"  # a stage name can be a folder name: no "/"
    run_dir = tmp_path / "run"
    (run_dir / evil).mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(json.dumps({"name": "r", "model": {"name_or_path": "m"},
                                                     "stages": {evil: {"method": "sft"}}}))
    (run_dir / evil / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    (run_dir / "evals").mkdir()
    for st, v in (("base", 0.25), (evil, 0.5)):
        (run_dir / "evals" / f"{st}.json").write_text(json.dumps({"stage": st, "tasks": {"acc": {"metrics": {"m": v}}}}))
    (run_dir / "report").mkdir()
    (run_dir / "report" / "evals.png").write_bytes(b"\x89PNG old")
    index = write_report(run_dir)
    page = index.read_text()
    assert "<img src=x" not in page and "<script" not in page
    uris = re.findall(r"<img[^>]+src='([^']+)'", page)
    assert len(uris) == 2 and all(u.startswith("data:image/svg+xml;base64,") for u in uris)
    for u in uris:
        text = base64.b64decode(u.split(",", 1)[1]).decode()
        _parse(text)
        assert "<img" not in text
    report = run_dir / "report"
    files = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report / "report.md").read_text())
    assert files == ["evals.svg", "curves-00-_img_src_x_onerror_alert_1__.svg"]
    assert all(_parse((report / f).read_text()) is not None for f in files)
    assert sorted(p.name for p in report.iterdir()) == sorted(files + ["index.html", "report.md"])  # the old PNG is gone


def test_markdown_cells_keep_a_completions_markup_as_text():
    """A model's completion is untrusted: in report.md it is text, not HTML a viewer would render."""
    from evals.report import _md

    assert _md("<script>alert(1)</script> a|b\nc & d") == "&lt;script&gt;alert(1)&lt;/script&gt; a\\|b⏎ c &amp; d"
