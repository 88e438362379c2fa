"""Tests for the TorchScript and torch.export executors, on a tiny module saved in the test."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gpuvisor.errors import ExecutionError, InvalidRequest, ModelError  # noqa: E402
from gpuvisor.runtime.executors.base import ExecutorDevice, load_executor  # noqa: E402
from gpuvisor.runtime.executors.torch import (  # noqa: E402
    METADATA_FILE,
    TorchExportExecutor,
    TorchScriptExecutor,
)
from gpuvisor.runtime.tensors import TensorMeta, decode_infer_request  # noqa: E402

CPU = ExecutorDevice("cpu", threads=1)
INPUTS = [TensorMeta("features", "FP32", (-1, 4)), TensorMeta("scale", "INT64", (-1,))]
OUTPUTS = [TensorMeta("score", "FP32", (-1, 3)), TensorMeta("positive", "BOOL", (-1,))]


class Scorer(torch.nn.Module):
    """score = linear(features) * scale; positive = sum(features) > 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)

    def forward(
        self, features: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(features) * scale[:, None], features.sum(dim=1) > 0


class DictScorer(Scorer):
    """The same results as a dict, keys in another order than the declared outputs."""

    def forward(  # type: ignore[override]
        self, features: torch.Tensor, scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {
            "positive": features.sum(dim=1) > 0,
            "score": self.linear(features) * scale[:, None],
        }


def expected(features: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        score, positive = Scorer()(torch.from_numpy(features), torch.from_numpy(scale))
    return score.numpy(), positive.numpy()


def sample(batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(batch)
    return rng.normal(size=(batch, 4)).astype(np.float32), rng.integers(-3, 4, size=batch)


def save_script(path: Path, module: torch.nn.Module, metadata: dict | None) -> Path:
    extra = {METADATA_FILE: json.dumps(metadata)} if metadata is not None else {}
    torch.jit.save(torch.jit.script(module.eval()), str(path), _extra_files=extra)
    return path


METADATA = {"inputs": [m.to_dict() for m in INPUTS], "outputs": [m.to_dict() for m in OUTPUTS]}


@pytest.fixture
def script_model(tmp_path: Path) -> Path:
    return save_script(tmp_path / "scorer.pt", Scorer(), METADATA)


@pytest.fixture
def export_model(tmp_path: Path) -> Path:
    batch = torch.export.Dim("batch")
    features, scale = sample(2)
    program = torch.export.export(
        Scorer().eval(),
        (torch.from_numpy(features), torch.from_numpy(scale)),
        dynamic_shapes={"features": {0: batch}, "scale": {0: batch}},
    )
    path = tmp_path / "scorer.pt2"
    torch.export.save(program, str(path))
    return path


@pytest.mark.parametrize("batch", [1, 7])
def test_torchscript_metadata_from_extra_file_and_results(script_model: Path, batch: int) -> None:
    executor = load_executor("torchscript", script_model, CPU)
    assert isinstance(executor, TorchScriptExecutor)
    assert executor.platform == "pytorch_libtorch"
    assert executor.inputs == INPUTS and executor.outputs == OUTPUTS
    assert executor.batchable
    features, scale = sample(batch)
    results = executor.run({"features": features, "scale": scale})
    want_score, want_positive = expected(features, scale)
    np.testing.assert_allclose(results["score"], want_score, rtol=1e-5, atol=1e-6)
    assert results["positive"].dtype == np.bool_
    assert results["positive"].tolist() == want_positive.tolist()
    assert list(executor.run({"features": features, "scale": scale}, ["positive"])) == ["positive"]


def test_torchscript_dict_outputs_map_by_name(tmp_path: Path) -> None:
    path = save_script(tmp_path / "dict.pt", DictScorer(), METADATA)
    executor = load_executor("torchscript", path, CPU)
    features, scale = sample(3)
    results = executor.run({"features": features, "scale": scale})
    want_score, want_positive = expected(features, scale)
    np.testing.assert_allclose(results["score"], want_score, rtol=1e-5, atol=1e-6)
    assert results["positive"].tolist() == want_positive.tolist()


def test_torchscript_inputs_go_to_forwards_arguments_by_name(tmp_path: Path) -> None:
    """forward(features, scale) declared as scale, features: each tensor still goes to its
    own argument; names that are not forward's are refused at load."""
    path = save_script(tmp_path / "bare.pt", Scorer(), None)
    swapped = [INPUTS[1], INPUTS[0]]
    executor = load_executor("torchscript", path, CPU, swapped, OUTPUTS)
    features, scale = sample(3)
    results = executor.run({"features": features, "scale": scale})
    want_score, _ = expected(features, scale)
    np.testing.assert_allclose(results["score"], want_score, rtol=1e-5, atol=1e-6)
    renamed = [TensorMeta("x", "FP32", (-1, 4)), TensorMeta("s", "INT64", (-1,))]
    with pytest.raises(ModelError) as caught:
        load_executor("torchscript", path, CPU, renamed, OUTPUTS)
    assert "its inputs are declared as x, s, but its forward takes features, scale" in (
        caught.value.message
    )


def test_torchscript_without_metadata_needs_declared_tensors(tmp_path: Path) -> None:
    path = save_script(tmp_path / "bare.pt", Scorer(), None)
    with pytest.raises(ModelError) as caught:
        load_executor("torchscript", path, CPU)
    assert "does not say what its inputs and outputs are" in caught.value.message
    assert "_extra_files" in caught.value.message and "spec.inputs" in caught.value.message
    executor = load_executor("torchscript", path, CPU, INPUTS, OUTPUTS)
    assert executor.inputs == INPUTS and executor.outputs == OUTPUTS
    features, scale = sample(2)
    np.testing.assert_allclose(
        executor.run({"features": features, "scale": scale})["score"],
        expected(features, scale)[0],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ("not json", "is not"),
        ({"inputs": []}, "is not"),
        ({"inputs": [{"name": "x", "datatype": "FP8", "shape": [1]}], "outputs": []}, "is not"),
        (
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [-1]}], "outputs": []},
            "tensor 'x' has datatype BYTES, which torch models cannot take",
        ),
    ],
)
def test_torchscript_bad_metadata_is_a_model_error(
    tmp_path: Path, metadata: object, message: str
) -> None:
    path = tmp_path / "bad.pt"
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    torch.jit.save(torch.jit.script(Scorer()), str(path), _extra_files={METADATA_FILE: text})
    with pytest.raises(ModelError, match=message):
        load_executor("torchscript", path, CPU)


@pytest.mark.parametrize("batch", [1, 5, 9])
def test_torch_export_metadata_from_the_graph_and_results(export_model: Path, batch: int) -> None:
    executor = load_executor("torch-export", export_model, CPU)
    assert isinstance(executor, TorchExportExecutor)
    assert executor.inputs == INPUTS
    assert executor.outputs == [
        TensorMeta("output__0", "FP32", (-1, 3)),
        TensorMeta("output__1", "BOOL", (-1,)),
    ]
    assert executor.batchable
    features, scale = sample(batch)
    results = executor.run({"features": features, "scale": scale})
    want_score, want_positive = expected(features, scale)
    np.testing.assert_allclose(results["output__0"], want_score, rtol=1e-5, atol=1e-6)
    assert results["output__1"].tolist() == want_positive.tolist()


def test_read_only_inputs_from_a_request_body_run_without_warnings(export_model: Path) -> None:
    executor = load_executor("torch-export", export_model, CPU)
    features, scale = sample(2)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [2, 4],
                    "parameters": {"binary_data_size": 32},
                },
                {
                    "name": "scale",
                    "datatype": "INT64",
                    "shape": [2],
                    "parameters": {"binary_data_size": 16},
                },
            ]
        }
    ).encode()
    body = header + features.tobytes() + scale.tobytes()
    request = decode_infer_request(body, len(header), executor.inputs, executor.outputs)
    request.inputs["features"].setflags(write=False)  # as np.frombuffer views of the body are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = executor.run(request.inputs)
    np.testing.assert_allclose(
        results["output__0"], expected(features, scale)[0], rtol=1e-5, atol=1e-6
    )


def test_run_errors(script_model: Path, export_model: Path) -> None:
    for path, model_format in ((script_model, "torchscript"), (export_model, "torch-export")):
        executor = load_executor(model_format, path, CPU)
        features, scale = sample(2)
        with pytest.raises(InvalidRequest, match="missing input scale"):
            executor.run({"features": features})
        with pytest.raises(InvalidRequest, match="unknown output nope requested"):
            executor.run({"features": features, "scale": scale}, ["nope"])
        # a shape the model cannot take: a failure of TorchScript's code, but the guard of
        # an exported program, which says the input is wrong
        wrong = (InvalidRequest, "Guard failed") if model_format == "torch-export" else None
        with pytest.raises(
            wrong[0] if wrong else ExecutionError, match=wrong[1] if wrong else "torch failed:"
        ):
            executor.run({"features": np.ones((2, 5), np.float32), "scale": scale})
        executor.close()
        with pytest.raises(ExecutionError, match="closed"):
            executor.run({"features": features, "scale": scale})


def test_load_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(ModelError, match=r"torch\.jit cannot load"):
        load_executor("torchscript", garbage, CPU)
    with pytest.raises(ModelError, match=r"torch\.export cannot load"):
        load_executor("torch-export", garbage, CPU)


def test_declared_tensors_must_match_an_exported_program(export_model: Path) -> None:
    declared = [TensorMeta("features", "FP64", (-1, 4)), TensorMeta("scale", "INT64", (-1,))]
    with pytest.raises(ModelError, match="input 'features' is FP32 in the model but declared FP64"):
        load_executor("torch-export", export_model, CPU, declared)


def test_threads_setting_reaches_torch(script_model: Path) -> None:
    before = torch.get_num_threads()
    try:
        load_executor("torchscript", script_model, ExecutorDevice("cpu", threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.gpu
def test_cuda_device_with_memory_fraction(export_model: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    total = torch.cuda.get_device_properties(0).total_memory
    executor = load_executor(
        "torch-export", export_model, ExecutorDevice("cuda", 0, memory_limit=total // 4)
    )
    features, scale = sample(4)
    results = executor.run({"features": features, "scale": scale})
    np.testing.assert_allclose(
        results["output__0"], expected(features, scale)[0], rtol=1e-4, atol=1e-5
    )
    executor.close()


def test_an_output_the_metadata_misdescribes_is_an_error_not_a_cast(tmp_path: Path) -> None:
    """score is FP32 [N, 3]: declared INT32, or with another rank, its values would be cast
    or reshaped into a wrong answer."""
    path = save_script(tmp_path / "bare.pt", Scorer(), None)
    features, scale = sample(2)
    for score in (TensorMeta("score", "INT32", (-1, 3)), TensorMeta("score", "FP32", (-1,))):
        executor = load_executor("torchscript", path, CPU, INPUTS, [score, OUTPUTS[1]])
        with pytest.raises(ExecutionError) as caught:
            executor.run({"features": features, "scale": scale})
        assert caught.value.message.startswith(
            "output 'score' is FP32 with 2 dimension(s), but the model's metadata declares "
            f"{score.datatype} {list(score.shape)}"
        )


def test_an_input_an_exported_programs_guard_refuses_is_the_callers_error(
    tmp_path: Path,
) -> None:
    """Exported for 4 rows or more: one row is a shape the program refuses (400), not a
    failure of the model (500)."""
    at_least_4 = torch.export.Dim("rows", min=4)
    features, scale = sample(5)
    program = torch.export.export(
        Scorer().eval(),
        (torch.from_numpy(features), torch.from_numpy(scale)),
        dynamic_shapes={"features": {0: at_least_4}, "scale": {0: at_least_4}},
    )
    path = tmp_path / "four.pt2"
    torch.export.save(program, str(path))
    executor = load_executor("torch-export", path, CPU)
    one_features, one_scale = sample(1)
    with pytest.raises(InvalidRequest, match="the model refused this input's shape: Guard failed"):
        executor.run({"features": one_features, "scale": one_scale})
    first = executor.outputs[0].name  # an exported program's outputs are output__0, ...
    assert executor.run({"features": features, "scale": scale})[first].shape == (5, 3)


def test_a_workers_torch_memory_cap_is_the_sum_of_its_models_caps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch caps a whole process; a shared worker holds several of its tenant's models: the
    cap is theirs together, not the last one's (torch.cuda stood in for: no GPU here)."""
    from gpuvisor.runtime.executors import torch as torch_executors

    fractions: list[float] = []
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index: type("Props", (), {"total_memory": 80 * 2**30})(),
    )
    monkeypatch.setattr(
        torch.cuda,
        "set_per_process_memory_fraction",
        lambda fraction, index: fractions.append(round(fraction, 4)),
    )
    monkeypatch.setattr(torch_executors, "_CAPS", {})
    big, small = object(), object()
    torch_executors.cap_memory(big, 0, 40 * 2**30)
    torch_executors.cap_memory(small, 0, 2**30)
    torch_executors.release_memory_cap(big, 0)
    torch_executors.release_memory_cap(small, 0)
    assert fractions == [0.5, round(41 / 80, 4), round(1 / 80, 4), 1.0]
