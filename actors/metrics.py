"""Prometheus metrics of a running job, through ray.util.metrics.

Ray exports them on each node's metrics export port (`ray.nodes()[i]["MetricsExportPort"]`, path /metrics),
with a `ray_` prefix, so `specray_rows_total` is scraped as `ray_specray_rows_total`, one series per worker
(label WorkerId); sum over workers for the job's totals. Export needs `ray[default]` (the dashboard agent
runs the metrics agent, also under `include_dashboard=False`); with a minimal Ray nothing is exported.

    specray_rows_total{status="ok"|"error"}   counter  output rows (generate stage)
    specray_output_tokens_total               counter  generated tokens
    specray_drafted_tokens_total              counter  tokens proposed by the drafter
    specray_accepted_tokens_total             counter  drafted tokens the target accepted
    specray_acceptance_rate                   gauge    accepted / drafted over the last batch with drafts
    specray_target_actors                     gauge    ready target actors (disaggregated pools)
    specray_drafter_actors                    gauge    ready drafter actors (disaggregated pools)
    specray_queue_depth                       gauge    batches waiting for a target (disaggregated pools)

Ray keeps a gauge in the export for 2 report intervals (RAY_metrics_report_interval_ms, 10 s by default)
after its last set(): the pool gauges are set every control interval, the acceptance gauge once per batch
(so it lapses between batches slower than 20 s); counters stay.

The metric objects are made once per process, on first use, and only in a process connected to Ray
(ray.util.metrics needs a Ray worker): elsewhere, e.g. an engine in a unit test, recording does nothing.
Recording never raises: a metric must not cost a batch.
"""
from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)

_METRICS: dict | None = None  # name -> ray.util.metrics object, made by _metrics()
_LOCK = threading.Lock()


def _create() -> dict:
    from ray.util.metrics import Counter, Gauge

    return {
        "rows": Counter("specray_rows_total", description="Output rows of the generate stage.",
                        tag_keys=("status",)),
        "output_tokens": Counter("specray_output_tokens_total", description="Generated tokens."),
        "drafted": Counter("specray_drafted_tokens_total", description="Tokens proposed by the drafter."),
        "accepted": Counter("specray_accepted_tokens_total",
                            description="Drafted tokens accepted by the target."),
        "acceptance": Gauge("specray_acceptance_rate",
                            description="Accepted / drafted tokens over the last batch that had drafts."),
        "targets": Gauge("specray_target_actors", description="Ready target actors in the pool."),
        "drafters": Gauge("specray_drafter_actors", description="Ready drafter actors in the pool."),
        "queue": Gauge("specray_queue_depth", description="Batches waiting for a target actor."),
    }


def _metrics() -> dict | None:
    """This process's metric objects, or None outside Ray."""
    global _METRICS
    if _METRICS is None:
        import ray

        if not ray.is_initialized():
            return None
        with _LOCK:
            if _METRICS is None:
                _METRICS = _create()
    return _METRICS


def record_batch(rows: list[dict]) -> None:
    """Count a generate batch's output rows (keys: error, num_output_tokens, num_drafted_tokens,
    num_accepted_tokens)."""
    try:
        m = _metrics()
        if m is None or not rows:
            return
        errors = sum(1 for r in rows if r["error"] is not None)
        tokens = sum(r["num_output_tokens"] or 0 for r in rows)
        drafted = sum(r["num_drafted_tokens"] or 0 for r in rows)
        accepted = sum(r["num_accepted_tokens"] or 0 for r in rows)
        for status, n in (("ok", len(rows) - errors), ("error", errors)):
            if n:
                m["rows"].inc(n, tags={"status": status})
        for name, n in (("output_tokens", tokens), ("drafted", drafted), ("accepted", accepted)):
            if n:  # a Ray counter refuses increments <= 0
                m[name].inc(n)
        if drafted:
            m["acceptance"].set(accepted / drafted)
    except Exception:  # noqa: BLE001 - metrics are best effort
        logger.debug("specray metrics: record_batch failed", exc_info=True)


def record_pools(sample: dict) -> None:
    """Set the pool gauges from one of the control loop's actor-count samples (actors/control_loop.py; keys:
    targets, drafters, queue)."""
    try:
        m = _metrics()
        if m is None:
            return
        m["targets"].set(sample["targets"])
        m["drafters"].set(sample["drafters"])
        m["queue"].set(sample["queue"])
    except Exception:  # noqa: BLE001 - metrics are best effort
        logger.debug("specray metrics: record_pools failed", exc_info=True)
