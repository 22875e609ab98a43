"""`python -m pipeline report OUTPUT_DIR`: a job's output directory as one self-contained report.html.

It reads OUTPUT_DIR/metrics.json and the part files (through fsspec, so s3:// works) and draws four
plots as inline SVG, made here without a plotting library or anything fetched from the network:

- throughput over time: tokens/s and rows/s between the samples of metrics["timeline"];
- acceptance: a histogram of the output rows' accepted / drafted tokens, and the job's overall rate;
- drafters per target over time: metrics["pools"]["actors_over_time"] (disaggregated jobs only);
- errors by reason: metrics["errors_by_reason"].
"""
from __future__ import annotations

import html
import json
import math

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipeline.write import PART_PREFIX, PART_SUFFIX

WIDTH = 760
COLORS = {"blue": "#2563eb", "orange": "#ea580c", "green": "#16a34a", "red": "#dc2626"}
BINS = 10  # acceptance histogram: 10 bins of 10% over [0, 1]


class ReportError(Exception):
    """The output directory cannot be reported on (missing, or no metrics.json)."""


# ---- reading -------------------------------------------------------------------------------------------

def load_metrics(output_dir: str) -> dict:
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ReportError(f"no such output directory: {output_dir}")
    path = f"{root}/metrics.json"
    if not fs.exists(path):
        raise ReportError(f"{output_dir} has no metrics.json (the job has not finished, or this is not its output)")
    with fs.open(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ReportError(f"{output_dir}/metrics.json is not valid JSON: {e}") from None


def row_acceptance(output_dir: str) -> tuple[np.ndarray, int, int]:
    """Per-row accepted / drafted tokens over the output rows with drafts; and the rows' total drafted, accepted."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    names = sorted(p for p in fs.ls(root, detail=False)
                   if p.rsplit("/", 1)[-1].startswith(PART_PREFIX) and p.endswith(PART_SUFFIX))
    drafted, accepted = [], []
    for name in names:
        with fs.open(name, "rb") as f:
            t = pq.read_table(f, columns=["num_drafted_tokens", "num_accepted_tokens"])
        drafted.append(t.column(0).to_numpy(zero_copy_only=False))
        accepted.append(t.column(1).to_numpy(zero_copy_only=False))
    d = np.nan_to_num(np.concatenate(drafted).astype(float)) if drafted else np.zeros(0)
    a = np.nan_to_num(np.concatenate(accepted).astype(float)) if accepted else np.zeros(0)
    has = d > 0
    return np.clip(a[has] / d[has], 0.0, 1.0), int(d.sum()), int(a.sum())


# ---- turning metrics into series ----------------------------------------------------------------------

def rates(timeline: list[dict], key: str, window_s: float = 0.0) -> list[tuple[float, float]]:
    """The per-second rate of a cumulative count, as steps: its average held over each interval between samples,
    samples skipped so that an interval spans at least window_s (the last sample is always used)."""
    samples = list(timeline)
    if samples and samples[0]["t"] > 0:
        samples.insert(0, {"t": 0.0, key: 0})  # the job starts from nothing
    points, a = [], samples[0] if samples else None
    for i, b in enumerate(samples[1:], 1):
        dt = b["t"] - a["t"]
        if dt > 0 and (dt >= window_s or i == len(samples) - 1):
            r = (b[key] - a[key]) / dt
            points += [(a["t"], r), (b["t"], r)]
            a = b
    return points


def steps(samples: list[dict], key: str) -> list[tuple[float, float]]:
    """A sampled value held until the next sample (samples without a value are skipped)."""
    kept = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
    points = []
    for (t, v), (t_next, _) in zip(kept, kept[1:] + [(None, None)]):
        points.append((t, v))
        if t_next is not None:
            points.append((t_next, v))
    return points


# ---- SVG charts ---------------------------------------------------------------------------------------

def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def _num(v: float) -> str:
    if v == int(v):
        return f"{int(v):,}"
    return f"{v:,.2f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:,.1f}"


def _ticks(values: list[float], n: int = 5) -> list[float]:
    """Round tick values from 0 to at least max(values); whole numbers only if the values are all whole."""
    hi = max(values, default=0) or 1.0
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    whole = all(float(v).is_integer() for v in values)
    step = next(m * mag for m in ((1, 2, 5, 10) if whole else (1, 2, 2.5, 5, 10)) if m * mag >= raw)
    if whole:
        step = max(step, 1)
    return [i * step for i in range(int(math.ceil(hi / step - 1e-9)) + 1)]


def _svg_open(chart_id: str, title: str, height: int) -> list[str]:
    return [f'<svg id="{_esc(chart_id)}" class="chart" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
            f'height="{height}" role="img" aria-label="{_esc(title)}">',
            f'<text class="title" x="{WIDTH / 2}" y="20" text-anchor="middle">{_esc(title)}</text>']


def svg_line_chart(chart_id: str, title: str, panels: list[tuple[str, list[tuple[str, list, str, bool]]]],
                   x_label: str) -> str:
    """Panels stacked over one shared x axis; each panel is (y label, [(series name, [(x, y), ...], color, dashed)])."""
    left, right, top, gap, bottom, ph = 70, 150, 34, 24, 46, 150
    height = top + len(panels) * ph + (len(panels) - 1) * gap + bottom
    plot_w = WIDTH - left - right
    x_ticks = _ticks([x for _, series in panels for _, pts, _, _ in series for x, _ in pts], 8)
    x_max = x_ticks[-1]
    sx = lambda x: left + plot_w * x / x_max  # noqa: E731
    out = _svg_open(chart_id, title, height)
    for p, (y_label, series) in enumerate(panels):
        y0 = top + p * (ph + gap)
        y_ticks = _ticks([y for _, pts, _, _ in series for _, y in pts], 4)
        sy = lambda y: y0 + ph - ph * y / y_ticks[-1]  # noqa: E731
        for v in y_ticks:
            out.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{sy(v):.1f}" y2="{sy(v):.1f}"/>')
            out.append(f'<text class="tick" x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{_num(v)}</text>')
        for v in x_ticks:
            out.append(f'<line class="grid" x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{y0}" y2="{y0 + ph}"/>')
        out.append(f'<rect class="frame" x="{left}" y="{y0}" width="{plot_w}" height="{ph}"/>')
        out.append(f'<text class="axis" transform="translate(16 {y0 + ph / 2}) rotate(-90)" '
                   f'text-anchor="middle">{_esc(y_label)}</text>')
        for i, (name, pts, color, dashed) in enumerate(series):
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            dash = ' stroke-dasharray="7 4"' if dashed else ""
            out.append(f'<polyline class="series" points="{coords}" stroke="{color}"{dash}>'
                       f'<title>{_esc(name)}</title></polyline>')
            ly = y0 + 14 + 18 * i
            out.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 32}" y1="{ly}" y2="{ly}" '
                       f'stroke="{color}" stroke-width="2.5"{dash}/>')
            out.append(f'<text class="legend" x="{left + plot_w + 38}" y="{ly + 4}">{_esc(name)}</text>')
    y_axis = top + len(panels) * ph + (len(panels) - 1) * gap
    for v in x_ticks:
        out.append(f'<text class="tick" x="{sx(v):.1f}" y="{y_axis + 16}" text-anchor="middle">{_num(v)}</text>')
    out.append(f'<text class="axis" x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">{_esc(x_label)}</text>')
    return "\n".join(out + ["</svg>"])


def svg_histogram(chart_id: str, title: str, counts: list[int], edges: list[float], x_label: str, y_label: str,
                  marker: tuple[float, str] | None = None) -> str:
    """Vertical bars over numeric bins (edges shown as percentages); marker: (x value, label), a dashed line."""
    left, right, top, bottom, ph = 70, 30, 34, 46, 220
    height = top + ph + bottom
    plot_w = WIDTH - left - right
    y_ticks = _ticks(counts, 5)
    lo, hi = edges[0], edges[-1]
    sx = lambda x: left + plot_w * (x - lo) / (hi - lo)  # noqa: E731
    sy = lambda y: top + ph - ph * y / y_ticks[-1]  # noqa: E731
    out = _svg_open(chart_id, title, height)
    for v in y_ticks:
        out.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{sy(v):.1f}" y2="{sy(v):.1f}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{_num(v)}</text>')
    for n, a, b in zip(counts, edges, edges[1:]):
        x, w = sx(a) + 1, sx(b) - sx(a) - 2
        out.append(f'<rect class="bar" x="{x:.1f}" y="{sy(n):.1f}" width="{w:.1f}" height="{top + ph - sy(n):.1f}">'
                   f'<title>{a:.0%} to {b:.0%}: {n:,} rows</title></rect>')
        if n:
            out.append(f'<text class="value" x="{x + w / 2:.1f}" y="{sy(n) - 4:.1f}" text-anchor="middle">{n:,}</text>')
    for e in edges:
        out.append(f'<text class="tick" x="{sx(e):.1f}" y="{top + ph + 16}" text-anchor="middle">{e:.0%}</text>')
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{plot_w}" height="{ph}"/>')
    if marker is not None:
        mx = sx(min(max(marker[0], lo), hi))
        out.append(f'<line class="marker" x1="{mx:.1f}" x2="{mx:.1f}" y1="{top}" y2="{top + ph}"/>')
        anchor = "end" if mx > left + plot_w * 0.8 else "start"
        out.append(f'<text class="marker-label" x="{mx + (-6 if anchor == "end" else 6):.1f}" y="{top + 14}" '
                   f'text-anchor="{anchor}">{_esc(marker[1])}</text>')
    out.append(f'<text class="axis" transform="translate(16 {top + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{_esc(y_label)}</text>')
    out.append(f'<text class="axis" x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">{_esc(x_label)}</text>')
    return "\n".join(out + ["</svg>"])


def svg_hbar_chart(chart_id: str, title: str, items: list[tuple[str, int]], x_label: str) -> str:
    """Horizontal bars, one per (label, count), the count written at the bar's end."""
    label_w = min(280, 20 + 7 * max((len(k) for k, _ in items), default=10))
    left, right, top, bottom, bar_h = label_w, 60, 34, 40, 26
    height = top + bar_h * len(items) + bottom
    plot_w = WIDTH - left - right
    x_ticks = _ticks([v for _, v in items], 5)
    sx = lambda x: left + plot_w * x / x_ticks[-1]  # noqa: E731
    out = _svg_open(chart_id, title, height)
    bottom_y = top + bar_h * len(items)
    for v in x_ticks:
        out.append(f'<line class="grid" x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{top}" y2="{bottom_y}"/>')
        out.append(f'<text class="tick" x="{sx(v):.1f}" y="{bottom_y + 16}" text-anchor="middle">{_num(v)}</text>')
    for i, (label, n) in enumerate(items):
        y = top + i * bar_h
        shown = label if len(label) <= 38 else label[:37] + "…"
        out.append(f'<text class="label" x="{left - 8}" y="{y + bar_h / 2 + 4}" text-anchor="end">{_esc(shown)}'
                   f'<title>{_esc(label)}</title></text>')
        out.append(f'<rect class="bar error" x="{left}" y="{y + 4}" width="{sx(n) - left:.1f}" height="{bar_h - 8}">'
                   f'<title>{_esc(label)}: {n:,} rows</title></rect>')
        out.append(f'<text class="value" x="{sx(n) + 6:.1f}" y="{y + bar_h / 2 + 4}">{n:,}</text>')
    out.append(f'<line class="axisline" x1="{left}" x2="{left}" y1="{top}" y2="{bottom_y}"/>')
    out.append(f'<text class="axis" x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">{_esc(x_label)}</text>')
    return "\n".join(out + ["</svg>"])


# ---- the page -----------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #111827;
       max-width: 820px; margin: 24px auto; padding: 0 16px; line-height: 1.45; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin: 28px 0 4px; }
.sub, .caption, .note { color: #4b5563; font-size: 13px; }
.note { font-style: italic; padding: 10px 0; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 10px; margin: 16px 0; }
.card { border: 1px solid #e5e7eb; border-radius: 6px; padding: 8px 10px; }
.card .v { font-size: 20px; font-weight: 600; } .card .k { font-size: 12px; color: #6b7280; }
table.kv { border-collapse: collapse; font-size: 13px; } table.kv td { padding: 2px 14px 2px 0; vertical-align: top; }
table.kv td:first-child { color: #6b7280; }
svg.chart { font-size: 12px; display: block; margin: 6px 0; }
svg .title { font-size: 14px; font-weight: 600; } svg .tick { fill: #6b7280; font-size: 11px; }
svg .axis { fill: #374151; } svg .legend, svg .label { fill: #374151; } svg .value { fill: #111827; font-size: 11px; }
svg .grid { stroke: #eef0f3; } svg .frame { fill: none; stroke: #d1d5db; } svg .axisline { stroke: #9ca3af; }
svg .series { fill: none; stroke-width: 2; stroke-linejoin: round; }
svg .bar { fill: #2563eb; } svg .bar.error { fill: #dc2626; }
svg .marker { stroke: #111827; stroke-width: 1.5; stroke-dasharray: 5 4; } svg .marker-label { fill: #111827; }
"""


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def _cards(m: dict) -> str:
    rows, errors = m.get("rows", 0), m.get("errors", 0)
    figures = [
        (f"{rows:,}", "rows this run"),
        (f"{errors:,}" + (f" ({errors / rows:.1%})" if rows else ""), "error rows"),
        (f"{m.get('output_tokens', 0):,}", "output tokens"),
        (f"{m.get('tokens_per_s', 0.0):,.1f}", "tokens/s (whole job)"),
        (_duration(m.get("wall_s", 0.0)), "wall time"),
        (_pct(m.get("acceptance_rate")), "acceptance (accepted / drafted)"),
        (f"{len(m.get('shards_written') or [])} / {len(m.get('shards_skipped') or [])}", "shards written / skipped"),
        (_esc(m.get("config_hash", "–")), "config hash"),
    ]
    return '<div class="cards">' + "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>'
                                           for v, k in figures) + "</div>"


def _details(m: dict, output_dir: str) -> str:
    cfg = m.get("config") or {}
    model, res = cfg.get("model") or {}, cfg.get("resources") or {}
    rows = [("output", output_dir), ("finished at", m.get("finished_at")),
            ("target", model.get("target")), ("drafter", model.get("drafter")),
            ("resources", res.get("mode")), ("rows in output", m.get("rows_in_output"))]
    c = m.get("compression")
    if c:
        weights = str(c.get("weights"))
        if c.get("group_size"):
            weights += f" (group size {c['group_size']})"
        if weights != "none" and c.get("apply_to"):
            weights += f", applied to {c['apply_to']}"
        vt = c.get("visual_tokens") or {}
        keep = vt.get("keep", 1.0)
        visual = f"keep {keep:.0%}" + (f" ({vt.get('method')}{', merged' if vt.get('merge') else ''})" if keep < 1 else "")
        rows += [("weights", weights), ("visual tokens", visual), ("self-speculation", c.get("self_speculation") or "no")]
        ev = c.get("evaluation")
        if ev and ev.get("rows"):
            rows.append(("vs uncompressed", f"{_pct(ev.get('token_agreement'))} token agreement, "
                                            f"{_pct(ev.get('exact_match_agreement'))} identical outputs "
                                            f"({ev['rows']} sampled rows)"))
    versions = m.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    body = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows if v is not None)
    return f'<table class="kv">{body}</table>'


def _throughput(m: dict) -> str:
    timeline = m.get("timeline") or []
    window = max(1.0, timeline[-1]["t"] / 60) if timeline else 1.0  # at most about 60 steps
    tokens, ok_rows, err_rows = (rates(timeline, key, window) for key in ("output_tokens", "rows", "errors"))
    if not tokens:
        return '<p class="note">no timeline in metrics.json: nothing to plot</p>'
    rows_series = [("rows/s", ok_rows, COLORS["green"], False)]
    if any(y for _, y in err_rows):
        rows_series.append(("error rows/s", err_rows, COLORS["red"], False))
    chart = svg_line_chart("throughput", "Throughput over time",
                           [("output tokens/s", [("tokens/s", tokens, COLORS["blue"], False)]),
                            ("rows/s", rows_series)], "time since the job started (s)")
    return chart + (f'<p class="caption">Average rates over windows of at least {window:.0f} s, from the job\'s '
                    f'running totals. Whole job: {m.get("tokens_per_s", 0.0):,.1f} tokens/s.</p>')


def _acceptance(m: dict, per_row: np.ndarray, drafted: int, accepted: int) -> str:
    if per_row.size == 0:
        return '<p class="note">no drafted tokens in the output: this job did not speculate</p>'
    counts, edges = np.histogram(per_row, bins=BINS, range=(0.0, 1.0))
    overall = m.get("acceptance_rate")
    label = "this run" if overall is not None else "output"
    overall = overall if overall is not None else accepted / drafted
    chart = svg_histogram("acceptance", "Acceptance per row", [int(c) for c in counts], [float(e) for e in edges],
                          "accepted / drafted tokens of a row", "rows", (overall, f"{label} overall: {overall:.1%}"))
    return chart + (f'<p class="caption">{per_row.size:,} output rows with drafted tokens; mean per row '
                    f'{per_row.mean():.1%}. Dashed: all accepted / all drafted tokens ({label}: {overall:.1%}).</p>')


def _pools(m: dict) -> str:
    pools = m.get("pools")
    if pools is None:
        return '<p class="note">co-located job: one drafter per target actor</p>'
    samples = pools.get("actors_over_time") or []
    if not samples:
        return '<p class="note">the pool manager recorded no actor counts (the job was shorter than its interval)</p>'
    chart = svg_line_chart("pools", "Drafters per target over time",
                           [("drafters per target", [("drafters/target", steps(samples, "drafters_per_target"),
                                                      COLORS["orange"], False)]),
                            ("ready actors", [("targets", steps(samples, "targets"), COLORS["blue"], False),
                                              ("drafters", steps(samples, "drafters"), COLORS["green"], True)])],
                           "time since the pools started (s)")
    plan = pools.get("plan") or {}
    caption = (f'Ready actors as the pool manager counted them at each control interval; policy '
               f'{_esc(pools.get("policy", "–"))}; final plan {plan.get("targets", "–")} targets, '
               f'{plan.get("drafters", "–")} drafters, k={plan.get("k", "–")}; failovers {pools.get("failovers", 0)}.')
    return chart + f'<p class="caption">{caption}</p>'


def _errors(m: dict) -> str:
    reasons = m.get("errors_by_reason") or {}
    if not reasons:
        return '<p class="note">no errors</p>'
    items = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return svg_hbar_chart("errors", "Error rows by reason", items, "error rows") + \
        '<p class="caption">Reason: the error text up to its first colon (this run\'s rows).</p>'


def render(m: dict, output_dir: str, per_row: np.ndarray, drafted: int, accepted: int) -> str:
    """The report page: a header (key figures, the job's settings), then the four plots."""
    sections = [("Throughput", _throughput(m)), ("Acceptance", _acceptance(m, per_row, drafted, accepted)),
                ("Drafters per target", _pools(m)), ("Errors", _errors(m))]
    body = "\n".join(f"<h2>{title}</h2>\n{content}" for title, content in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>specray report: {_esc(output_dir)}</title>
<style>{CSS}</style></head>
<body>
<h1>specray job report</h1>
<div class="sub">{_esc(output_dir)} · finished {_esc(m.get("finished_at", "–"))}</div>
{_cards(m)}
{_details(m, output_dir)}
{body}
</body></html>
"""


def write_report(output_dir: str, out: str | None = None) -> str:
    """Write the report (default OUTPUT_DIR/report.html); returns where it went."""
    m = load_metrics(output_dir)
    per_row, drafted, accepted = row_acceptance(output_dir)
    out = out or f"{output_dir.rstrip('/')}/report.html"
    with fsspec.open(out, "w", encoding="utf-8") as f:
        f.write(render(m, output_dir, per_row, drafted, accepted))
    return out
