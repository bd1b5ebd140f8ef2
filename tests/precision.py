"""Reading the matrix-product precision out of a traced program (CPU-run tests of GPU numerics).

A GPU's default float32 matmul rounds its operands to TF32 and a TPU's to bfloat16; on a CPU every
precision computes the same, so tests check that the programs ask for HIGHEST where it matters.
"""

import jax

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def dot_precisions(jaxpr):
    """The precision of every dot_general in a jaxpr, its sub-jaxprs (loops, conds) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    found.extend(dot_precisions(sub))
    return found
