"""Whether a model's first dimension is a batch of independent rows, decided when it loads.

A variable first dimension on every input and output is what a batchable model looks like,
but not proof: a model over a sequence (a softmax across tokens), one that normalises over
its rows, or one whose output pairs every row with every other (``X @ X.T``) has the same
shapes, and merging two requests' rows into one run would give each a wrong answer, or
another request's data. So before such a model serves, two different rows are run alone and
then together: only when each row's answer is the same both ways are requests merged.

``Model spec.batchable`` decides instead of the check: ``false`` for a model whose first
dimension is not a batch (each request runs alone and whole, whatever its length), ``true``
for one the check cannot judge (a model with random or stateful operators, say).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from gpuvisor.errors import GpuvisorError, ModelError
from gpuvisor.runtime.executors.base import Executor
from gpuvisor.runtime.tensors import DATATYPES, TensorMeta

__all__ = ["decide_batching", "two_rows"]

log = logging.getLogger("gpuvisor.worker")

# How far a row's answer may move with another row beside it and still be the same answer:
# kernels differ with the batch size, and on a GPU TF32 convolutions and matrix products
# (cuDNN's and onnxruntime's default) keep about 3 decimal digits. What the check is for,
# rows that change each other's answers, moves them far more than this (order 1).
_RTOL = {"FP16": 5e-2, "FP32": 1e-2, "FP64": 1e-6}


def two_rows(metas: Sequence[TensorMeta]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Return two one-row inputs that differ in every tensor: small values any model should
    take (0 and 1 for integers, as indices; seeded random numbers for floats)."""
    rng = np.random.default_rng(20261122)
    first: dict[str, np.ndarray] = {}
    second: dict[str, np.ndarray] = {}
    for meta in metas:
        shape = [1, *(d if d > 0 else 1 for d in meta.shape[1:])]
        if meta.datatype == "BYTES":
            first[meta.name] = np.full(shape, b"a", dtype=object)
            second[meta.name] = np.full(shape, b"b", dtype=object)
        elif meta.datatype == "BOOL":
            first[meta.name] = np.zeros(shape, dtype=np.bool_)
            second[meta.name] = np.ones(shape, dtype=np.bool_)
        elif meta.datatype.startswith("FP"):
            dtype = DATATYPES[meta.datatype]
            first[meta.name] = rng.standard_normal(shape).astype(dtype)
            second[meta.name] = rng.standard_normal(shape).astype(dtype)
        else:
            first[meta.name] = np.zeros(shape, dtype=DATATYPES[meta.datatype])
            second[meta.name] = np.ones(shape, dtype=DATATYPES[meta.datatype])
    return first, second


def _same(together: np.ndarray, alone: np.ndarray, datatype: str) -> bool:
    if together.shape != alone.shape:
        return False
    if datatype in _RTOL:
        scale = float(np.nanmax(np.abs(alone))) if alone.size else 0.0
        atol = _RTOL[datatype] * max(scale, 1e-6)
        return bool(np.allclose(together, alone, rtol=_RTOL[datatype], atol=atol, equal_nan=True))
    return bool(np.array_equal(together, alone))


def _differs(
    executor: Executor, inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta]
) -> str | None:
    """Why two rows run together do not each get their own answer, or why that could not be
    told; None when they do. A model the check cannot run (one exported for 4 rows or more,
    say) is not merged: unchecked, merging could pair one request's rows with another's."""
    first, second = two_rows(inputs)
    both = {name: np.concatenate([first[name], second[name]]) for name in first}
    try:
        alone = [executor.run(first), executor.run(second)]
        together = executor.run(both)
    except GpuvisorError as exc:
        log.info("the batching check could not run the model on its test rows: %s", exc.message)
        return f"the load-time check could not run it on two single-row requests ({exc.message})"
    datatypes = {m.name: m.datatype for m in outputs}
    for name, merged in together.items():
        a, b = alone[0][name], alone[1][name]
        if merged.ndim == 0 or a.ndim == 0 or b.ndim == 0:
            return f"output '{name}' has no first dimension to split between requests"
        if merged.shape != (a.shape[0] + b.shape[0], *a.shape[1:]) or a.shape != b.shape:
            return (
                f"output '{name}' has shape {list(merged.shape)} for two rows, "
                f"but {list(a.shape)} for one: its other dimensions depend on the rows"
            )
        datatype = datatypes.get(name, "")
        rows = a.shape[0]
        if not (_same(merged[:rows], a, datatype) and _same(merged[rows:], b, datatype)):
            return f"output '{name}' of a row changes when another row runs beside it"
    return None


def decide_batching(
    executor: Executor,
    inputs: Sequence[TensorMeta],
    outputs: Sequence[TensorMeta],
    declared: bool | None,
) -> tuple[bool, str]:
    """Whether requests to this model may be merged along their first dimension, and why not
    (a note for the operator, '' when there is nothing to say)."""
    if declared is False:
        return False, ""
    if declared is True:
        if not executor.batchable:
            fixed = [t.name for t in [*inputs, *outputs] if not t.shape or t.shape[0] != -1]
            raise ModelError(
                "Model spec.batchable is true, but the model's first dimension is not "
                f"variable on {', '.join(repr(n) for n in fixed)}: it cannot take a batch of "
                "requests. Remove spec.batchable (or set it to false)"
            )
        return True, ""
    if not executor.batchable:
        return False, ""
    why = _differs(executor, inputs, outputs)
    if why is None:
        return True, ""
    return False, (
        f"requests are not merged into batches: {why}. Each request runs alone and whole "
        "(set Model spec.batchable: false to say so, or true if the model is row by row "
        "after all)"
    )
