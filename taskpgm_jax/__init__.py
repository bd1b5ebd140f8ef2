"""taskpgm_jax: learn LLM fine-tuning task mixtures from the behaviour of single-task models.

Subpackages are imported on demand so that a user of the kernels alone pays for nothing else:
`from taskpgm_jax import divergence` or `import taskpgm_jax.divergence`.
"""

__version__ = "0.1.0"
