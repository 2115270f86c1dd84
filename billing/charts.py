"""Geometry of the server-rendered SVG bar chart (no chart library, no external asset): the template
only draws the shapes computed here."""

from dataclasses import dataclass

from billing.selectors import DailyCredits

WIDTH = 720
HEIGHT = 240
LEFT = 48  # room for the y-axis labels
BOTTOM = 24  # room for the x-axis labels
TOP = 8


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class BarChart:
    width: int
    height: int
    plot_left: int
    plot_bottom: int
    plot_right: int
    y_label_x: int
    x_label_y: int
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    total: int
    peak: DailyCredits | None


def _nice_ceiling(value: int) -> int:
    """The smallest 1/2/5 × 10^n at or above `value`, so the axis reads in round numbers."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def bar_chart(points: list[DailyCredits]) -> BarChart:
    total = sum(p.credits for p in points)
    peak = max(points, key=lambda p: p.credits) if total else None
    top = _nice_ceiling(max((p.credits for p in points), default=0) or 1)
    plot_height = HEIGHT - BOTTOM - TOP
    plot_width = WIDTH - LEFT - 8
    slot = plot_width / max(len(points), 1)
    gap = min(2.0, slot * 0.2)
    bars = []
    for index, point in enumerate(points):
        height = plot_height * point.credits / top
        bars.append(
            Bar(
                x=round(LEFT + index * slot + gap / 2, 2),
                y=round(TOP + plot_height - height, 2),
                width=round(slot - gap, 2),
                height=round(height, 2),
                label=f"{point.day.isoformat()}: {point.credits} credits",
            )
        )
    y_ticks = [Tick(position=round(TOP + plot_height * (1 - f), 2), label=str(int(top * f))) for f in (0, 0.5, 1)]
    # First, middle and last day only: enough to read the period on a phone without overlapping labels.
    picks = sorted({0, len(points) // 2, len(points) - 1}) if points else []
    x_ticks = [Tick(position=round(LEFT + (i + 0.5) * slot, 2), label=points[i].day.strftime("%b %d")) for i in picks]
    return BarChart(
        width=WIDTH,
        height=HEIGHT,
        plot_left=LEFT,
        plot_bottom=TOP + plot_height,
        plot_right=WIDTH - 8,
        y_label_x=LEFT - 6,
        x_label_y=HEIGHT - 6,
        bars=bars,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        total=total,
        peak=peak,
    )
