"""specray's data plane: read shards, preprocess, generate, write parquet (see pipeline.job).

The Python API: `run_job(config) -> JobResult` and `generate(ds, config) -> Dataset`. Imports are lazy,
so `python -m pipeline validate` does not pay for torch and Ray.
"""
from pipeline.config import ConfigError, JobConfig, load_config

__all__ = ["ConfigError", "JobConfig", "JobResult", "generate", "load_config", "run_job"]


def __getattr__(name: str):
    if name in ("run_job", "JobResult"):
        from pipeline import job

        return getattr(job, name)
    if name == "generate":
        from pipeline.stages import generate

        return generate
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
