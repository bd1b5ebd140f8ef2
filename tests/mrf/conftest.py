"""Shared fixtures of the MRF tests: random problem instances and the real 316-task matrix."""

import os

import numpy as np
import pytest

PMI_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                        "authors_pmi_316.npy")


@pytest.fixture(scope="session")
def authors_pmi():
    """The authors' 316-task PMI matrix, read in place (never copied into the project).

    Resolved from ../shared/data relative to the repository, or /work/shared/data."""
    for path in (PMI_PATH, "/work/shared/data/authors_pmi_316.npy"):
        if os.path.exists(path):
            return np.load(path)
    return None


def random_affinity(rng, T, kind):
    """A [T, T] symmetric affinity of one of three shapes the solvers meet in practice."""
    if kind == "psd":       # kernel of random task embeddings: PSD, often ill-conditioned
        X = rng.normal(size=(T, 4))
        d = ((X[:, None] - X[None]) ** 2).sum(-1)
        return np.exp(-d / max(np.median(d), 1e-9))
    if kind == "signed":    # PMI-like: signed, indefinite, zero diagonal
        A = rng.normal(size=(T, T)) * rng.uniform(0.5, 5.0)
        S = 0.5 * (A + A.T)
        np.fill_diagonal(S, 0.0)
        return S
    # "lowrank": tasks mixing a few skills, positive entries
    K = max(1, min(T, 3))
    F = rng.dirichlet(np.ones(K), size=T)
    return F @ F.T
