"""Small deterministic ONNX models for the demo, the tests and the benchmarks, built in code."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["DEMO_MODEL_NAMES", "build_demo_model", "build_demo_models", "sample_inputs"]

# opset 17 keeps ReduceMean's axes an attribute; IR 8 is what opset 17 shipped with, so any
# onnxruntime from 1.13 on loads these files.
_OPSET = helper.make_opsetid("", 17)
_ML_OPSET = helper.make_opsetid("ai.onnx.ml", 3)
_IR_VERSION = 8
_BATCH = "batch"
_SEED = 20240501

_VOCAB = 1000
_TOKENS = 16
_SKUS = [f"sku-{i:04d}" for i in range(40)]
_SKU_CATEGORIES = [i % 5 for i in range(len(_SKUS))]  # five store departments


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng([_SEED, zlib.crc32(name.encode())])


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> TensorProto:
    """Return a Glorot-scaled FP32 initializer, so activations stay in a sane range."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    values = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), size=shape).astype(np.float32)
    return numpy_helper.from_array(values, name)


def _bias(rng: np.random.Generator, name: str, size: int) -> TensorProto:
    return numpy_helper.from_array(rng.normal(0.0, 0.01, size=size).astype(np.float32), name)


def _model(graph: onnx.GraphProto, *, ml: bool = False) -> onnx.ModelProto:
    opsets = [_OPSET, _ML_OPSET] if ml else [_OPSET]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="gpuvisor-demo")
    model.ir_version = _IR_VERSION
    model.model_version = 1
    onnx.checker.check_model(model, full_check=True)
    return model


def _mlp(
    name: str, doc: str, input_name: str, output_name: str, widths: list[int], sigmoid: bool
) -> onnx.ModelProto:
    """Return Gemm layers with Relu between them: widths[0] inputs → widths[-1] outputs."""
    rng = _rng(name)
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []
    current = input_name
    layers = len(widths) - 1
    for i in range(layers):
        # Gemm with transB=1 stores weights as [out, in], the layout torch exports.
        w, b, out = f"fc{i}.weight", f"fc{i}.bias", f"fc{i}"
        initializers += [_weight(rng, w, (widths[i + 1], widths[i])), _bias(rng, b, widths[i + 1])]
        nodes.append(helper.make_node("Gemm", [current, w, b], [out], transB=1))
        current = out
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [current], [f"{out}.relu"]))
            current = f"{out}.relu"
    nodes.append(helper.make_node("Sigmoid" if sigmoid else "Identity", [current], [output_name]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [_BATCH, widths[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [_BATCH, widths[-1]])],
        initializers,
        doc_string=doc,
    )
    return _model(graph)


def _shelf_classifier() -> onnx.ModelProto:
    rng = _rng("shelf-classifier")
    nodes = [
        helper.make_node(
            "Conv", ["image", "conv.weight", "conv.bias"], ["conv"], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["conv"], ["conv.relu"]),
        helper.make_node("GlobalAveragePool", ["conv.relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    initializers = [
        _weight(rng, "conv.weight", (16, 3, 3, 3)),
        _bias(rng, "conv.bias", 16),
        _weight(rng, "fc.weight", (10, 16)),
        _bias(rng, "fc.bias", 10),
    ]
    graph = helper.make_graph(
        nodes,
        "shelf-classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [_BATCH, 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [_BATCH, 10])],
        initializers,
        doc_string="Classifies a 32x32 RGB shelf photo into 10 product classes.",
    )
    return _model(graph)


def _intent_router() -> onnx.ModelProto:
    rng = _rng("intent-router")
    nodes = [
        helper.make_node("Gather", ["embedding", "tokens"], ["embedded"], axis=0),
        helper.make_node("ReduceMean", ["embedded"], ["sentence"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["sentence", "fc.weight", "fc.bias"], ["logits"], transB=1),
        helper.make_node("ArgMax", ["logits"], ["intent"], axis=1, keepdims=0),
    ]
    initializers = [
        numpy_helper.from_array(rng.normal(0.0, 1.0, (_VOCAB, 32)).astype(np.float32), "embedding"),
        _weight(rng, "fc.weight", (4, 32)),
        _bias(rng, "fc.bias", 4),
    ]
    graph = helper.make_graph(
        nodes,
        "intent-router",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [_BATCH, _TOKENS])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [_BATCH, 4]),
            helper.make_tensor_value_info("intent", TensorProto.INT64, [_BATCH]),
        ],
        initializers,
        doc_string=f"Routes a {_TOKENS}-token query (vocabulary {_VOCAB}) to one of 4 intents.",
    )
    return _model(graph)


def _sku_lookup() -> onnx.ModelProto:
    # StringNormalizer only takes [C] or [1, C], so the [batch, 1] column is flattened around it.
    nodes = [
        helper.make_node("Reshape", ["sku", "flat_shape"], ["sku.flat"]),
        helper.make_node(
            "StringNormalizer",
            ["sku.flat"],
            ["normalized.flat"],
            case_change_action="LOWER",
            locale="C",
        ),
        helper.make_node("Unsqueeze", ["normalized.flat", "column_axis"], ["sku_normalized"]),
        helper.make_node(
            "LabelEncoder",
            ["sku_normalized"],
            ["category"],
            domain="ai.onnx.ml",
            keys_strings=_SKUS,
            values_int64s=_SKU_CATEGORIES,
            default_int64=-1,
        ),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "column_axis"),
    ]
    graph = helper.make_graph(
        nodes,
        "sku-lookup",
        [helper.make_tensor_value_info("sku", TensorProto.STRING, [_BATCH, 1])],
        [
            helper.make_tensor_value_info("category", TensorProto.INT64, [_BATCH, 1]),
            helper.make_tensor_value_info("sku_normalized", TensorProto.STRING, [_BATCH, 1]),
        ],
        initializers,
        doc_string="Looks up a SKU's department (case-insensitive); unknown SKUs give -1.",
    )
    return _model(graph, ml=True)


_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "shelf-classifier": _shelf_classifier,
    "basket-scorer": lambda: _mlp(
        "basket-scorer",
        "Scores a 16-feature shopping basket in [0, 1].",
        "features",
        "score",
        [16, 32, 1],
        sigmoid=True,
    ),
    "intent-router": _intent_router,
    "sku-lookup": _sku_lookup,
    "batch-scorer": lambda: _mlp(
        "batch-scorer",
        "A heavier MLP (256 → 1024 → 1024 → 64) for benchmarks.",
        "features",
        "embedding",
        [256, 1024, 1024, 64],
        sigmoid=False,
    ),
}

DEMO_MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _check_name(name: str) -> str:
    name = name.removesuffix(".onnx")
    if name not in _BUILDERS:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODEL_NAMES)}")
    return name


def build_demo_model(name: str) -> onnx.ModelProto:
    """Return one demo model (checked by onnx.checker). Raises ValueError for an unknown name."""
    return _BUILDERS[_check_name(name)]()


def build_demo_models(dest: Path) -> dict[str, Path]:
    """Write every demo model to ``dest/<name>.onnx`` (creating ``dest``) and return {name: path}.

    Files are byte-identical from run to run. Each is written to a temporary name and renamed,
    so a worker loading a model concurrently never sees a half-written file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in DEMO_MODEL_NAMES:
        path = dest / f"{name}.onnx"
        tmp = dest / f".{name}.onnx.{os.getpid()}.tmp"
        tmp.write_bytes(build_demo_model(name).SerializeToString())
        os.replace(tmp, path)
        paths[name] = path
    return paths


def sample_inputs(name: str, batch: int = 1) -> dict[str, np.ndarray]:
    """Return deterministic inputs for demo model ``name`` with ``batch`` rows.

    Raises ValueError for an unknown model name or a batch below 1.
    """
    name = _check_name(name)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    rng = np.random.default_rng([_SEED, zlib.crc32(name.encode()), batch])
    if name == "shelf-classifier":
        return {"image": rng.random((batch, 3, 32, 32), dtype=np.float32)}
    if name == "basket-scorer":
        return {"features": rng.normal(size=(batch, 16)).astype(np.float32)}
    if name == "intent-router":
        return {"tokens": rng.integers(0, _VOCAB, size=(batch, _TOKENS), dtype=np.int64)}
    if name == "sku-lookup":
        # Mixed case, plus one SKU the table does not know once the batch has room for it.
        picks = rng.integers(0, len(_SKUS), batch)
        skus = [_SKUS[int(i)].upper() if row % 2 else _SKUS[int(i)] for row, i in enumerate(picks)]
        if batch > 1:
            skus[-1] = "SKU-9999"
        return {"sku": np.array(skus, dtype=object).reshape(batch, 1)}
    return {"features": rng.normal(size=(batch, 256)).astype(np.float32)}
