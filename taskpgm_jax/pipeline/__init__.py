"""The end-to-end TaskPGM experiment: config -> data -> single-task adapters -> probe ->
affinities and mixtures -> mixture fine-tunes -> held-out evaluation -> results and report,
cached by stage in a run directory (`taskpgm run CONFIG.yaml`)."""

from taskpgm_jax.pipeline.run import run_pipeline

__all__ = ["run_pipeline"]
