"""specray's data plane: read shards, preprocess, generate, write parquet (see pipeline.job)."""
from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.generate import generate
from pipeline.job import JobResult, run_job

__all__ = ["ConfigError", "JobConfig", "JobResult", "generate", "load_config", "run_job"]
