"""The command line: python -m pipeline {run, validate, demo-data, report}.

Exit codes (for schedulers):
    0  success: every shard is committed (rows that failed individually are error rows, not a failure)
    1  the job failed (the traceback, then one line); committed shards stay, and a rerun goes on from them
    2  a bad config or bad usage, one line naming the field; nothing was run
    3  the output is locked by another live run (a rerun started while the last one is still going)
    4  finished, but some shards could not be read: they are listed, not committed, and retried by a rerun
       (input.on_unreadable: fail turns this into exit 1 before any work)
"""
from __future__ import annotations

import time

STARTED = time.time()  # the job's start as its user sees it: before the imports and checks below

import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402

from pipeline.config import ConfigError, dump, load_config  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="specray: batch VLM inference with speculative decoding on Ray.")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_UNREADABLE = 0, 1, 2, 3, 4


def _bad_config(err: Exception) -> None:
    typer.echo(f"config error: {err}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _job_failed(err: Exception) -> None:
    traceback.print_exception(err, file=sys.stderr)
    typer.echo(f"job failed: {type(err).__name__}: {' '.join(str(err).split())[:500]}", err=True)
    raise typer.Exit(EXIT_FAILED)


@app.command()
def validate(config: str, set_: Optional[list[str]] = typer.Option(None, "--set", help="dotted.key=value")) -> None:
    """Check a config and print it resolved; exit 2 with the offending field if it is bad."""
    try:
        cfg = load_config(config, set_ or [])
        cfg.check_job()
        from pipeline.rows import check_columns

        check_columns(cfg)
    except ConfigError as e:
        _bad_config(e)
    import yaml

    typer.echo(yaml.safe_dump(dump(cfg), sort_keys=False).rstrip())


@app.command()
def run(config: str, set_: Optional[list[str]] = typer.Option(None, "--set", help="dotted.key=value"),
        overwrite: bool = typer.Option(False, "--overwrite", help="redo shards already committed")) -> None:
    """Run a job: read shards, generate, write one parquet file per shard."""
    overrides = list(set_ or []) + (["output.overwrite=true"] if overwrite else [])
    try:
        cfg = load_config(config, overrides)
        cfg.check_job()
    except ConfigError as e:
        _bad_config(e)
    from pipeline.job import run_job
    from pipeline.summary import summary

    from pipeline.write import OutputLocked

    try:
        result = run_job(cfg, started=STARTED)
    except ConfigError as e:  # found only once the job looked at its input (no shard matches, ...)
        _bad_config(e)
    except OutputLocked as e:
        typer.echo(f"locked: {e}", err=True)
        raise typer.Exit(EXIT_LOCKED) from None
    except Exception as e:  # noqa: BLE001 - the traceback, then one line, exit 1
        _job_failed(e)
    typer.echo(summary(result))
    if result.shards_unreadable:
        raise typer.Exit(EXIT_UNREADABLE)


@app.command("demo-data")
def demo_data(output_dir: str, seed: int = typer.Option(3000, help="corpus seed (3000: the test split)"),
              num_samples: int = typer.Option(64, min=1), format: str = typer.Option("webdataset"),
              rows_per_shard: int = typer.Option(32, min=1)) -> None:
    """Write demo shards (images with ground-truth answers in the `answer` column)."""
    from pipeline.demo_data import write_demo_data

    if format not in ("webdataset", "parquet"):
        typer.echo(f"usage error: --format: expected webdataset or parquet, got {format!r}", err=True)
        raise typer.Exit(EXIT_USAGE)
    paths = write_demo_data(output_dir, seed=seed, num_samples=num_samples, fmt=format, rows_per_shard=rows_per_shard)
    typer.echo(f"wrote {num_samples} rows in {len(paths)} {format} shards to {output_dir}")


@app.command()
def report(output_dir: str, out: Optional[str] = typer.Option(None, "--out", help="default: OUTPUT_DIR/report.html")) -> None:
    """Write report.html from a finished job's output: throughput, acceptance, drafters per target, errors."""
    from pipeline.report import ReportError, write_report

    try:
        path = write_report(output_dir, out)
    except ReportError as e:
        typer.echo(f"usage error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    typer.echo(f"wrote {path}")


def main() -> None:
    app()  # click exits 2 on usage errors (missing argument, unknown option) and with typer.Exit's code


if __name__ == "__main__":
    main()
