"""The one-screen summary printed at the end of a job, with a few output rows."""
from __future__ import annotations

import fsspec
import pyarrow.parquet as pq

from pipeline.job import JobResult

SHOW_COLUMNS = ("key", "text", "answer", "error")


def sample_rows(output_path: str, n: int = 5) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(output_path)
    parts = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    rows: list[dict] = []
    for part in parts:
        with fs.open(part, "rb") as f:
            rows += pq.read_table(f).slice(0, n - len(rows)).to_pylist()
        if len(rows) >= n:
            break
    return rows


def summary(result: JobResult, n: int = 5) -> str:
    m = result.metrics
    lines = [
        f"output: {result.output_path}",
        f"shards: {len(result.shards_written)} written, {len(result.shards_skipped)} already done (skipped)"
        + (f", {len(result.shards_unreadable)} UNREADABLE (not written: "
           + "; ".join(f"{k}: {v}" for k, v in result.shards_unreadable.items()) + ")"
           if result.shards_unreadable else ""),
        f"rows:   {result.rows} this run ({result.errors} errors), {m.get('rows_in_output', 0)} in the output",
        f"tokens: {result.output_tokens} generated in {result.wall_s:.1f}s = {result.tokens_per_s:.1f} tokens/s",
    ]
    st = m.get("startup") or {}
    if st.get("first_row_s") is not None:
        parts = [f"{name} {st[key]:.1f}s" for name, key in (
            ("driver", "driver_s"), ("Ray", "ray_s"), ("actor start", "actor_start_s"), ("imports", "imports_s"),
            ("model load", "model_load_s"), ("waiting for rows", "wait_first_batch_s"), ("first batch", "first_batch_s"))
            if st.get(key) is not None]
        lines.append(f"start:  first row after {st['first_row_s']:.1f}s (" + ", ".join(parts) + ")")
    if m.get("decoder"):
        d = m["decoder"]
        lines.append(f"decoder: {d['kind']} ({d['reason']})" + (", parity-checked at load" if d["parity_check"] else ""))
    if m.get("acceptance_rate") is not None:
        lines.append(f"speculation: {m['accepted_tokens']}/{m['drafted_tokens']} drafted tokens accepted "
                     f"({m['acceptance_rate']:.1%})")
    ev = (m.get("compression") or {}).get("evaluation")
    if ev and ev.get("rows"):
        lines.append(f"compression: {ev['token_agreement']:.2%} token agreement, {ev['exact_match_agreement']:.1%} "
                     f"identical outputs vs the uncompressed target ({ev['rows']} sampled rows)")
    if m.get("errors_by_reason"):
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(m["errors_by_reason"].items())))
    rows = sample_rows(result.output_path, n)
    if rows:
        lines.append(f"first {len(rows)} rows:")
        for r in rows:
            shown = {k: r[k] for k in SHOW_COLUMNS if r.get(k) is not None}
            lines.append("  " + "  ".join(f"{k}={v!r}" for k, v in shown.items()))
    return "\n".join(lines)
