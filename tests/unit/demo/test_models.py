"""The demo ONNX models: valid, deterministic, runnable in onnxruntime at batch 1 and 4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from gpuvisor.demo.models import (
    DEMO_MODEL_NAMES,
    build_demo_model,
    build_demo_models,
    sample_inputs,
)

# name -> {output: (dtype, shape with "B" for the batch)}
EXPECTED_OUTPUTS: dict[str, dict[str, tuple[type, tuple[int | str, ...]]]] = {
    "shelf-classifier": {"probabilities": (np.float32, ("B", 10))},
    "basket-scorer": {"score": (np.float32, ("B", 1))},
    "intent-router": {"logits": (np.float32, ("B", 4)), "intent": (np.int64, ("B",))},
    "sku-lookup": {"category": (np.int64, ("B", 1)), "sku_normalized": (np.object_, ("B", 1))},
    "batch-scorer": {"embedding": (np.float32, ("B", 64))},
}
EXPECTED_INPUTS: dict[str, dict[str, tuple[type, tuple[int | str, ...]]]] = {
    "shelf-classifier": {"image": (np.float32, ("B", 3, 32, 32))},
    "basket-scorer": {"features": (np.float32, ("B", 16))},
    "intent-router": {"tokens": (np.int64, ("B", 16))},
    "sku-lookup": {"sku": (np.object_, ("B", 1))},
    "batch-scorer": {"features": (np.float32, ("B", 256))},
}


def concrete(shape: tuple[int | str, ...], batch: int) -> tuple[int, ...]:
    return tuple(batch if d == "B" else int(d) for d in shape)


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_models(tmp_path_factory.mktemp("models") / "nested")


@pytest.fixture(scope="module")
def sessions(model_paths: dict[str, Path]) -> dict[str, ort.InferenceSession]:
    return {
        name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, path in model_paths.items()
    }


def test_every_model_is_written_and_valid(model_paths: dict[str, Path]) -> None:
    assert set(model_paths) == set(EXPECTED_OUTPUTS) == set(DEMO_MODEL_NAMES)
    for name, path in model_paths.items():
        assert path.name == f"{name}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
    assert sorted(p.name for p in next(iter(model_paths.values())).parent.iterdir()) == sorted(
        f"{n}.onnx" for n in DEMO_MODEL_NAMES
    )  # no temporary files left behind


def test_builds_are_byte_identical(model_paths: dict[str, Path], tmp_path: Path) -> None:
    again = build_demo_models(tmp_path)
    for name, path in model_paths.items():
        assert again[name].read_bytes() == path.read_bytes(), name


@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_batch_dimension_is_symbolic(name: str) -> None:
    graph = build_demo_model(name).graph
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_model_runs_with_sample_inputs(
    sessions: dict[str, ort.InferenceSession], name: str, batch: int
) -> None:
    inputs = sample_inputs(name, batch)
    assert {k: (v.dtype, v.shape) for k, v in inputs.items()} == {
        k: (np.dtype(dtype), concrete(shape, batch))
        for k, (dtype, shape) in EXPECTED_INPUTS[name].items()
    }
    session = sessions[name]
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, inputs), strict=True))
    assert {k: (v.dtype, v.shape) for k, v in outputs.items()} == {
        k: (np.dtype(dtype), concrete(shape, batch))
        for k, (dtype, shape) in EXPECTED_OUTPUTS[name].items()
    }


def run(sessions: dict[str, ort.InferenceSession], name: str, batch: int) -> dict[str, np.ndarray]:
    session = sessions[name]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, sample_inputs(name, batch)), strict=True))


def test_outputs_mean_what_they_say(sessions: dict[str, ort.InferenceSession]) -> None:
    probabilities = run(sessions, "shelf-classifier", 4)["probabilities"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    score = run(sessions, "basket-scorer", 4)["score"]
    assert ((score > 0) & (score < 1)).all()
    router = run(sessions, "intent-router", 4)
    np.testing.assert_array_equal(router["intent"], router["logits"].argmax(axis=1))
    assert np.isfinite(run(sessions, "batch-scorer", 4)["embedding"]).all()


def test_sku_lookup_is_case_insensitive_and_marks_unknown_skus(
    sessions: dict[str, ort.InferenceSession],
) -> None:
    skus = np.array([["sku-0000"], ["SKU-0007"], ["Sku-0013"], ["sku-9999"]], dtype=object)
    category, normalized = sessions["sku-lookup"].run(None, {"sku": skus})
    assert category.ravel().tolist() == [0, 2, 3, -1]
    assert normalized.ravel().tolist() == ["sku-0000", "sku-0007", "sku-0013", "sku-9999"]


def test_sample_inputs_are_deterministic_and_vary_with_batch() -> None:
    first, second = sample_inputs("basket-scorer", 4), sample_inputs("basket-scorer.onnx", 4)
    np.testing.assert_array_equal(first["features"], second["features"])
    tokens = sample_inputs("intent-router", 64)["tokens"]
    assert tokens.min() >= 0 and tokens.max() < 1000
    assert sample_inputs("sku-lookup", 4)["sku"][-1, 0] == "SKU-9999"


@pytest.mark.parametrize(("name", "batch"), [("resnet50", 1), ("basket-scorer", 0)])
def test_sample_inputs_reject_bad_arguments(name: str, batch: int) -> None:
    with pytest.raises(ValueError):
        sample_inputs(name, batch)


def multiply_adds_per_row(model: onnx.ModelProto) -> int:
    """Count multiply-adds per input row from the Gemm and Conv weight shapes."""
    weights = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Gemm":
            total += int(np.prod(weights[node.input[1]]))
        elif node.op_type == "Conv":
            total += int(np.prod(weights[node.input[1]])) * 32 * 32  # same-padded 32x32 image
    return total


def test_batch_scorer_costs_far_more_than_basket_scorer() -> None:
    # Measured on a 2-core AMD EPYC host with onnxruntime 1.31 (CPU): basket-scorer ≈ 6 µs
    # (batch 1) / 14 µs (batch 8); batch-scorer ≈ 49 µs / 126 µs, i.e. 8-9x per batch.
    basket = multiply_adds_per_row(build_demo_model("basket-scorer"))
    heavy = multiply_adds_per_row(build_demo_model("batch-scorer"))
    assert basket == 16 * 32 + 32 * 1
    assert heavy == 256 * 1024 + 1024 * 1024 + 1024 * 64
    assert heavy >= 4 * basket
