"""The charts of report.html: what to plot (Series, Lines, Histogram, Bars: plain data) and `render_chart`, which
draws one with matplotlib (imported only here, only when a report is written) as an SVG fragment for the page:
deterministic, its ids prefixed with the chart's name, data-carrying artists tagged with gids."""
from __future__ import annotations

import html
import io
import re
from typing import NamedTuple

import numpy as np

COLORS = {"blue": "#2563eb", "orange": "#ea580c", "green": "#16a34a", "red": "#dc2626"}

# ---- charts: what to plot ------------------------------------------------------------------------------

class Series(NamedTuple):
    """One line of a line chart: its name (in the legend), its (x, y) points, its color, dashed or solid."""
    name: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False


class Lines(NamedTuple):
    """Panels stacked over one shared x axis, each (y label, [Series, ...])."""
    title: str
    panels: list[tuple[str, list[Series]]]
    x_label: str


class Histogram(NamedTuple):
    """Vertical bars over numeric bins (edges shown as percentages); marker: (x value, label), a dashed line."""
    title: str
    counts: list[int]
    edges: list[float]
    x_label: str
    y_label: str
    marker: tuple[float, str] | None = None


class Bars(NamedTuple):
    """Horizontal bars, one per (label, count) from the top, the count written at the bar's end."""
    title: str
    items: list[tuple[str, int]]
    x_label: str


# ---- charts: drawing them with matplotlib --------------------------------------------------------------
# Each drawn artist that carries data has a gid (series-<name>, legend-<panel>-<i>, bar-<i>, count-<i>,
# label-<i>, marker, marker-label, title, xlabel, ylabel-<panel>), which the SVG keeps as <g id="<chart>-<gid>">:
# the tests find the data by them.

FIG_WIDTH = 7.9  # inches, i.e. 569 pt: about 760 px on the page
TICK_STEPS = [1, 2, 2.5, 5, 10]
TICK_FORMAT = "{x:,.10g}"  # 1,000 and 1.5, not 1000.0 or 1.5e3
MPL_RC = {
    "svg.hashsalt": "specray-report",  # deterministic ids (and no date in the metadata: see _svg)
    "svg.fonttype": "none",  # texts stay <text> elements, not glyph outlines
    "path.simplify": False,  # every point of a series is drawn
    "axes.autolimit_mode": "round_numbers", "axes.xmargin": 0, "axes.ymargin": 0,  # axes end on a tick...
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],  # matplotlib measures texts in DejaVu Sans
    "font.size": 9, "figure.titlesize": 10.5, "figure.titleweight": "bold", "text.color": "#111827",
    "axes.edgecolor": "#9ca3af", "axes.labelcolor": "#374151", "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "axes.axisbelow": True, "grid.color": "#eef0f3",
    "xtick.color": "#6b7280", "ytick.color": "#6b7280", "lines.linewidth": 2, "legend.frameon": False,
}


def render_chart(chart_id: str, chart: Lines | Histogram | Bars) -> str:
    """One chart as an inline <svg id=chart_id>, drawn by matplotlib (imported only here: importing pipeline
    stays cheap) with no pyplot state, offline."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(MPL_RC):
        fig = Figure(layout="constrained")
        draw = {Lines: _draw_lines, Histogram: _draw_histogram, Bars: _draw_bars}[type(chart)]
        tips = draw(fig, chart)
        fig.suptitle(chart.title, gid="title")
        return _svg(fig, chart_id, chart.title, tips)


def _svg(fig, chart_id: str, title: str, tips: dict[str, str]) -> str:
    """The figure's SVG for an HTML page: ids prefixed with chart_id (unique in the page), a <title> (a tooltip)
    in the group of each gid in tips, no XML prolog, metadata or namespace URLs (inline SVG needs none)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = re.sub(r' xmlns(:xlink)?="[^"]*"', "", svg[svg.index("<svg"):], count=2)
    for gid, tip in tips.items():
        svg = svg.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{esc(tip)}</title>', 1)
    svg = re.sub(r"<[^<>]*>", lambda tag: re.sub(r'(\bid="|href="#|url\(#)', rf"\g<1>{chart_id}-", tag.group()), svg)
    return svg.replace("<svg ", f'<svg id="{chart_id}" class="chart" role="img" aria-label="{esc(title)}" ', 1)


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def _draw_lines(fig, chart: Lines) -> dict[str, str]:
    from matplotlib.ticker import MaxNLocator

    fig.set_size_inches(FIG_WIDTH, 0.9 + 1.9 * len(chart.panels))
    axes = fig.subplots(len(chart.panels), 1, sharex=True, squeeze=False)[:, 0]
    axes[-1].xaxis.set_major_locator(MaxNLocator(nbins=8, steps=TICK_STEPS))  # before any limits are computed
    axes[-1].xaxis.set_major_formatter(TICK_FORMAT)
    tips = {}
    for p, (ax, (y_label, series)) in enumerate(zip(axes, chart.panels)):
        for s in series:
            gid = "series-" + re.sub(r"[^a-z0-9]+", "-", s.name.lower()).strip("-")
            ax.plot(*zip(*s.points), color=s.color, linestyle="--" if s.dashed else "-", label=s.name, gid=gid,
                    clip_on=False)  # the axes end at the highest value: a line there is not cut in half
            tips[gid] = s.name
        whole = all(float(y).is_integer() for s in series for _, y in s.points)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, steps=TICK_STEPS, integer=whole))
        ax.yaxis.set_major_formatter(TICK_FORMAT)
        ax.set_ylim(0, None if any(y for s in series for _, y in s.points) else 1)
        ax.set_ylabel(y_label, gid=f"ylabel-{p}")
        for i, text in enumerate(ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1)).get_texts()):
            text.set_gid(f"legend-{p}-{i}")
    axes[-1].set_xlim(left=0)
    axes[-1].set_xlabel(chart.x_label, gid="xlabel")
    return tips


def _draw_histogram(fig, chart: Histogram) -> dict[str, str]:
    from matplotlib.ticker import MaxNLocator

    fig.set_size_inches(FIG_WIDTH, 3.3)
    ax = fig.subplots()
    edges, lo, hi = chart.edges, chart.edges[0], chart.edges[-1]
    bars = ax.bar(edges[:-1], chart.counts, width=np.diff(edges), align="edge", color=COLORS["blue"],
                  edgecolor="white", linewidth=1)
    counts = ax.bar_label(bars, labels=[f"{n:,}" if n else "" for n in chart.counts], padding=2)
    tips = {}
    for i, (bar, count, n, a, b) in enumerate(zip(bars, counts, chart.counts, edges, edges[1:])):
        bar.set_gid(f"bar-{i}")
        count.set_gid(f"count-{i}")
        tips[f"bar-{i}"] = f"{a:.0%} to {b:.0%}: {n:,} rows"
    ax.set_xticks(edges, [f"{e:.0%}" for e in edges])
    ax.set_xlim(lo, hi)
    ax.grid(axis="x", visible=False)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=TICK_STEPS, integer=True))
    ax.yaxis.set_major_formatter(TICK_FORMAT)
    ax.margins(y=0.1)  # ...except here: room for the counts over the bars
    if chart.marker is not None:
        x, label = min(max(chart.marker[0], lo), hi), chart.marker[1]
        ax.axvline(x, color="#111827", linewidth=1.5, linestyle=(0, (5, 4)), gid="marker")
        right = x > lo + 0.8 * (hi - lo)
        ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), xytext=(-6 if right else 6, -12),
                    textcoords="offset points", ha="right" if right else "left", gid="marker-label")
    ax.set_xlabel(chart.x_label, gid="xlabel")
    ax.set_ylabel(chart.y_label, gid="ylabel-0")
    return tips


def _draw_bars(fig, chart: Bars) -> dict[str, str]:
    from matplotlib.ticker import MaxNLocator

    fig.set_size_inches(FIG_WIDTH, 1.1 + 0.3 * len(chart.items))
    ax = fig.subplots()
    bars = ax.barh(range(len(chart.items)), [n for _, n in chart.items], height=0.65, color=COLORS["red"])
    ax.set_yticks(range(len(chart.items)), [k if len(k) <= 38 else k[:37] + "…" for k, _ in chart.items])
    ax.set_ylim(len(chart.items) - 0.5, -0.5)  # the first item on top
    counts = ax.bar_label(bars, labels=[f"{n:,}" for _, n in chart.items], padding=3)
    tips = {}
    for i, (bar, label, count, (name, n)) in enumerate(zip(bars, ax.get_yticklabels(), counts, chart.items)):
        bar.set_gid(f"bar-{i}")
        label.set_gid(f"label-{i}")
        count.set_gid(f"count-{i}")
        tips.update({f"bar-{i}": f"{name}: {n:,} rows", f"label-{i}": name})
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=TICK_STEPS, integer=True))
    ax.xaxis.set_major_formatter(TICK_FORMAT)
    ax.margins(x=0.08)  # ...except here: room for the counts after the bars
    ax.grid(axis="y", visible=False)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel(chart.x_label, gid="xlabel")
    return tips
