"""MRF over tasks: affinities -> potentials -> energy -> mixture weights on the simplex, the
budgeted discrete selection with its guarantee, and mixtures for the JAX training stacks."""

from taskpgm_jax.divergence.crosslik import pmi_affinity
from taskpgm_jax.mrf.affinity import PSDRepair, affinity_from_jsd, psd_repair
from taskpgm_jax.mrf.energy import Potentials, energy, potentials, utility_unary
from taskpgm_jax.mrf.mixture import (Mixture, random_mixture, size_proportional_mixture,
                                     temperature_mixture, uniform_mixture)
from taskpgm_jax.mrf.select import Selection, select_tasks, set_value
from taskpgm_jax.mrf.solve import Solution, SolutionPath, solve, solve_path
from taskpgm_jax.mrf.submodularity import RatioReport, submodularity_ratio

__all__ = [
    "Mixture", "PSDRepair", "Potentials", "RatioReport", "Selection", "Solution",
    "SolutionPath", "affinity_from_jsd", "energy", "pmi_affinity", "potentials", "psd_repair",
    "random_mixture", "select_tasks", "set_value", "size_proportional_mixture", "solve",
    "solve_path", "submodularity_ratio", "temperature_mixture", "uniform_mixture",
    "utility_unary",
]
