"""MRF over tasks: affinities -> potentials -> energy -> mixture weights on the simplex, the
budgeted discrete selection with its guarantee, and mixtures for the JAX training stacks."""

from taskpgm_jax.divergence.crosslik import pmi_affinity
from taskpgm_jax.mrf.affinity import PSDRepair, affinity_from_jsd, psd_repair
from taskpgm_jax.mrf.energy import Potentials, energy, potentials, utility_unary
from taskpgm_jax.mrf.solve import Solution, SolutionPath, solve, solve_path

__all__ = [
    "PSDRepair", "Potentials", "Solution", "SolutionPath", "affinity_from_jsd", "energy",
    "pmi_affinity", "potentials", "psd_repair", "solve", "solve_path", "utility_unary",
]
