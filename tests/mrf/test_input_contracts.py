"""Input contracts of the MRF layer: low-precision inputs are computed in float32, edited
Potentials are checked, options a method would ignore are refused, and mixtures read and write
only what they were given."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taskpgm_jax.mrf import (Mixture, affinity_from_jsd, energy, potentials, psd_repair,
                             select_tasks, set_value, size_proportional_mixture, solve,
                             solve_path, submodularity_ratio, temperature_mixture)
from tests.mrf.conftest import random_affinity
from tests.mrf.reference import active_set_simplex_qp, energy64


# -- low precision --------------------------------------------------------------------------
@pytest.mark.parametrize("low", [jnp.bfloat16, jnp.float16])
def test_low_precision_affinity_is_solved_in_float32(rng, low):
    T, beta, lam, ridge = 7, 1.0, float(rng.uniform(2.0, 5.0)), 1e-3
    S_low = jnp.asarray(random_affinity(rng, T, "psd"), low)
    S = np.asarray(S_low, np.float64)               # the values the caller actually passed
    eig = np.linalg.eigvalsh(S)
    S_rep = S + (max(0.0, -eig[0]) + ridge) * np.eye(T)
    Q, c = lam * S_rep, beta * S_rep.sum(axis=1)
    w_ref, _ = active_set_simplex_qp(Q, c)

    pot = potentials(S_low, beta=beta, lam=lam, ridge=ridge)
    assert pot.matrix.dtype == jnp.float32 and pot.unary.dtype == jnp.float32
    sol = solve(pot)
    w = np.asarray(sol.weights, np.float64)
    assert sol.weights.dtype == jnp.float32 and bool(sol.converged)
    assert abs(w.sum() - 1.0) < 1e-5
    scale = abs(c @ w_ref) + 0.5 * abs(w_ref @ Q @ w_ref)
    assert energy64(w, Q, c) - energy64(w_ref, Q, c) <= 1e-6 * scale
    np.testing.assert_allclose(w, w_ref, atol=2e-3)
    cf = solve(pot, "closed_form")                  # bf16 had no Cholesky kernel
    assert cf.weights.dtype == jnp.float32 and abs(float(cf.weights.sum()) - 1.0) < 1e-5
    # Potentials someone built in low precision are upcast by the solvers too.
    pot_low = pot._replace(matrix=pot.matrix.astype(low), unary=pot.unary.astype(low))
    assert solve(pot_low).weights.dtype == jnp.float32


def test_low_precision_jsd_gives_float32_affinity(rng):
    P = rng.dirichlet(np.ones(5), size=4)
    M = 0.5 * (P[:, None] + P[None])
    D = 0.5 * ((P[:, None] * np.log(P[:, None] / M)).sum(-1)
               + (P[None] * np.log(P[None] / M)).sum(-1))
    D_bf = jnp.asarray(D, jnp.bfloat16)
    S = affinity_from_jsd(D_bf)
    assert S.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(S), 1 - np.asarray(D_bf, np.float64) / math.log(2),
                               atol=1e-6)


# -- edited Potentials ----------------------------------------------------------------------
def _edits(pot, T):
    return {
        "unary short": pot._replace(unary=pot.unary[:T - 1]),
        "unary long": pot._replace(unary=jnp.ones(T + 2, pot.unary.dtype)),
        "unary 2-D": pot._replace(unary=pot.unary[:, None]),
        "matrix not square": pot._replace(matrix=pot.matrix[:T - 1]),
        "beta 0": pot._replace(beta=0.0),
        "lam negative": pot._replace(lam=-1.0),
        "beta string": pot._replace(beta="1"),
        # NaN / inf: the exact solve stopped at its start vertex, softmax gave the uniform
        # mixture, and the selection and its guarantee skipped the task, without an error.
        "unary NaN": pot._replace(unary=pot.unary.at[T // 2].set(jnp.nan)),
        "matrix inf": pot._replace(matrix=pot.matrix.at[1, 2].set(jnp.inf)),
    }


@pytest.mark.parametrize("edit", ["unary short", "unary long", "unary 2-D", "matrix not square",
                                  "beta 0", "lam negative", "beta string", "unary NaN",
                                  "matrix inf"])
def test_inconsistent_potentials_are_refused_everywhere(rng, edit):
    T = 6
    pot = potentials(random_affinity(rng, T, "signed"), rng.normal(size=T))
    bad = _edits(pot, T)[edit]
    w = rng.dirichlet(np.ones(T))
    for call in (lambda: solve(bad), lambda: solve(bad, "closed_form"),
                 lambda: solve_path(bad, [0.5, 1.0]), lambda: energy(w, bad),
                 lambda: solve(bad, "softmax"), lambda: select_tasks(bad, 3),
                 lambda: set_value(bad, [0, 1]), lambda: submodularity_ratio(bad)):
        with pytest.raises(ValueError, match=r"^pot: .*potentials\(\.\.\.\)"):
            call()


# -- options a method ignores ---------------------------------------------------------------
@pytest.mark.parametrize("method, kwargs, name", [
    ("exact", {"temperature": 0.01}, "temperature"),
    ("exact", {"optimizer": optax.adam(0.1)}, "optimizer"),
    ("closed_form", {"temperature": 2.0}, "temperature"),
    ("closed_form", {"max_iter": 1}, "max_iter"),
    ("closed_form", {"tol": 0.5}, "tol"),
    ("softmax", {"optimizer": "adam"}, "optimizer"),
    ("softmax", {"optimizer": optax.adam}, "optimizer"),
    ("softmax", {"optimizer": 0.1}, "optimizer"),
])
def test_options_the_method_does_not_use_are_refused(rng, method, kwargs, name):
    T = 5
    pot = potentials(random_affinity(rng, T, "psd"), rng.normal(size=T))
    with pytest.raises(ValueError, match=rf"^{name}: "):
        solve(pot, method, **kwargs)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        solve_path(pot, rng.uniform(0.1, 1.0, size=2), method, **kwargs)


def test_softmax_options_apply_to_softmax_only(rng):
    T = 5
    pot = potentials(random_affinity(rng, T, "psd"), rng.normal(size=T), lam=0.5)
    Q, c = 0.5 * np.asarray(pot.matrix, np.float64), np.asarray(pot.unary, np.float64)
    w_ref, _ = active_set_simplex_qp(Q, c)
    sol = solve(pot, "softmax", temperature=0.5, optimizer=optax.adam(0.05), max_iter=4000)
    e, e_ref = energy64(np.asarray(sol.weights, np.float64), Q, c), energy64(w_ref, Q, c)
    assert e - e_ref <= 1e-3 * (abs(e_ref) + 1.0)
    with pytest.raises(ValueError, match=r"^temperature: only used with method='softmax'"):
        solve(pot, temperature=0.5)


def test_spectrum_is_named(rng):
    S = random_affinity(rng, 4, "signed")
    for call in (lambda: potentials(S, spectrum="eigh"), lambda: psd_repair(S, spectrum="eigh")):
        with pytest.raises(ValueError, match=r"^spectrum: .*'eigh'"):
            call()


def test_swapped_solve_path_arguments_name_pot(rng):
    pot = potentials(random_affinity(rng, 4, "psd"))
    with pytest.raises(ValueError, match=r"^pot: expected Potentials"):
        solve_path([0.1, 1.0], pot)


def test_traced_beta_explains_what_to_do(rng):
    S = random_affinity(rng, 4, "psd")
    with pytest.raises(ValueError, match=r"^beta: needs a concrete number.*solve_path"):
        jax.jit(lambda b: potentials(S, beta=b).matrix)(1.0)
    # What the message points to works, and the Potentials check lets a vmapped beta through.
    pot = potentials(S, rng.normal(size=4), lam=2.0)
    betas = rng.uniform(0.1, 3.0, size=3)
    batched = jax.vmap(lambda b: solve(pot._replace(beta=b)).weights)(jnp.asarray(betas))
    Q = 2.0 * np.asarray(pot.matrix, np.float64)
    for b, w in zip(betas, np.asarray(batched, np.float64), strict=True):
        c = b * np.asarray(pot.unary, np.float64)
        w_ref, _ = active_set_simplex_qp(Q, c)
        scale = abs(c @ w_ref) + w_ref @ Q @ w_ref
        assert energy64(w, Q, c) - energy64(w_ref, Q, c) <= 1e-6 * scale


def test_potentials_and_solutions_cross_jit_and_vmap_boundaries(rng):
    """A Solution held its method name as a pytree leaf, so returning it from the caller's jit or
    vmap failed ("not a valid JAX type"), and so did passing Potentials (unary_kind, spectrum)
    into a jitted function. The strings are now static; the arrays and numbers are traced.
    (eval_shape traces like jit without compiling a new program.)"""
    T = 4
    pot = potentials(random_affinity(rng, T, "signed"), rng.normal(size=T), lam=2.0)
    for method in ("exact", "closed_form"):
        out = jax.eval_shape(lambda p, m=method: solve(p, m), pot)
        assert out.method == method and out.weights.shape == (T,)
        assert (out.clipped is None) == (method == "exact")
    path = jax.eval_shape(lambda m: solve_path(pot._replace(matrix=m), [1.0]), pot.matrix)
    assert path.method == "exact" and path.weights.shape == (1, T)
    assert jax.eval_shape(energy, jnp.ones(T) / T, pot).shape == ()
    # The values, through a vmap over beta (the program test_traced_beta_... compiles).
    betas = rng.uniform(0.1, 3.0, size=3)
    batched = jax.vmap(lambda b: solve(pot._replace(beta=b)))(jnp.asarray(betas))
    assert batched.method == "exact" and batched.clipped is None
    Q = 2.0 * np.asarray(pot.matrix, np.float64)
    for b, w in zip(betas, np.asarray(batched.weights, np.float64), strict=True):
        c = b * np.asarray(pot.unary, np.float64)
        w_ref, _ = active_set_simplex_qp(Q, c)
        scale = abs(c @ w_ref) + 0.5 * w_ref @ Q @ w_ref
        assert energy64(w, Q, c) - energy64(w_ref, Q, c) <= 1e-6 * scale


def test_traced_host_side_arguments_are_named(rng):
    """Bounds, costs, subsets and the potentials of the selection are read on the host; traced
    (inside the caller's jit or vmap) they raised JAX's TracerArrayConversionError or
    ConcretizationTypeError from inside our code instead of naming the argument."""
    T = 4
    pot = potentials(random_affinity(rng, T, "psd"), rng.normal(size=T))
    floor = rng.uniform(0.0, 0.2, size=T)
    cases = [
        (lambda: jax.jit(lambda f: solve(pot, floor=f).weights)(floor), "floor"),
        (lambda: jax.jit(lambda f: solve(pot, floor=[f[0], 0.0, 0.0, 0.0]).weights)(floor),
         "floor"),
        (lambda: jax.vmap(lambda c: solve(pot, "closed_form", cap=c).weights)(
            jnp.full((2,), 0.6)), "cap"),
        (lambda: jax.jit(lambda c: select_tasks(pot, 2.0, c).indices)(jnp.ones(T)), "costs"),
        (lambda: jax.jit(lambda c: submodularity_ratio(pot, costs=c).gamma)(jnp.ones(T)),
         "costs"),
        (lambda: jax.jit(lambda a: set_value(pot, a))(jnp.arange(2)), "subset"),
        (lambda: jax.jit(lambda m: select_tasks(pot._replace(matrix=m), 2).value)(pot.matrix),
         "pot"),
        (lambda: jax.jit(lambda u: set_value(pot._replace(unary=u), [0]))(pot.unary), "pot"),
        (lambda: jax.jit(lambda u: submodularity_ratio(pot._replace(unary=u)).gamma)(
            pot.unary), "pot"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}: .*(concrete|traced)"):
            call()


# -- numbers: strings and bools refused, 0-d arrays accepted ----------------------------------
def test_strings_are_refused_where_numbers_are_expected(rng):
    S = random_affinity(rng, 4, "psd")
    pot = potentials(S)
    cases = [(lambda: potentials(S, beta="1"), "beta"), (lambda: potentials(S, lam=True), "lam"),
             (lambda: select_tasks(pot, "3"), "budget"),
             (lambda: Mixture(("a", "b"), ("0.5", "0.5")), "weights"),
             (lambda: Mixture.from_counts({"a": "1", "b": 2}), "counts"),
             (lambda: size_proportional_mixture(["a", "b"], ["1", "3"]), "sizes"),
             (lambda: temperature_mixture(["a", "b"], [1, 3], "2"), "tau"),
             (lambda: psd_repair(S, ridge="0.1"), "ridge")]
    for call, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}: "):
            call()


def test_zero_dim_numbers_are_accepted_alike(rng):
    sizes = rng.integers(1, 100, size=3).astype(np.float64)
    tau = float(rng.uniform(0.5, 3.0))
    ref = sizes ** (1 / tau) / (sizes ** (1 / tau)).sum()
    for t in (tau, np.float32(tau), jnp.float32(tau), np.array(tau)):
        np.testing.assert_allclose(temperature_mixture(["a", "b", "c"], sizes, t).weights, ref,
                                   rtol=1e-6)


# -- Mixture --------------------------------------------------------------------------------
def test_duplicate_json_keys_are_refused(rng):
    wa, wb, wa2 = rng.uniform(0.1, 1.0, size=3)
    text = (f'{{"a": {{"path": "/x", "weight": {wa}}}, "b": {{"path": "/y", "weight": {wb}}}, '
            f'"a": {{"path": "/z", "weight": {wa2}}}}}')
    with pytest.raises(ValueError, match=r"^text: duplicate keys \['a'\]"):
        Mixture.from_maxtext(text)
    with pytest.raises(ValueError, match=r"^text: duplicate keys \['names'\]"):
        Mixture.from_json('{"names": ["a"], "weights": [1.0], "names": ["b"]}')


@pytest.mark.parametrize("weights", ["1.0", "null", '{"a": 1}', '"1"'])
def test_from_json_names_bad_weights(weights):
    with pytest.raises(ValueError, match=r"^weights: "):
        Mixture.from_json(f'{{"names": ["a"], "weights": {weights}}}')


def test_mappings_keyed_by_name(rng):
    names = ("a", "b", "c")
    sizes = rng.integers(1, 100, size=3).astype(np.float64)
    by_name = dict(reversed(list(zip(names, sizes, strict=True))))   # another order
    mix = size_proportional_mixture(list(names), by_name)
    np.testing.assert_allclose(mix.weights, sizes / sizes.sum())
    w = rng.dirichlet(np.ones(3))
    np.testing.assert_allclose(Mixture(names, dict(zip(names[::-1], w[::-1], strict=True))).weights,
                               w)
    for bad in ({"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3, "d": 4}):
        with pytest.raises(ValueError, match=r"^sizes: .*task names"):
            size_proportional_mixture(list(names), bad)
        with pytest.raises(ValueError, match=r"^weights: .*task names"):
            Mixture(names, {k: 1 / len(bad) for k in bad})


def test_to_maxtext_paths(rng):
    w = rng.dirichlet(np.ones(2))
    mix = Mixture(("a", "b"), tuple(w))
    out = json.loads(mix.to_maxtext({"a": pathlib.Path("/data/a"), "b": "/data/b"}))
    assert out == {"a": {"path": "/data/a", "weight": w[0]}, "b": {"path": "/data/b",
                                                                  "weight": w[1]}}
    for bad in ("/data", None, [("a", "/x"), ("b", "/y")]):
        with pytest.raises(ValueError, match=r"^paths: expected a mapping"):
            mix.to_maxtext(bad)
    with pytest.raises(ValueError, match=r"^paths\['a'\]: "):
        mix.to_maxtext({"a": None, "b": "/y"})


def test_from_solution_explains_what_to_pass(rng):
    T = 4
    names = [f"t{i}" for i in range(T)]
    pot = potentials(random_affinity(rng, T, "psd"))
    for bad in (solve_path(pot, [0.1, 1.0]), select_tasks(pot, 2), rng.dirichlet(np.ones(T))):
        with pytest.raises(ValueError, match=r"^solution: expected a Solution.*Mixture\(names"):
            Mixture.from_solution(names, bad)
    sol = solve(pot)
    w = np.asarray(sol.weights, np.float64)
    np.testing.assert_allclose(Mixture.from_solution(names, sol).weights, w / w.sum())

