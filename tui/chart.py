"""A line chart in braille dots: each terminal cell holds a 2×4 grid of dots.

A cell (col, row) of the plot covers dots x ∈ {2·col, 2·col+1}, y ∈ {4·row … 4·row+3};
dot (dx, dy) of a cell is bit `_DOT_BITS[dy][dx]` of the character U+2800 + bits.
Series are drawn in order, so a later one (eval loss) shows on top of an earlier one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from rich.text import Text
from textual.widget import Widget

from .describe import fmt_number

_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))


@dataclass
class Series:
    name: str
    points: Sequence[tuple[float, float]]        # (x, y), sorted by x
    marker: bool = False                         # also draw a 2×2 dot blob at each point


def _line(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """The dots of a straight segment (Bresenham)."""
    dots = []
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        dots.append((x0, y0))
        if x0 == x1 and y0 == y1:
            return dots
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def _thin(points: Sequence[tuple[float, float]], x_lo: float, x_hi: float,
          columns: int) -> Sequence[tuple[float, float]]:
    """At most the first, lowest, highest and last point of each dot column, in order: the same
    dots as every point, without drawing 50,000 segments into 200 columns. A non-finite point
    is kept where it falls, so the line still breaks there."""
    if len(points) <= 4 * columns:
        return points
    out: list[tuple[float, float]] = []
    column: list[tuple[float, float]] = []
    current = None

    def flush() -> None:
        if column:
            keep = {0, len(column) - 1,
                    min(range(len(column)), key=lambda i: column[i][1]),
                    max(range(len(column)), key=lambda i: column[i][1])}
            out.extend(column[i] for i in sorted(keep))
            column.clear()

    for x, y in points:
        if not math.isfinite(y):
            flush()
            out.append((x, y))
            continue
        key = round((x - x_lo) / ((x_hi - x_lo) or 1) * (columns - 1))
        if key != current:
            flush()
            current = key
        column.append((x, y))
    flush()
    return out


class LineChart(Widget):
    """Series over steps, with the y range on the left and the step range below."""

    COMPONENT_CLASSES = {"chart--axis", "chart--series-0", "chart--series-1", "chart--empty"}

    def __init__(self, empty_text: str = "no data yet", *,
                 y_format: Callable[[float], str] = lambda y: fmt_number(y, 3), **kwargs):
        super().__init__(**kwargs)
        self.series: list[Series] = []
        self.empty_text = empty_text
        self.y_format = y_format

    def set_series(self, series: list[Series]) -> None:
        self.series = series
        self.refresh()

    @property
    def point_count(self) -> int:
        return sum(len(s.points) for s in self.series)

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        # A diverged run logs nan or inf: those points are left out and break the line.
        points = [p for s in self.series for p in s.points if math.isfinite(p[1])]
        if not points or width < 8 or height < 2:
            return Text(self.empty_text, style=self.get_component_rich_style("chart--empty"),
                        justify="center", no_wrap=True, overflow="ellipsis")

        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        x_lo, x_hi = min(xs), max(xs)
        x_last = x_hi                          # the axis names the real last step
        y_lo, y_hi = min(ys), max(ys)
        if y_hi == y_lo:
            pad = abs(y_lo) * 0.05 or 1.0
            y_lo, y_hi = y_lo - pad, y_hi + pad
        if x_hi == x_lo:
            x_hi = x_lo + 1

        plot_h = height - 1                    # the last row holds the step range
        labels = {0: self.y_format(y_hi), plot_h - 1: self.y_format(y_lo)}
        if plot_h >= 5:
            labels[(plot_h - 1) // 2] = self.y_format((y_hi + y_lo) / 2)
        label_w = max(len(v) for v in labels.values()) + 1
        plot_w = max(width - label_w, 1)
        dots_w, dots_h = 2 * plot_w, 4 * plot_h

        def to_dot(x: float, y: float) -> tuple[int, int]:
            dx = round((x - x_lo) / (x_hi - x_lo) * (dots_w - 1))
            dy = round((y_hi - y) / (y_hi - y_lo) * (dots_h - 1))
            return dx, dy

        cells = [[0] * plot_w for _ in range(plot_h)]
        owner = [[-1] * plot_w for _ in range(plot_h)]
        for index, s in enumerate(self.series):
            dots: list[tuple[int, int]] = []
            previous = None
            for x, y in _thin(s.points, x_lo, x_hi, dots_w):
                if not math.isfinite(y):
                    previous = None
                    continue
                current = to_dot(x, y)
                dots.extend(_line(*previous, *current) if previous else [current])
                if s.marker:
                    dots.extend((current[0] + i, current[1] + j) for i in (-1, 0) for j in (-1, 0))
                previous = current
            for dx, dy in dots:
                if 0 <= dx < dots_w and 0 <= dy < dots_h:
                    col, row = dx // 2, dy // 4
                    cells[row][col] |= _DOT_BITS[dy % 4][dx % 2]
                    owner[row][col] = index

        axis = self.get_component_rich_style("chart--axis")
        styles = [self.get_component_rich_style(f"chart--series-{min(i, 1)}") for i in range(len(self.series))]
        text = Text(no_wrap=True, overflow="crop")
        for row in range(plot_h):
            text.append(labels.get(row, "").rjust(label_w - 1) + "┤" if row in labels
                        else " " * (label_w - 1) + "│", axis)
            for col in range(plot_w):
                bits = cells[row][col]
                if bits:
                    text.append(chr(0x2800 + bits), styles[owner[row][col]])
                else:
                    text.append(" ")
            text.append("\n")
        left, right = f"{x_lo:g}", f"step {x_last:g}"
        gap = max(plot_w - len(left) - len(right), 1)
        text.append(" " * (label_w - 1) + "└" + left + " " * gap + right, axis)
        return text
