"""Small deterministic SVG charts for the report: the same data give the same bytes (fixed
sizes, coordinates rounded to 0.1 px, no ids, no dates), every label escaped, no script."""

from __future__ import annotations

import math
from html import escape

W, H = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 28, 44  # margins: the legend sits on the right
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]


def _n(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / count))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= count:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(v: float, ticks: list[float]) -> str:
    """A tick label with as many decimals as the tick spacing needs (no repeated labels)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{v:,.{decimals}f}"


class _Frame:
    """Axes from data ranges to pixels, with gridlines, ticks and axis titles."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xs: list[float], ys: list[float],
                 y_from_zero: bool = False, x_ticks: bool = True, width: int = W,
                 bottom: int = BOTTOM) -> None:
        self.w, self.h, self.bottom = width, H + bottom - BOTTOM, bottom
        self.x0, self.x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        self.y0, self.y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if y_from_zero:
            self.y0 = min(0.0, self.y0)
        pad_x = (self.x1 - self.x0) * 0.05 or 1.0
        pad_y = (self.y1 - self.y0) * 0.05 or 1.0
        self.x0, self.x1, self.y1 = self.x0 - pad_x, self.x1 + pad_x, self.y1 + pad_y
        if not y_from_zero:
            self.y0 -= pad_y
        w, h = self.w, self.h
        self.parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
                       f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">'),
                      f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
        xt = _ticks(self.x0, self.x1) if x_ticks else []
        for t in xt:
            x = self.px(t)
            self.parts.append(f'<line x1="{_n(x)}" y1="{TOP}" x2="{_n(x)}" y2="{h - bottom}" stroke="#eee"/>'
                              f'<text x="{_n(x)}" y="{h - bottom + 14}" '
                              f'text-anchor="middle">{_label(t, xt)}</text>')
        yt = _ticks(self.y0, self.y1)
        for t in yt:
            y = self.py(t)
            self.parts.append(f'<line x1="{LEFT}" y1="{_n(y)}" x2="{w - RIGHT}" y2="{_n(y)}" stroke="#eee"/>'
                              f'<text x="{LEFT - 6}" y="{_n(y + 4)}" text-anchor="end">'
                              f'{_label(t, yt)}</text>')
        self.parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{w - LEFT - RIGHT}" '
                          f'height="{h - TOP - bottom}" '
                          f'fill="none" stroke="#888"/>'
                          f'<text x="{(LEFT + w - RIGHT) / 2:.0f}" y="{h - 8}" '
                          f'text-anchor="middle">{escape(xlabel)}</text>'
                          f'<text x="14" y="{(TOP + h - bottom) / 2:.0f}" text-anchor="middle" '
                          f'transform="rotate(-90 14 {(TOP + h - bottom) / 2:.0f})">{escape(ylabel)}</text>')

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (self.w - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return self.h - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.h - TOP - self.bottom)

    def legend(self, entries: list[tuple[str, str]]) -> None:
        for i, (name, color) in enumerate(entries[:16]):
            y = TOP + 8 + i * 16
            self.parts.append(f'<rect x="{self.w - RIGHT + 10}" y="{y - 8}" width="10" height="10" '
                              f'fill="{color}"/>'
                              f'<text x="{self.w - RIGHT + 24}" y="{y + 1}">{escape(name[:22])}</text>')

    def done(self) -> str:
        return "".join(self.parts) + "</svg>"


def line_chart(title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """One polyline per series (points with a non-finite y are skipped)."""
    clean = {k: [(x, y) for x, y in v if math.isfinite(y)] for k, v in series.items()}
    frame = _Frame(title, xlabel, ylabel, [x for v in clean.values() for x, _ in v],
                   [y for v in clean.values() for _, y in v])
    entries = []
    for i, (name, points) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{_n(frame.px(x))},{_n(frame.py(y))}" for x, y in points)
        if len(points) == 1:
            frame.parts.append(f'<circle cx="{_n(frame.px(points[0][0]))}" cy="{_n(frame.py(points[0][1]))}" '
                               f'r="3" fill="{color}"/>')
        elif points:
            frame.parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" '
                               'stroke-width="1.5"/>')
        entries.append((name, color))
    frame.legend(entries)
    return frame.done()


def scatter(title: str, xlabel: str, ylabel: str, points: list[tuple[str, float, float]],
            front: list[str] | None = None) -> str:
    """Labelled points; `front` (labels in x order) is drawn as a connected line."""
    points = [(label, x, y) for label, x, y in points if math.isfinite(x) and math.isfinite(y)]
    frame = _Frame(title, xlabel, ylabel, [x for _, x, _ in points], [y for _, _, y in points])
    if front:
        where = {label: (x, y) for label, x, y in points}
        coords = " ".join(f"{_n(frame.px(where[lb][0]))},{_n(frame.py(where[lb][1]))}" for lb in front
                          if lb in where)
        frame.parts.append(f'<polyline points="{coords}" fill="none" stroke="#d62728" stroke-dasharray="4 '
                           '3"/>')
    for label, x, y in points:
        frame.parts.append(f'<circle cx="{_n(frame.px(x))}" cy="{_n(frame.py(y))}" r="3.5" fill="#1f77b4"/>'
                           f'<text x="{_n(frame.px(x) + 5)}" y="{_n(frame.py(y) - 4)}" font-size="9">'
                           f'{escape(label[:24])}</text>')
    return frame.done()


def stacked_bars(title: str, ylabel: str, bars: list[tuple[str, dict[str, float]]], categories: list[str],
                 markers: dict[str, float] | None = None,
                 beside: dict[str, dict[str, float]] | None = None) -> str:
    """One bar per label, stacked by category; a marker (e.g. the estimate's total) as a black
    tick; `beside` (e.g. the estimate by category) as a paler stacked bar right of the label's.
    Many bars widen the chart and turn their labels."""
    def total(values: dict[str, float]) -> float:
        return sum(values.get(c, 0.0) for c in categories)

    tops = [total(v)
            for _, v in bars] + list((markers or {}).values()) + [total(v) for v in (beside or {}).values()]
    slot_px = 44 if beside else 30
    width = max(W, LEFT + RIGHT + slot_px * len(bars))
    turned = len(bars) > 8  # labels at an angle, the plot's bottom margin made room for them
    frame = _Frame(title, "", ylabel, [0.0, float(max(1, len(bars)))], [0.0, *tops], y_from_zero=True,
                   x_ticks=False, width=width, bottom=120 if turned else BOTTOM)
    slot = (width - LEFT - RIGHT) / max(1, len(bars))
    bar_w = slot * (0.38 if beside else 0.6)

    def stack(x: float, values: dict[str, float], opacity: str) -> None:
        base = 0.0
        for j, category in enumerate(categories):
            v = values.get(category, 0.0)
            y_top, y_bottom = frame.py(base + v), frame.py(base)
            frame.parts.append(f'<rect x="{_n(x)}" y="{_n(y_top)}" width="{_n(bar_w)}" '
                               f'height="{_n(y_bottom - y_top)}" '
                               f'fill="{COLORS[j % len(COLORS)]}"{opacity}/>')
            base += v

    for i, (label, values) in enumerate(bars):
        x = LEFT + i * slot + slot * 0.2 * (0.5 if beside else 1)
        stack(x, values, "")
        if beside and label in beside:
            stack(x + bar_w + slot * 0.04, beside[label], ' fill-opacity="0.45"')
        if markers and label in markers:
            y = frame.py(markers[label])
            frame.parts.append(f'<line x1="{_n(x - 3)}" y1="{_n(y)}" x2="{_n(x + bar_w + 3)}" y2="{_n(y)}" '
                               f'stroke="#000" stroke-width="2"/>')
        middle, below = x + (slot * 0.4 if beside else bar_w / 2), frame.h - frame.bottom + 14
        if turned:
            frame.parts.append(f'<text x="{_n(middle)}" y="{below}" text-anchor="end" font-size="9" '
                               f'transform="rotate(-45 {_n(middle)} {below})">{escape(label[:28])}</text>')
        else:
            frame.parts.append(f'<text x="{_n(middle)}" y="{below + 12}" text-anchor="middle" '
                               f'font-size="9">{escape(label[:18])}</text>')
    frame.legend([(c, COLORS[j % len(COLORS)]) for j, c in enumerate(categories)]
                 + ([("estimate (tick)", "#000")] if markers else [])
                 + ([("pale: estimated", "#bbb")] if beside else []))
    return frame.done()


def stacked_area(title: str, xlabel: str, ylabel: str, bands: dict[str, list[float]],
                 marks: list[tuple[int, str]] | None = None) -> str:
    """Bands stacked over the sample index (each band's list one value a sample), the first
    at the bottom; `marks` put a dashed line and a label at a sample (where a phase starts)."""
    count = max((len(v) for v in bands.values()), default=0)
    tops = [sum(v[i] for v in bands.values() if i < len(v)) for i in range(count)]
    frame = _Frame(title, xlabel, ylabel, [0.0, float(max(count - 1, 1))], [0.0, *tops], y_from_zero=True)
    base = [0.0] * count
    entries = []
    for j, (name, values) in enumerate(bands.items()):
        color = COLORS[j % len(COLORS)]
        top = [base[i] + (values[i] if i < len(values) else 0.0) for i in range(count)]
        upper = " ".join(f"{_n(frame.px(i))},{_n(frame.py(top[i]))}" for i in range(count))
        lower = " ".join(f"{_n(frame.px(i))},{_n(frame.py(base[i]))}" for i in reversed(range(count)))
        frame.parts.append(f'<polygon points="{upper} {lower}" fill="{color}" fill-opacity="0.85" '
                           'stroke="none"/>')
        entries.append((name, color))
        base = top
    for i, label in marks or []:
        x = frame.px(i)
        frame.parts.append(f'<line x1="{_n(x)}" y1="{TOP}" x2="{_n(x)}" y2="{frame.h - frame.bottom}" '
                           f'stroke="#444" stroke-dasharray="3 3"/><text x="{_n(x + 3)}" y="{TOP + 10}" '
                           f'font-size="9">{escape(label[:16])}</text>')
    frame.legend(entries)
    return frame.done()
