"""A small SVG chart writer for the report: line panels and bar panels laid out as small multiples.

No dependencies (the report used matplotlib, whose import and drawing cost 1-3 s of CPU per report). It
draws only what the report needs: lines (optionally faint, with markers), bars with value labels, a
light grid, left and bottom spines, "nice" ticks (1/2/5 x 10^k) that cover the data, a legend placed
in the emptiest corner, titles. Every text is XML-escaped; NaN and inf points are skipped.

    text = figure([LinePanel("loss", [Series("loss", [1, 2, 3], [2.0, 1.1, 0.7], "#4e79a7")], xlabel="step")],
                  title="sft")
    Path("curves.svg").write_text(text)

Sizes are in SVG user units (CSS pixels at natural size).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

FONT = "DejaVu Sans,Helvetica,Arial,sans-serif"
FONT_SIZE = 11  # tick labels, legend; titles are larger
CHAR_WIDTH = 0.6  # average glyph width / font size of the sans-serif fonts above: to size margins and boxes
GRID, SPINE, TICK_TEXT, LABEL_TEXT, TITLE_TEXT = "#e5e7eb", "#9ca3af", "#6b7280", "#374151", "#111827"
MINUS = "\u2212"  # typographic minus in tick labels, as matplotlib writes it
SCI_LIMITS = (-3, 5)  # tick labels switch to scientific notation below 1e-3 and from 1e5 (as evals.table.fmt)
PANEL_GAP = 10

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # not allowed in XML 1.0


def escape(text) -> str:
    """`text` as XML character data or a quoted attribute value: `& < > " '` escaped, control
    characters (invalid in XML 1.0) dropped."""
    text = _CONTROL.sub("", str(text))
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))


# ---------------------------------------------------------------- ticks


def nice_ticks(lo: float, hi: float, target: int = 5, min_step: float = 0.0) -> list[float]:
    """Evenly spaced ticks at a step of 1, 2 or 5 x 10^k (at least `min_step`: 1 for step counts), the
    first <= `lo`, the last >= `hi`, about `target` intervals. `lo == hi` (a flat line, a single point)
    is widened around the value.

    Raises:
        ValueError: `lo` or `hi` is not finite, or `lo > hi`.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"nice_ticks needs finite lo <= hi, got {lo}, {hi}")
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi)):  # flat (also flat to float precision)
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = hi / target - lo / target  # the division first: hi - lo may overflow
    step = max(_nice_step(raw), min_step)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    if last == first:
        last += 1
    # k * step, not a running sum: no drift; round off the float noise of k * 0.1
    return [_round(k * step, step) for k in range(first, last + 1)]


def _nice_step(raw: float) -> float:
    exp = math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * 10.0 ** exp >= raw * (1 - 1e-9):
            return m * 10.0 ** exp
    return 10.0 ** (exp + 1)


def _round(v: float, step: float) -> float:
    digits = max(0, -math.floor(math.log10(step)) + 1)
    return round(v, digits) if digits < 300 else v


def tick_labels(ticks: Sequence[float], sci_limits: tuple[int, int] = SCI_LIMITS) -> list[str]:
    """Labels for evenly spaced `ticks`, with as many decimals as the step needs; in scientific
    notation (`2.5e-4`) when the largest |tick| is below 10^sci_limits[0] or at least 10^sci_limits[1]
    unless that is longer (123456.5 stays fixed, 200000 is 2e5)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(ticks[0]) or 1.0
    step_exp = math.floor(math.log10(step) + 1e-9) if step > 0 else 0  # 2.3 - 2.2 is 0.0999..: still 10^-1
    fixed = [_fixed(t, step, step_exp) for t in ticks]
    top = max(abs(t) for t in ticks)
    if top == 0 or 10.0 ** sci_limits[0] <= top < 10.0 ** sci_limits[1]:
        return fixed
    sci = [_sci(t, step, step_exp) for t in ticks]
    return sci if max(map(len, sci)) <= max(map(len, fixed)) else fixed


def _fixed(t: float, step: float, step_exp: int) -> str:
    return "0" if abs(t) < step * 1e-6 else _minus(f"{t:.{max(0, -step_exp)}f}")


def _sci(t: float, step: float, step_exp: int) -> str:
    if abs(t) < step * 1e-6:
        return "0"
    exp = math.floor(math.log10(abs(t)))
    if round(abs(t) / 10.0 ** exp, max(0, exp - step_exp)) >= 10:  # 9.99.. that rounds up to 10
        exp += 1
    text = f"{t / 10.0 ** exp:.{max(0, exp - step_exp)}f}"
    return _minus(text.rstrip("0").rstrip(".") if "." in text else text) + f"e{exp}"


def _minus(text: str) -> str:
    return MINUS + text[1:] if text.startswith("-") else text


# ---------------------------------------------------------------- what to draw


@dataclass
class Series:
    """One line: points (x, y) (non-finite ones are skipped), drawn as a polyline of `width`."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str
    width: float = 1.8
    opacity: float = 1.0
    markers: bool = False  # a dot on each point (short series)
    legend: bool = True  # listed in the panel's legend (a faint raw line under its smoothed one is not)


@dataclass
class LinePanel:
    title: str
    series: list[Series]
    xlabel: str = ""
    x_integer: bool = False  # x values are counts (steps): no ticks between integers
    legend: bool = False
    sci_limits: tuple[int, int] = SCI_LIMITS  # of the y tick labels


@dataclass
class BarPanel:
    """One bar per category; a `None` value draws no bar, only its text. Values all in [0, 1] get
    the axis 0..1 (plus room for the labels); others an axis from min(0, values) to max(0, values)."""

    title: str
    categories: list[str]
    values: list[Optional[float]]
    texts: list[str]  # the label over each bar
    colors: list[str]
    rotate: bool = False  # category labels at 20 degrees (many categories)


Panel = Union[LinePanel, BarPanel]


@dataclass
class _Box:
    left: float
    top: float
    right: float
    bottom: float


@dataclass
class _Scale:
    lo: float
    hi: float
    a: float  # pixel of lo
    b: float  # pixel of hi

    def __call__(self, v: float) -> float:
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _text_width(text: str, size: float = FONT_SIZE) -> float:
    return len(text) * size * CHAR_WIDTH


def _clip(text: str, width: float, size: float = FONT_SIZE) -> str:
    """`text` cut with an ellipsis to fit `width` pixels."""
    n = max(1, int(width / (size * CHAR_WIDTH)))
    return text if len(text) <= n else text[: n - 1] + "…"


def _text(x: float, y: float, text: str, *, anchor: str = "start", size: float = FONT_SIZE, color: str = TICK_TEXT,
          bold: bool = False, extra: str = "") -> str:
    weight = ' font-weight="bold"' if bold else ""
    return (f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}" font-size="{size}" fill="{color}"{weight}{extra}>'
            f"{escape(text)}</text>")


def _title(text: str, x: float, y0: float, right: float) -> str:
    """A panel's bold title, left-aligned with its plot at `x`, cut to end before `right`."""
    return _text(x, y0 + 18, _clip(text, right - x, 13), size=13, color=TITLE_TEXT, bold=True, extra=' class="title"')


def _finite(xs: Sequence[float], ys: Sequence[float]) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in zip(xs, ys)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y)]


# ---------------------------------------------------------------- panels


def _line_panel(p: LinePanel, x0: float, y0: float, w: float, h: float) -> list[str]:
    series = [(s, _finite(s.xs, s.ys)) for s in p.series]
    pts = [pt for _, ps in series for pt in ps]
    xs, ys = [x for x, _ in pts] or [0.0, 1.0], [y for _, y in pts] or [0.0, 1.0]
    xt = nice_ticks(min(xs), max(xs), min_step=1.0 if p.x_integer else 0.0)
    yt = nice_ticks(min(ys), max(ys))
    xl, yl = tick_labels(xt), tick_labels(yt, p.sci_limits)
    box = _Box(x0 + max(_text_width(t) for t in yl) + 14, y0 + 30, x0 + w - 14, y0 + h - (40 if p.xlabel else 26))
    sx, sy = _Scale(xt[0], xt[-1], box.left, box.right), _Scale(yt[0], yt[-1], box.bottom, box.top)
    out = ['<g class="panel line-panel">', _title(p.title, box.left, y0, x0 + w)]
    out += _grid(box, [sx(t) for t in xt], [sy(t) for t in yt], xl, yl)
    if p.xlabel:
        out.append(_text((box.left + box.right) / 2, box.bottom + 33, p.xlabel, anchor="middle", color=LABEL_TEXT,
                         extra=' class="xlabel"'))
    for s, ps in series:
        if not ps:
            continue
        coords = " ".join(f"{_num(sx(x))},{_num(sy(y))}" for x, y in ps)
        opacity = f' stroke-opacity="{s.opacity}"' if s.opacity < 1 else ""
        out.append(f'<polyline class="series" fill="none" stroke="{escape(s.color)}" stroke-width="{s.width}"{opacity} '
                   f'stroke-linejoin="round" stroke-linecap="round" points="{coords}">'
                   f'<title>{escape(s.label)}</title></polyline>')
        if s.markers:
            out += [f'<circle class="marker" cx="{_num(sx(x))}" cy="{_num(sy(y))}" r="2.5" fill="{escape(s.color)}"/>'
                    for x, y in ps]
    if p.legend:
        lines = [_along([(sx(x), sy(y)) for x, y in ps]) for _, ps in series]
        out += _legend([s for s in p.series if s.legend], box, lines)
    out.append("</g>")
    return out


def _grid(box: _Box, xs: list[float], ys: list[float], xl: list[str], yl: list[str]) -> list[str]:
    """Grid lines and tick labels at pixel positions `xs` (none: no vertical grid) and `ys`; the spines."""
    out = [f'<line class="grid" x1="{_num(box.left)}" x2="{_num(box.right)}" y1="{_num(y)}" y2="{_num(y)}" '
           f'stroke="{GRID}" stroke-width="0.8"/>' for y in ys]
    out += [f'<line class="grid" x1="{_num(x)}" x2="{_num(x)}" y1="{_num(box.top)}" y2="{_num(box.bottom)}" '
            f'stroke="{GRID}" stroke-width="0.8"/>' for x in xs]
    out += [_text(box.left - 6, y + 4, t, anchor="end", extra=' class="ytick"') for y, t in zip(ys, yl)]
    out += [_text(x, box.bottom + 15, t, anchor="middle", extra=' class="xtick"') for x, t in zip(xs, xl)]
    out.append(f'<path class="spine" d="M{_num(box.left)},{_num(box.top)}V{_num(box.bottom)}H{_num(box.right)}" '
               f'fill="none" stroke="{SPINE}" stroke-width="1"/>')
    return out


def _along(pts: list[tuple[float, float]], every: float = 4.0) -> list[tuple[float, float]]:
    """Pixel points on a polyline about `every` px apart (its vertices, and more on long segments)."""
    out = pts[:1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        n = min(50, int(math.hypot(x1 - x0, y1 - y0) / every))
        out += [(x0 + (x1 - x0) * k / (n + 1), y0 + (y1 - y0) * k / (n + 1)) for k in range(1, n + 1)] + [(x1, y1)]
    return out


def _legend(series: list[Series], box: _Box, lines: list[list[tuple[float, float]]]) -> list[str]:
    """The legend in the corner of the plot that covers the least of the `lines` (pixel points along
    each; matplotlib's loc="best", roughly)."""
    if not series:
        return []
    labels = [_clip(s.label, (box.right - box.left) * 0.6 - 30) for s in series]
    w, h = 30 + max(_text_width(t) for t in labels), 6 + 15 * len(series)
    corners = [(box.right - w - 4, box.top + 2), (box.left + 4, box.top + 2), (box.left + 4, box.bottom - h - 2),
               (box.right - w - 4, box.bottom - h - 2)]  # upper right, upper left, lower left, lower right
    m = 5  # px: a line just outside the box still touches its text

    def covered(c: tuple[float, float]) -> int:
        return sum(c[0] - m <= px <= c[0] + w + m and c[1] - m <= py <= c[1] + h + m for pts in lines for px, py in pts)

    x, y = min(corners, key=covered)
    out = [f'<g class="legend"><rect x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" height="{_num(h)}" fill="white" '
           f'fill-opacity="0.8"/>']
    for i, (s, label) in enumerate(zip(series, labels)):
        ly = y + 11 + 15 * i
        out.append(f'<line x1="{_num(x + 5)}" x2="{_num(x + 21)}" y1="{_num(ly - 3.5)}" y2="{_num(ly - 3.5)}" '
                   f'stroke="{escape(s.color)}" stroke-width="{s.width}"/>')
        out.append(_text(x + 26, ly, label, color=LABEL_TEXT))
    return out + ["</g>"]


def _bar_panel(p: BarPanel, x0: float, y0: float, w: float, h: float) -> list[str]:
    known = [v for v in p.values if isinstance(v, (int, float)) and math.isfinite(v)]
    unit = not known or all(0 <= v <= 1 for v in known)
    ticks = nice_ticks(0.0, 1.0) if unit else nice_ticks(min(0.0, *known), max(0.0, *known))
    pad = 0.12 * (ticks[-1] - ticks[0])  # room for the value labels
    lo = ticks[0] - (pad if any(v < 0 for v in known) else 0.0)
    labels = tick_labels(ticks)
    cat_width = max((_text_width(c) for c in p.categories), default=0.0)
    bottom = 14 + (0.34 * min(cat_width, 140) + FONT_SIZE if p.rotate else FONT_SIZE + 6)
    box = _Box(x0 + max(_text_width(t) for t in labels) + 14, y0 + 30, x0 + w - 14, y0 + h - bottom)
    sy = _Scale(lo, ticks[-1] + pad, box.bottom, box.top)
    band = (box.right - box.left) / max(1, len(p.categories))
    out = ['<g class="panel bar-panel">', _title(p.title, box.left, y0, x0 + w)]
    out += _grid(box, [], [sy(t) for t in ticks], [], labels)
    for i, (cat, v, text, color) in enumerate(zip(p.categories, p.values, p.texts, p.colors)):
        cx = box.left + band * (i + 0.5)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        if ok:
            top, base = sy(max(v, 0.0)), sy(min(v, 0.0))
            out.append(f'<rect class="bar" x="{_num(cx - 0.31 * band)}" y="{_num(top)}" width="{_num(0.62 * band)}" '
                       f'height="{_num(base - top)}" fill="{escape(color)}">'
                       f'<title>{escape(cat)}: {escape(text)}</title></rect>')
        ty = sy(v) + 13 if ok and v < 0 else sy(v if ok else 0.0) - 3
        out.append(_text(cx, ty, text, anchor="middle", color=LABEL_TEXT, size=10, extra=' class="value"'))
        if p.rotate:
            ly = box.bottom + 14
            rotate = f' class="xtick" transform="rotate(-20 {_num(cx)} {_num(ly)})"'
            out.append(_text(cx, ly, _clip(cat, 140), anchor="end", extra=rotate))
        else:
            out.append(_text(cx, box.bottom + 15, _clip(cat, band), anchor="middle", extra=' class="xtick"'))
    return out + ["</g>"]


# ---------------------------------------------------------------- the figure


def figure(panels: list[Panel], *, cols: int = 3, panel_width: float = 410, panel_height: float = 270,
           title: Optional[str] = None) -> str:
    """A standalone SVG document: `panels` in rows of up to `cols`, each `panel_width` x `panel_height`,
    under an optional bold `title`; white background."""
    cols = max(1, min(cols, len(panels)))
    rows = math.ceil(len(panels) / cols) if panels else 0
    top = 30 if title else 4
    width, height = cols * panel_width + (cols + 1) * PANEL_GAP, top + rows * (panel_height + PANEL_GAP)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(width)}" height="{_num(height)}" '
           f'viewBox="0 0 {_num(width)} {_num(height)}" font-family="{FONT}" font-size="{FONT_SIZE}">',
           f'<rect width="100%" height="100%" fill="white"/>']
    if title:
        out.append(_text(PANEL_GAP, 21, _clip(title, width - 2 * PANEL_GAP, 15), size=15, color=TITLE_TEXT, bold=True,
                         extra=' class="suptitle"'))
    for i, p in enumerate(panels):
        x0 = PANEL_GAP + (i % cols) * (panel_width + PANEL_GAP)
        y0 = top + (i // cols) * (panel_height + PANEL_GAP)
        draw = _line_panel if isinstance(p, LinePanel) else _bar_panel
        out += draw(p, x0, y0, panel_width, panel_height)
    return "\n".join(out + ["</svg>", ""])
