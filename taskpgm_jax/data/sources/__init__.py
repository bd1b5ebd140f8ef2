"""Task sources: local files, Hugging Face datasets, BIG-bench, and the synthetic suite."""

from taskpgm_jax.data.sources.bigbench import (
    BBH_MISSING, BBH_SOURCES, fetch_bigbench, load_bigbench,
)
from taskpgm_jax.data.sources.files import load_task_files
from taskpgm_jax.data.sources.hub import HubSpec, HubUnavailableError, load_hub_tasks
from taskpgm_jax.data.sources.synthetic import synthetic_suite

__all__ = [
    "BBH_MISSING", "BBH_SOURCES", "HubSpec", "HubUnavailableError", "fetch_bigbench",
    "load_bigbench", "load_hub_tasks", "load_task_files", "synthetic_suite",
]
