"""`python -m pipeline report OUTPUT_DIR`: a job's output directory as one self-contained report.html.

It reads OUTPUT_DIR/metrics.json and the part files (through fsspec, so s3:// works) and draws its
plots with matplotlib as inline SVG in the page (pipeline/charts.py; nothing fetched from the network):

- throughput over time: tokens/s and rows/s between the samples of metrics["timeline"];
- acceptance: a histogram of the output rows' accepted / drafted tokens, and the job's overall rate;
- the drafter learning (model.drafter_training only): acceptance over time, and the newest drafter version;
- drafters per target over time: metrics["pools"]["actors_over_time"] (disaggregated jobs only);
- errors by reason: metrics["errors_by_reason"].
"""
from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipeline.charts import COLORS, Bars, Histogram, Lines, Series, esc, render_chart
from pipeline.write import PART_PREFIX, PART_SUFFIX

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
svg.chart { display: block; max-width: 100%; height: auto; margin: 6px 0; }
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
        (esc(m.get("config_hash", "–")), "config hash"),
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
        where = f", in the tower from block {vt['tower_layer']}" if vt.get("tower_layer") is not None else ""
        visual = f"keep {keep:.0%}" + (f" ({vt.get('method')}{', merged' if vt.get('merge') else ''}{where})"
                                       if keep < 1 else "")
        rows += [("weights", weights), ("visual tokens", visual), ("self-speculation", c.get("self_speculation") or "no")]
        ev = c.get("evaluation")
        if ev and ev.get("rows"):
            rows.append(("vs uncompressed", f"{_pct(ev.get('token_agreement'))} token agreement, "
                                            f"{_pct(ev.get('exact_match_agreement'))} identical outputs "
                                            f"({ev['rows']} sampled rows)"))
    versions = m.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    body = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows if v is not None)
    return f'<table class="kv">{body}</table>'


def _throughput(m: dict) -> str:
    timeline = m.get("timeline") or []
    window = max(1.0, timeline[-1]["t"] / 60) if timeline else 1.0  # at most about 60 steps
    tokens, ok_rows, err_rows = (rates(timeline, key, window) for key in ("output_tokens", "rows", "errors"))
    if not tokens:
        return '<p class="note">no timeline in metrics.json: nothing to plot</p>'
    rows_series = [Series("rows/s", ok_rows, COLORS["green"])]
    if any(y for _, y in err_rows):
        rows_series.append(Series("error rows/s", err_rows, COLORS["red"]))
    chart = render_chart("throughput", Lines("Throughput over time",
                                             [("output tokens/s", [Series("tokens/s", tokens, COLORS["blue"])]),
                                              ("rows/s", rows_series)], "time since the job started (s)"))
    return chart + (f'<p class="caption">Average rates over windows of at least {window:.0f} s, from the job\'s '
                    f'running totals. Whole job: {m.get("tokens_per_s", 0.0):,.1f} tokens/s.</p>')


def _acceptance(m: dict, per_row: np.ndarray, drafted: int, accepted: int) -> str:
    if per_row.size == 0:
        return '<p class="note">no drafted tokens in the output: this job did not speculate</p>'
    counts, edges = np.histogram(per_row, bins=BINS, range=(0.0, 1.0))
    overall = m.get("acceptance_rate")
    label = "this run" if overall is not None else "output"
    overall = overall if overall is not None else accepted / drafted
    chart = render_chart("acceptance", Histogram("Acceptance per row", [int(c) for c in counts],
                                                 [float(e) for e in edges], "accepted / drafted tokens of a row",
                                                 "rows", (overall, f"{label} overall: {overall:.1%}")))
    return chart + (f'<p class="caption">{per_row.size:,} output rows with drafted tokens; mean per row '
                    f'{per_row.mean():.1%}. Dashed: all accepted / all drafted tokens ({label}: {overall:.1%}).</p>')


def acceptance_over_time(timeline: list[dict], window_s: float) -> list[tuple[float, float]]:
    """Accepted over drafted tokens in each window (as steps), from the cumulative counts."""
    drafted, accepted = rates(timeline, "drafted", window_s), rates(timeline, "accepted", window_s)
    return [(t, a / d if d else 0.0) for (t, d), (_, a) in zip(drafted, accepted)]


def _learning(m: dict) -> str:
    learned = m.get("drafter_training")
    if learned is None:
        return '<p class="note">the drafter did not learn during this job (model.drafter_training is off)</p>'
    timeline = [p for p in m.get("timeline") or [] if "drafter_version" in p]
    if len(timeline) < 2:
        return '<p class="note">too short a job to plot</p>'
    window = max(1.0, timeline[-1]["t"] / 30)
    chart = render_chart("learning", Lines("Acceptance as the drafter learns", [
        ("acceptance", [Series("accepted / drafted", acceptance_over_time(timeline, window), COLORS["blue"])]),
        ("drafter version", [Series("newest version in the output", steps(timeline, "drafter_version"),
                                    COLORS["orange"])])], "time since the job started (s)"))
    trainer = learned.get("trainer") or {}
    per_version = ", ".join(f'v{v["version"]}: {_pct(v["acceptance"])} over {v["rows"]:,} rows'
                            for v in learned.get("by_version") or [])
    events = "; ".join(trainer.get("events") or []) or "none"
    caption = (f'Acceptance over windows of at least {window:.0f} s. Trainer: {trainer.get("steps", "–")} steps, '
               f'{len(trainer.get("versions") or [])} versions published, saved to '
               f'{esc(trainer.get("saved_to") or "–")}; events: {esc(events)}. Per version: {esc(per_version)}.')
    return chart + f'<p class="caption">{caption}</p>'


def _pools(m: dict) -> str:
    pools = m.get("pools")
    if pools is None:
        return '<p class="note">co-located job: one drafter per target actor</p>'
    samples = pools.get("actors_over_time") or []
    if not samples:
        return '<p class="note">the pool manager recorded no actor counts (the job was shorter than its interval)</p>'
    ratio = Series("drafters/target", steps(samples, "drafters_per_target"), COLORS["orange"])
    actors = [Series("targets", steps(samples, "targets"), COLORS["blue"]),
              Series("drafters", steps(samples, "drafters"), COLORS["green"], dashed=True)]
    chart = render_chart("pools", Lines("Drafters per target over time",
                                        [("drafters per target", [ratio]), ("ready actors", actors)],
                                        "time since the pools started (s)"))
    plan = pools.get("plan") or {}
    caption = (f'Ready actors as the pool manager counted them at each control interval; policy '
               f'{esc(pools.get("policy", "–"))}; final plan {plan.get("targets", "–")} targets, '
               f'{plan.get("drafters", "–")} drafters, k={plan.get("k", "–")}; failovers {pools.get("failovers", 0)}.')
    return chart + f'<p class="caption">{caption}</p>'


def _errors(m: dict) -> str:
    reasons = m.get("errors_by_reason") or {}
    if not reasons:
        return '<p class="note">no errors</p>'
    items = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return render_chart("errors", Bars("Error rows by reason", items, "error rows")) + \
        '<p class="caption">Reason: the error text up to its first colon (this run\'s rows).</p>'


def render(m: dict, output_dir: str, per_row: np.ndarray, drafted: int, accepted: int) -> str:
    """The report page: a header (key figures, the job's settings), then the four plots."""
    sections = [("Throughput", _throughput(m)), ("Acceptance", _acceptance(m, per_row, drafted, accepted)),
                ("Drafter learning", _learning(m)), ("Drafters per target", _pools(m)), ("Errors", _errors(m))]
    body = "\n".join(f"<h2>{title}</h2>\n{content}" for title, content in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>specray report: {esc(output_dir)}</title>
<style>{CSS}</style></head>
<body>
<h1>specray job report</h1>
<div class="sub">{esc(output_dir)} · finished {esc(m.get("finished_at", "–"))}</div>
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
