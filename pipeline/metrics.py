"""A job's metrics: running totals over its output rows (Tally), and metrics.json built from them."""
from __future__ import annotations

import platform
import time
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig, dump


class Tally:
    """Running totals over output rows, for metrics.json."""

    def __init__(self):
        self.rows = self.errors = self.prompt_tokens = self.output_tokens = 0
        self.drafted = self.accepted = 0
        self.generate_s = 0.0
        self.reasons: dict[str, int] = {}
        self.finish: dict[str, int] = {}
        self.eval_rows = self.eval_tokens = self.eval_agreed = self.eval_exact = 0
        self.start = time.time()
        self.first_row: float | None = None  # when the first result row reached the driver
        self.commits: list[dict] = []  # {shard, t (s since the job began), rows}: when each shard was committed
        self.timeline: list[dict] = []  # cumulative counts, sampled at most once a second (report.html's plots)
        self.versions: dict[int, dict] = {}  # model.drafter_training: per drafter version, its rows' counts

    def sample(self, final: bool = False) -> None:
        t = time.time() - self.start
        if final or not self.timeline or t - self.timeline[-1]["t"] >= 1.0:
            self.timeline.append({"t": round(t, 2), "rows": self.rows, "errors": self.errors,
                                  "output_tokens": self.output_tokens, "drafted": self.drafted,
                                  "accepted": self.accepted, "drafter_version": max(self.versions, default=None)})

    def add_evaluation(self, batch: pa.Table) -> None:
        tokens = batch.column("eval_tokens")
        if tokens.null_count < len(tokens):
            self.eval_rows += len(tokens) - tokens.null_count
            self.eval_tokens += _sum(tokens)
            self.eval_agreed += _sum(batch.column("eval_agreed"))
            self.eval_exact += _sum(batch.column("eval_exact").cast(pa.int64()))

    def compression(self, cfg: JobConfig) -> dict:
        """metrics.json's compression: the settings, and with compression.evaluate the measured agreement."""
        c = cfg.compression
        out = {"weights": c.weights, "group_size": c.group_size if c.weights == "int4" else None,
               "apply_to": c.apply_to, "visual_tokens": c.visual_tokens.model_dump(),
               "self_speculation": cfg.model.drafter if (cfg.model.drafter or "").startswith("self-") else None,
               "evaluation": None}
        if c.evaluate:
            out["evaluation"] = {
                "sample_fraction": c.evaluate_fraction, "rows": self.eval_rows,
                "token_agreement": self.eval_agreed / self.eval_tokens if self.eval_tokens else None,
                "exact_match_agreement": self.eval_exact / self.eval_rows if self.eval_rows else None,
                "reference": "the uncompressed target, greedy, plain decoding; token agreement is teacher-forced"}
        return out

    def add(self, batch: pa.Table) -> None:
        """Count a batch of result rows (actors/row_schemas.py's RESULT)."""
        if self.first_row is None and batch.num_rows:
            self.first_row = time.time()
        self.rows += batch.num_rows
        self.prompt_tokens += _sum(batch.column("num_prompt_tokens"))
        self.output_tokens += _sum(batch.column("num_output_tokens"))
        self.drafted += _sum(batch.column("num_drafted_tokens"))
        self.accepted += _sum(batch.column("num_accepted_tokens"))
        self.generate_s += _sum(batch.column("generate_s"))
        for value in pc.value_counts(batch.column("finish_reason")).to_pylist():
            self.finish[value["values"]] = self.finish.get(value["values"], 0) + value["counts"]
        errors = batch.column("error")
        if errors.null_count < len(errors):
            for error in pc.drop_null(errors).to_pylist():
                self.errors += 1
                reason = error.split(":", 1)[0]
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.add_evaluation(batch)
        self.add_versions(batch)

    def add_versions(self, batch: pa.Table) -> None:
        versions = batch.column("drafter_version")
        if versions.null_count == len(versions):
            return
        t = round(time.time() - self.start, 2)
        columns = {c: batch.column(c).to_pylist() for c in ("num_output_tokens", "num_drafted_tokens",
                                                            "num_accepted_tokens")}
        for i, v in enumerate(versions.to_pylist()):
            if v is None:
                continue
            d = self.versions.setdefault(v, {"version": v, "rows": 0, "output_tokens": 0, "drafted": 0,
                                             "accepted": 0, "first_t": t})
            d["rows"] += 1
            d["output_tokens"] += columns["num_output_tokens"][i] or 0
            d["drafted"] += columns["num_drafted_tokens"][i] or 0
            d["accepted"] += columns["num_accepted_tokens"][i] or 0
            d["last_t"] = t

    def drafter_training(self, report: dict | None) -> dict:
        """metrics.json's drafter_training: acceptance per drafter version (rows drafted with it) and the
        trainer's own record (steps, versions with their loss, events such as a lost trainer, where it saved)."""
        by_version = [dict(d, acceptance=d["accepted"] / d["drafted"] if d["drafted"] else None)
                      for _, d in sorted(self.versions.items())]
        return {"by_version": by_version, "trainer": report}


def _sum(column: pa.ChunkedArray) -> int | float:
    return pc.sum(column).as_py() or 0


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("specray", "ray", "torch", "transformers", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def job_metrics(cfg: JobConfig, tally: Tally, *, wall: float, startup: dict, any_order: bool, pool_report: dict | None,
                decoder: dict, trainer_report: dict | None, written: list[str], skipped: list[str],
                bad: dict[str, str], rows_in_output: int) -> dict:
    """metrics.json: the tally's totals, the run's record (start-up, commits, pools, decoder) and its config."""
    return {
        "rows": tally.rows,
        "errors": tally.errors,
        "errors_by_reason": tally.reasons,
        "finish_reasons": tally.finish,
        "prompt_tokens": tally.prompt_tokens,
        "output_tokens": tally.output_tokens,
        "drafted_tokens": tally.drafted,
        "accepted_tokens": tally.accepted,
        "acceptance_rate": tally.accepted / tally.drafted if tally.drafted else None,
        "wall_s": wall,
        "tokens_per_s": tally.output_tokens / wall if wall > 0 else 0.0,
        "stage_s": {"generate_actor_busy": tally.generate_s},
        # seconds: Ray, actor start, imports, model load, first batch; first output row; compiled steps (seconds, buckets)
        "startup": startup,
        "commit_order": "any" if any_order else "input",  # any: each shard committed once all its rows are out
        "commits": tally.commits,  # [{shard, t (s since the job began), rows}], in commit order
        "timeline": tally.timeline,  # [{t (s since the job began), cumulative rows, errors, output_tokens, drafted, accepted}]
        "pools": pool_report,  # disaggregated mode: the controller's decisions and the actors over time
        "decoder": decoder,  # lean | fallback (engine/support.py), and why; parity-checked at each engine's load
        "compression": tally.compression(cfg),
        "drafter_training": tally.drafter_training(trainer_report) if cfg.model.drafter_training.enabled else None,
        "shards_written": written,
        "shards_skipped": skipped,
        "shards_unreadable": bad,
        "rows_in_output": rows_in_output,
        "config": dump(cfg),
        "config_hash": cfg.hash(),
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
