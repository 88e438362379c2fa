"""Bounds of the spec: counts, sizes, durations and numbers are finite, typed and bounded, and a
YAML alias bomb is refused before it is built, so no manifest can exhaust or crash the node."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import TypeAdapter, ValidationError

from gpuvisor.errors import SpecError
from gpuvisor.spec.documents import MAX_EXPANDED_VALUES
from gpuvisor.spec.kinds import MAX_REPLICAS, Deployment, Node, Profile, Tenant
from gpuvisor.spec.loader import dump_documents, load_documents, resource_to_dict
from gpuvisor.spec.types import MAX_DURATION, MAX_SIZE, Duration, Size, quoted
from gpuvisor.units import parse_duration, parse_size

HEADER = "apiVersion: gpuvisor/v1\n"
TENANT = HEADER + "kind: Tenant\nmetadata: {name: retail}\n"
PROFILE = HEADER + "kind: Profile\nmetadata: {name: small}\n"
DEPLOYMENT = HEADER + "kind: Deployment\nmetadata: {name: shelf, tenant: retail}\n"
NODE = HEADER + "kind: Node\nmetadata: {name: edge-1}\n"


def problem(text: str) -> str:
    """Return the one problem line a text that must be refused gives."""
    with pytest.raises(SpecError) as info:
        load_documents(text, "x.yaml")
    lines = info.value.message.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def deployment(extra: str) -> str:
    return DEPLOYMENT + f"spec:\n  model: shelf\n  profile: small\n{extra}"


# ---- 1. replicas ------------------------------------------------------------------------


def test_replicas_are_bounded_with_a_reason() -> None:
    line = problem(deployment("  replicas: 1000000000\n"))
    assert line.startswith("x.yaml doc 1 Deployment/shelf: spec.replicas: ")
    assert f"at most {MAX_REPLICAS} replicas, got 1000000000" in line
    (largest,) = load_documents(deployment(f"  replicas: {MAX_REPLICAS}\n"), "x.yaml")
    assert isinstance(largest, Deployment) and largest.spec.replicas == MAX_REPLICAS


# ---- 2. alias bombs and long quotes -----------------------------------------------------


def billion_laughs(levels: int) -> str:
    lines = [TENANT + "spec:\n  pools:", "  - &a0 [x,x,x,x,x,x,x,x,x,x]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_it_is_built() -> None:
    text = billion_laughs(8)  # 455 bytes, 10^8 values once written out
    started = time.perf_counter()
    line = problem("---\n" + TENANT + "---\n" + text)
    assert time.perf_counter() - started < 1.0
    assert line == (
        f"x.yaml doc 2: expands to more than {MAX_EXPANDED_VALUES} values through its YAML "
        "aliases (*a4): write it out, or use fewer aliases"
    )


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    line = problem(TENANT + "spec: {pools: &loop [x, *loop]}\n")
    assert "expands to more than" in line and "(*loop)" in line


def test_aliases_used_to_repeat_settings_still_work() -> None:
    text = (
        "---\n" + PROFILE + "spec: &shape {memory: 1Gi, computeShare: 0.25}\n"
        "---\nkind: List\nitems:\n"
        "- {apiVersion: gpuvisor/v1, kind: Profile, metadata: {name: a},\n"
        "   spec: &shape {memory: 1Gi, computeShare: 0.25}}\n"
        "- {apiVersion: gpuvisor/v1, kind: Profile, metadata: {name: b},\n"
        "   spec: {<<: *shape, memory: 4Gi}}\n"
        "- {apiVersion: gpuvisor/v1, kind: Tenant, metadata: {name: t1}, spec: {pools: &p [x, y]}}\n"
        "- {apiVersion: gpuvisor/v1, kind: Tenant, metadata: {name: t2}, spec: {pools: *p}}\n"
    )
    small, a, b, t1, t2 = load_documents(text, "x.yaml")
    assert isinstance(small, Profile) and isinstance(a, Profile) and isinstance(b, Profile)
    assert (b.spec.memory, b.spec.compute_share) == (4 * 2**30, 0.25)
    assert isinstance(t1, Tenant) and isinstance(t2, Tenant)
    assert t1.spec.pools == t2.spec.pools == ["x", "y"]


def test_many_objects_sharing_one_anchor_are_read() -> None:
    # 2,000 Deployments x about 15 values each: 30,000 values, below the bound
    items = [
        "- {apiVersion: gpuvisor/v1, kind: Deployment, metadata: {name: d0, tenant: retail},\n"
        "   spec: &spec {model: shelf, profile: small, replicas: 1,\n"
        "                batching: {maxBatchSize: 4, maxQueueDelay: 1ms}, slo: {latency: 50ms}}}"
    ]
    items += [
        f"- {{apiVersion: gpuvisor/v1, kind: Deployment, metadata: {{name: d{i}, "
        "tenant: retail}, spec: *spec}"
        for i in range(1, 2000)
    ]
    resources = load_documents("kind: List\nitems:\n" + "\n".join(items) + "\n", "x.yaml")
    assert len(resources) == 2000
    assert all(isinstance(r, Deployment) and r.spec.slo.latency == 0.05 for r in resources)


@pytest.mark.parametrize(
    "text",
    [
        TENANT + "spec: {weight: [" + ", ".join(["x"] * 50_000) + "]}\n",
        HEADER + "kind: " + "K" * 100_000 + "\nmetadata: {name: a}\n",
        HEADER + "kind: [" + ", ".join(["[x, x, x, x]"] * 5000) + "]\n",
        HEADER + "kind: Tenant\nmetadata: {name: " + "a" * 100_000 + "}\n",
        TENANT + "spec: {" + "w" * 100_000 + ": 1}\n",
        PROFILE + "spec: {memory: " + "9" * 100_000 + "Qi}\n",
        deployment("  batching: {maxQueueDelay: " + "1" * 100_000 + "parsecs}\n"),
        deployment("  model: " + "M" * 100_000 + "\n").replace("  model: shelf\n", ""),
        "apiVersion: gpuvisor/v1\nkind: List\nitems: []\n" + "z" * 100_000 + ": 1\n",
    ],
    ids=["list", "kind", "kind-list", "name", "key", "size", "duration", "model", "list-key"],
)
def test_an_error_message_never_quotes_a_huge_value(text: str) -> None:
    with pytest.raises(SpecError) as info:
        load_documents(text, "x.yaml")
    assert len(info.value.message) < 1000, info.value.message[:2000]


def test_quoted_is_bounded_for_any_value() -> None:
    nested: list[object] = ["x" * 10_000]
    for _ in range(50):
        nested = [nested] * 10
    assert len(quoted(nested)) <= 200
    assert len(quoted("y" * 10_000, 60)) == 60
    assert quoted(10**5000) == "a huge number"
    assert quoted("short") == "'short'"


# ---- 3. NaN and infinity ----------------------------------------------------------------


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", ".Inf", "'nan'", "'inf'"])
@pytest.mark.parametrize(
    ("text", "path"),
    [
        (deployment("  batching: {{maxQueueDelay: {v}}}\n"), "spec.batching.maxQueueDelay"),
        (deployment("  slo: {{latency: {v}}}\n"), "spec.slo.latency"),
        (TENANT + "spec: {{weight: {v}}}\n", "spec.weight"),
        (TENANT + "spec: {{quota: {{memory: {v}}}}}\n", "spec.quota.memory"),
        (TENANT + "spec: {{quota: {{compute: {v}}}}}\n", "spec.quota.compute"),
        (TENANT + "spec: {{quota: {{requestsPerSecond: {v}}}}}\n", "spec.quota.requestsPerSecond"),
        (TENANT + "spec: {{quota: {{deployments: {v}}}}}\n", "spec.quota.deployments"),
        (PROFILE + "spec: {{memory: {v}}}\n", "spec.memory"),
        (PROFILE + "spec: {{memory: 1Gi, computeShare: {v}}}\n", "spec.computeShare"),
        (NODE + "spec: {{reconcilePeriod: {v}}}\n", "spec.reconcilePeriod"),
        (NODE + "spec: {{workers: {{batchTimeout: {v}}}}}\n", "spec.workers.batchTimeout"),
        (NODE + "spec: {{cpu: {{memory: {v}}}}}\n", "spec.cpu.memory"),
        (NODE + "spec: {{nvml: {{quantum: {v}}}}}\n", "spec.nvml.quantum"),
        (NODE + "spec: {{limits: {{maxBodySize: {v}}}}}\n", "spec.limits.maxBodySize"),
        (NODE + "spec: {{telemetry: {{samplePeriod: {v}}}}}\n", "spec.telemetry.samplePeriod"),
    ],
)
def test_nan_and_infinity_are_refused_everywhere(text: str, path: str, value: str) -> None:
    line = problem(text.replace("{v}", value).replace("{{", "{").replace("}}", "}"))
    assert f": {path}: " in line, line


@pytest.mark.parametrize(
    "message_part",
    ["must be a finite number", "finite number of seconds", "finite number of bytes"],
)
def test_non_finite_messages_say_what_is_wrong(message_part: str) -> None:
    lines = "\n".join(
        [
            problem(TENANT + "spec: {weight: .nan}\n"),
            problem(deployment("  batching: {maxQueueDelay: .nan}\n")),
            problem(PROFILE + "spec: {memory: .inf}\n"),
        ]
    )
    assert message_part in lines


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (TENANT + "spec: {weight: .nan}\n", "spec.weight"),
        (PROFILE + "spec: {memory: 1Gi, computeShare: .nan}\n", "spec.computeShare"),
        (PROFILE + "spec: {memory: 1Gi, computeShare: -.inf}\n", "spec.computeShare"),
        # as text, which pydantic reads as a number too
        (TENANT + 'spec: {weight: "inf"}\n', "spec.weight"),
        (TENANT + 'spec: {weight: "NaN"}\n', "spec.weight"),
        (PROFILE + 'spec: {memory: 1Gi, computeShare: "nan"}\n', "spec.computeShare"),
        # a count, whose upper bound came first
        (
            "apiVersion: gpuvisor/v1\nkind: Model\nmetadata: {name: m, tenant: t}\n"
            "spec: {source: /m.onnx, maxBatchSize: .inf}\n",
            "spec.maxBatchSize",
        ),
    ],
)
def test_a_bounded_number_that_is_not_finite_says_so_not_its_bounds(text: str, path: str) -> None:
    line = problem(text)
    assert f": {path}: must be a finite number, got " in line, line
    assert "less than" not in line and "greater than" not in line


def test_what_is_stored_is_valid_json_and_applies_again() -> None:
    text = (
        TENANT
        + "spec: {weight: 1000, quota: {memory: 8Gi, compute: 1e-3}}\n---\n"
        + deployment("  batching: {maxQueueDelay: 2ms}\n  slo: {latency: 720h}\n")
    )
    resources = load_documents(text, "x.yaml")
    for resource in resources:
        json.dumps(resource_to_dict(resource), allow_nan=False)
    assert load_documents(dump_documents(resources), "again.yaml") == resources


# ---- 4. out of range --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        (PROFILE + "spec: {memory: 99999999999999999999999999Ti}\n", "spec.memory", "largest size"),
        (PROFILE + "spec: {memory: 8388608Ti}\n", "spec.memory", "largest size"),
        (PROFILE + "spec: {memory: 1.0e+300}\n", "spec.memory", "largest size"),
        (PROFILE + "spec: {memory: " + "9" * 40 + "}\n", "spec.memory", "largest size"),
        (PROFILE + "spec: {memory: " + "9" * 40 + "Gi}\n", "spec.memory", "too many digits"),
        (TENANT + "spec: {quota: {memory: 99999999999999999999999999Ti}}\n", "", "largest size"),
        (TENANT + "spec: {quota: {deployments: 99999999999999999999999999}}\n", "", "at most"),
        (TENANT + "spec: {quota: {maxQueued: 1.0e+30}}\n", "", "at most 1000000"),
        (TENANT + "spec: {weight: 1.0e+300}\n", "spec.weight", "less than or equal to 1000"),
        (TENANT + "spec: {weight: 1.0e-300}\n", "spec.weight", "greater than or equal to 0.001"),
        (
            TENANT + "spec: {quota: {requestsPerSecond: 1.0e-320}}\n",
            "spec.quota.requestsPerSecond",
            "greater than or equal to 0.001",  # one request in 1000 s; less overflowed
        ),
        (deployment("  slo: {latency: 31d}\n"), "spec.slo.latency", "expected a duration"),
        (deployment("  slo: {latency: 745h}\n"), "spec.slo.latency", "'745h' is longer than"),
        (deployment("  slo: {latency: 1.0e+300}\n"), "spec.slo.latency", "longest duration"),
        (deployment("  slo: {latency: " + "9" * 400 + "}\n"), "spec.slo.latency", "too long"),
        (deployment("  slo: {latency: " + "9" * 31 + "s}\n"), "", "too many digits"),
        (deployment("  batching: {maxBatchSize: 10000001}\n"), "", "at most 1000000"),
        (deployment("  rollout: {maxSurge: 99999999999999999999}\n"), "", "at most 1000000"),
        (NODE + "spec: {workers: {batchTimeout: 1000h}}\n", "", "'1000h' is longer than the"),
        (NODE + "spec: {cpu: {threads: 99999999999999999999}}\n", "spec.cpu.threads", "at most"),
        (NODE + "spec: {limits: {maxQueuedPerSlice: 1.0e+20}}\n", "", "at most"),
    ],
)
def test_out_of_range_values_are_refused(text: str, path: str, fragment: str) -> None:
    line = problem(text)
    assert f": {path}: " in line or not path, line
    assert fragment in line, line


def test_the_largest_values_are_accepted_and_exact() -> None:
    (profile,) = load_documents(PROFILE + f"spec: {{memory: {MAX_SIZE}}}\n", "x.yaml")
    assert isinstance(profile, Profile) and profile.spec.memory == MAX_SIZE
    assert TypeAdapter(Size).validate_python("8388607Ti") == 8388607 * 2**40
    assert TypeAdapter(Duration).validate_python("720h") == MAX_DURATION
    assert parse_size("99999999999999999999999999Ti") == 99999999999999999999999999 * 2**40


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_units_refuse_non_finite_numbers(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_size(bad)
    with pytest.raises(ValueError, match="finite"):
        parse_duration(bad)


# ---- 5. booleans and text are not numbers -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        (deployment("  replicas: true\n"), "spec.replicas", "got the boolean true"),
        (deployment("  replicas: yes\n"), "spec.replicas", "got the boolean true"),
        (deployment("  replicas: '2'\n"), "spec.replicas", "got the text '2'"),
        (deployment("  replicas: 2.5\n"), "spec.replicas", "fractional part"),
        (deployment("  batching: {maxBatchSize: off}\n"), "", "got the boolean false"),
        (PROFILE + "spec: {memory: 1Gi, computeShare: true}\n", "spec.computeShare", "boolean"),
        (TENANT + "spec: {weight: false}\n", "spec.weight", "got the boolean false"),
        (TENANT + "spec: {quota: {memory: true}}\n", "spec.quota.memory", "expected a size"),
        (TENANT + "spec: {quota: {deployments: '3'}}\n", "", "got the text '3'"),
        (TENANT + "spec: {quota: {requestsPerSecond: on}}\n", "", "got the boolean true"),
        (deployment("  slo: {latency: true}\n"), "spec.slo.latency", "expected a duration"),
        (NODE + "spec: {cpu: {threads: true}}\n", "spec.cpu.threads", "boolean"),
        (NODE + "spec: {nvml: {concurrency: '2'}}\n", "spec.nvml.concurrency", "text '2'"),
        (NODE + "spec: {workers: {batchNice: no}}\n", "spec.workers.batchNice", "boolean"),
        (NODE + "spec: {limits: {maxBodySize: yes}}\n", "", "expected a size"),
        (
            HEADER + "kind: Model\nmetadata: {name: m, tenant: retail}\nspec: {source: m.onnx, "
            "inputs: [{name: x, datatype: FP32, shape: [true, 3]}]}\n",
            "spec.inputs[0].shape[0]",
            "boolean",
        ),
        (
            HEADER + "kind: Fleet\nmetadata: {name: lab}\nspec: {nodes: [{name: n, "
            "numaNodes: '2'}]}\n",
            "spec.nodes[0].numaNodes",
            "text '2'",
        ),
    ],
)
def test_booleans_and_text_are_not_numbers(text: str, path: str, fragment: str) -> None:
    line = problem(text)
    assert f": {path}: " in line or not path, line
    assert fragment in line, line


def test_quantities_durations_and_numbers_written_as_text_still_work() -> None:
    text = (
        TENANT + "spec: {weight: 2, quota: {memory: 8Gi, compute: 1e-2, requestsPerSecond: '5'}}\n"
        "---\n" + PROFILE + "spec: {memory: '512Mi', computeShare: 1e-1}\n"
        "---\n" + deployment("  replicas: 2.0\n  batching: {maxQueueDelay: '2ms'}\n")
    )
    tenant, profile, dep = load_documents(text, "x.yaml")
    assert isinstance(tenant, Tenant) and isinstance(profile, Profile)
    assert isinstance(dep, Deployment)
    assert tenant.spec.quota.compute == pytest.approx(0.01)
    assert tenant.spec.quota.requests_per_second == 5.0
    assert (profile.spec.memory, profile.spec.compute_share) == (512 * 2**20, 0.1)
    assert dep.spec.replicas == 2 and isinstance(dep.spec.replicas, int)
    assert dep.spec.batching.max_queue_delay == pytest.approx(0.002)


def test_models_built_in_python_are_held_to_the_same_rules() -> None:
    with pytest.raises(ValidationError):
        Node.model_validate({"metadata": {"name": "n"}, "spec": {"reconcilePeriod": float("inf")}})
    with pytest.raises(ValidationError):
        Tenant.model_validate({"metadata": {"name": "t"}, "spec": {"weight": True}})


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        "{a: " * 50_000 + "1" + "}" * 50_000,
        "\n".join("  " * i + "a:" for i in range(1500)) + " 1",
        TENANT + "spec: {pools: " + "[" * 900 + "]" * 900 + "}\n",
    ],
    ids=["flow lists", "flow mappings", "block mappings", "inside a field"],
)
def test_a_document_nested_too_deep_is_one_clear_problem(text: str) -> None:
    """Not a RecursionError (a 500 on the API): one line saying what is wrong."""
    with pytest.raises(SpecError) as caught:
        load_documents(text, "deep.yaml")
    assert caught.value.message == (
        "deep.yaml: nests deeper than a manifest can (hundreds of levels): it cannot be read"
    )
