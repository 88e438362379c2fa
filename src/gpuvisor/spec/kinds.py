"""The declarative API's kinds (Tenant, Profile, Pool, Model, Deployment, Fleet, Node) and defaults."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator

from gpuvisor.spec.fleet_nodes import FleetNode
from gpuvisor.spec.node_settings import (
    CpuDeviceConfig,
    Limits,
    NvmlConfig,
    TelemetrySettings,
    WorkerSettings,
)
from gpuvisor.spec.types import (
    Count,
    Dimension,
    DnsLabel,
    Duration,
    ModelVersion,
    Number,
    Sha256Digest,
    Size,
    SpecModel,
    field_error,
    quoted,
)
from gpuvisor.units import format_size

__all__ = [
    "API_VERSION",
    "CLUSTER_SCOPED",
    "DATATYPES",
    "DEFAULT_POOL",
    "DEVICE_LABELS",
    "KINDS",
    "KIND_MODELS",
    "MAX_REPLICAS",
    "MAX_WEIGHT",
    "MIN_WEIGHT",
    "TENANT_SCOPED",
    "Batching",
    "Deployment",
    "DeploymentSpec",
    "Fleet",
    "FleetSpec",
    "Metadata",
    "Model",
    "ModelSpec",
    "Node",
    "NodeSpec",
    "PlacementPrefs",
    "Pool",
    "PoolSpec",
    "Profile",
    "ProfileSpec",
    "Quota",
    "Resource",
    "Slo",
    "Tenant",
    "TenantSpec",
    "TensorSpec",
    "resource_key",
]

API_VERSION: Final = "gpuvisor/v1"
DEFAULT_POOL = "default"
"""The pool every cluster has without declaring it: it selects every device."""

DEVICE_LABELS = ("kind", "backend", "model", "id", "node")
"""Device labels a Pool selector may match on."""

MAX_REPLICAS = 1000
"""Most replicas one Deployment may ask for. A node holds a handful of devices (8 GPUs split
into 7 MIG instances each is 56 slices) and each replica is a worker process with its own copy
of the model, so a node serves at most some dozens; 1000 leaves room for tiny CPU slices and
for ``gpuvisor plan`` over a fleet, while the per-replica state of a typo (``replicas:
1000000000``) cannot exhaust the node's memory."""
MIN_WEIGHT = 0.001
MAX_WEIGHT = 1000.0
MIN_SHARE = 0.001  # a computeShare above 0: a thousandth of a device, 1 ms of each second
MIN_RATE = 0.001  # quota.requestsPerSecond: one request in 1000 s
"""Bounds of a tenant's weight: a ratio of up to 10^6 between tenants is more than fair sharing
can show, and keeps virtual time (device seconds / weight) finite."""

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip
DATATYPES: tuple[str, ...] = get_args(Datatype)

_MODEL_REF_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(@[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class Metadata(SpecModel):
    """Who an object is: its name, the tenant owning it (tenant-scoped kinds only), labels."""

    name: DnsLabel
    tenant: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class _Kind(SpecModel):
    """Fields every kind shares; remembers where it was read from (see ``loader.origin_of``)."""

    api_version: Literal["gpuvisor/v1"] = API_VERSION
    metadata: Metadata
    _origin: str = PrivateAttr(default="")

    def __eq__(self, other: object) -> bool:
        """Objects are equal when their fields are; where they were read from does not count."""
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__


class _ClusterScoped(_Kind):
    @field_validator("metadata")
    @classmethod
    def _refuse_tenant(cls, metadata: Metadata) -> Metadata:
        if metadata.tenant is not None:
            raise field_error(
                "tenant",
                f"{cls.__name__} is cluster-scoped and belongs to no tenant: "
                "remove metadata.tenant",
            )
        return metadata


class _TenantScoped(_Kind):
    @field_validator("metadata")
    @classmethod
    def _require_tenant(cls, metadata: Metadata) -> Metadata:
        if metadata.tenant is None:
            raise field_error(
                "tenant",
                f"a {cls.__name__} belongs to a tenant: set metadata.tenant (e.g. tenant: retail)",
            )
        return metadata


class Quota(SpecModel):
    """Caps on what a tenant may hold; None means no cap."""

    memory: Size | None = None
    compute: Number | None = Field(default=None, ge=0)
    deployments: Count | None = Field(default=None, ge=0)
    requests_per_second: Number | None = Field(default=None, ge=MIN_RATE)
    max_queued: Count | None = Field(default=None, ge=0)


class TenantSpec(SpecModel):
    weight: Number = Field(default=1.0, ge=MIN_WEIGHT, le=MAX_WEIGHT)
    pools: list[str] = Field(default_factory=list)
    """Pools the tenant may deploy to; empty means every pool."""
    quota: Quota = Field(default_factory=Quota)
    model_roots: list[str] | None = Field(default=None, max_length=64)
    """Folders on the node that the tenant's own key may name Model files in (absolute
    paths); None: any file the node can read (admin keys are never confined)."""

    @field_validator("model_roots")
    @classmethod
    def _absolute_roots(cls, value: list[str] | None) -> list[str] | None:
        for root in value or ():
            if not root.startswith("/"):
                raise ValueError(
                    f"model folder {quoted(root)} is not an absolute path: give it from /"
                )
        return value


class Tenant(_ClusterScoped):
    kind: Literal["Tenant"] = "Tenant"
    spec: TenantSpec = Field(default_factory=TenantSpec)


class ProfileSpec(SpecModel):
    """The shape of one slice (a vGPU): memory cap, guaranteed compute, isolation, latency."""

    memory: Size = Field(gt=0)
    compute_share: Number = Field(default=0.0, ge=0.0, le=1.0)
    isolation: Literal["shared", "process", "partition", "exclusive"] = "process"
    latency_class: Literal["critical", "standard", "batch"] = "standard"
    mig_profile: str | None = None

    @field_validator("compute_share")
    @classmethod
    def _no_vanishing_share(cls, value: float) -> float:
        # a guarantee of 1e-300 of the device is no guarantee, and the scheduler's
        # arithmetic on it overflows
        if 0 < value < MIN_SHARE:
            raise ValueError(
                f"a compute share must be 0 (no guarantee) or at least {MIN_SHARE:g} (a "
                f"thousandth of the device), got {value:g}"
            )
        return value

    @model_validator(mode="after")
    def _mig_profile_iff_partition(self) -> ProfileSpec:
        if self.isolation == "partition" and not self.mig_profile:
            raise field_error(
                "migProfile",
                "isolation 'partition' needs a MIG profile, e.g. migProfile: 1g.10gb",
            )
        if self.isolation != "partition" and self.mig_profile is not None:
            raise field_error(
                "migProfile",
                f"migProfile is only used with isolation 'partition' (this profile has "
                f"isolation {self.isolation!r}): remove it or set isolation: partition",
            )
        # a MIG profile names its memory (1g.10gb: 10 GB): a slice cannot hold more
        named = re.search(r"\d+g\.(\d+)gb", self.mig_profile or "", re.IGNORECASE)
        if named is not None and self.memory > int(named.group(1)) * 2**30:
            raise field_error(
                "memory",
                f"memory {format_size(self.memory)} is more than a {self.mig_profile} MIG "
                f"instance holds ({named.group(1)} GB): ask for at most that, or name a larger "
                "migProfile",
            )
        return self


class Profile(_ClusterScoped):
    kind: Literal["Profile"] = "Profile"
    spec: ProfileSpec


class PoolSpec(SpecModel):
    selector: dict[str, str] = Field(default_factory=dict)
    """Device label -> glob; empty selects every device."""
    tenancy: Literal["shared", "dedicated"] = "shared"
    scheduler: Literal["best-effort", "equal-share", "fixed-share"] = "best-effort"
    placement: Literal["binpack", "spread"] = "binpack"
    """binpack fills the fullest device that fits first; spread the emptiest."""
    memory_headroom: Size = 0
    """Memory kept free on each device of the pool (driver, CUDA contexts, fragmentation)."""
    require_signed_models: bool = False
    trusted_keys: list[str] = Field(default_factory=list)

    @field_validator("selector")
    @classmethod
    def _known_device_labels(cls, selector: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(selector) - set(DEVICE_LABELS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], DEVICE_LABELS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"unknown device label {unknown[0]!r} ({hint}accepted: {', '.join(DEVICE_LABELS)})"
            )
        return selector


class Pool(_ClusterScoped):
    kind: Literal["Pool"] = "Pool"
    spec: PoolSpec = Field(default_factory=PoolSpec)


class TensorSpec(SpecModel):
    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[Dimension]
    """Dimensions; -1 marks a variable one (usually the batch)."""


class ModelSpec(SpecModel):
    version: ModelVersion = "1"
    format: Literal["onnx", "torchscript", "torch-export"] = "onnx"
    source: str = Field(min_length=1)
    """Path of the artifact; the loader makes relative paths absolute against the file's folder."""
    sha256: Sha256Digest | None = None
    signature: str | None = None
    max_batch_size: Count = Field(default=0, ge=0)
    """Largest batch the model accepts; 0 means unknown."""
    batchable: bool | None = None
    """Whether the first dimension is a batch of independent rows, so that requests may be
    merged along it. Unset: decided when the model loads (a variable first dimension, and two
    rows each get the same answer alone as together). False: each request runs alone and
    whole. True: merged without that check."""
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None


class Model(_TenantScoped):
    kind: Literal["Model"] = "Model"
    spec: ModelSpec


class Batching(SpecModel):
    max_batch_size: Count = Field(default=8, ge=1)
    max_queue_delay: Duration = 0.0


class Slo(SpecModel):
    latency: Duration | None = Field(default=None, gt=0)


class PlacementPrefs(SpecModel):
    numa: Literal["any", "local", "dedicated"] = "any"
    anti_affinity: bool = False
    disallow_migration: bool = False


class Rollout(SpecModel):
    max_surge: Count = Field(default=1, ge=1)
    """How many replicas are replaced (or moved off a cordoned device) at the same time; the
    others keep serving their old instance until their turn."""


class DeploymentSpec(SpecModel):
    model: str
    """``name`` (highest version) or ``name@version``."""
    profile: str
    pool: str = DEFAULT_POOL
    replicas: Count = Field(default=1, ge=0)
    batching: Batching = Field(default_factory=Batching)
    slo: Slo = Field(default_factory=Slo)
    placement: PlacementPrefs = Field(default_factory=PlacementPrefs)
    rollout: Rollout = Field(default_factory=Rollout)

    @field_validator("model")
    @classmethod
    def _model_reference(cls, value: str) -> str:
        if not _MODEL_REF_RE.match(value):
            raise ValueError(
                f"invalid model reference {quoted(value)}: write 'name' (highest version) "
                "or 'name@version', e.g. 'shelf-detector@3'"
            )
        return value

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas_bounded(cls, value: Any) -> Any:
        # before Count's own check, whose bound (MAX_COUNT) is a thousand times higher
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_REPLICAS:
            raise ValueError(
                f"at most {MAX_REPLICAS} replicas, got {quoted(value)}: one node serves a handful of "
                "devices; split the work over several Deployments or nodes"
            )
        return value

    @property
    def model_name(self) -> str:
        """The model's name, without the version."""
        return self.model.partition("@")[0]

    @property
    def model_version(self) -> str | None:
        """The pinned version, or None for 'the highest version'."""
        _, at, version = self.model.partition("@")
        return version if at else None


class Deployment(_TenantScoped):
    kind: Literal["Deployment"] = "Deployment"
    spec: DeploymentSpec


class FleetSpec(SpecModel):
    nodes: list[FleetNode] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_node_names(self) -> FleetSpec:
        seen: set[str] = set()
        for index, node in enumerate(self.nodes):
            if node.name in seen:
                raise field_error(
                    f"nodes[{index}].name", f"node {node.name!r} is listed twice in this fleet"
                )
            seen.add(node.name)
        return self


class Fleet(_ClusterScoped):
    kind: Literal["Fleet"] = "Fleet"
    spec: FleetSpec


class NodeSpec(SpecModel):
    cluster: str = Field(default="local", min_length=1)
    cpu: CpuDeviceConfig = Field(default_factory=CpuDeviceConfig)
    nvml: NvmlConfig = Field(default_factory=NvmlConfig)
    fleet: str | None = None
    """Path of a Fleet YAML describing simulated devices; relative to the config file."""
    limits: Limits = Field(default_factory=Limits)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    reconcile_period: Duration = Field(default=2.0, gt=0)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)


class Node(_ClusterScoped):
    kind: Literal["Node"] = "Node"
    spec: NodeSpec = Field(default_factory=NodeSpec)


Resource = Annotated[
    Tenant | Profile | Pool | Model | Deployment | Fleet | Node,
    Field(discriminator="kind"),
]
"""Any object of the declarative API, told apart by ``kind``."""

KIND_MODELS: dict[str, type[_Kind]] = {
    cls.__name__: cls for cls in (Tenant, Profile, Pool, Model, Deployment, Fleet, Node)
}
KINDS: tuple[str, ...] = tuple(KIND_MODELS)
CLUSTER_SCOPED: frozenset[str] = frozenset({"Tenant", "Profile", "Pool", "Fleet", "Node"})
TENANT_SCOPED: frozenset[str] = frozenset({"Model", "Deployment"})


def resource_key(resource: Resource) -> tuple[str, str, str]:
    """Return the identity of an object: (kind, tenant or "", name; for a Model name@version)."""
    name = resource.metadata.name
    if isinstance(resource, Model):
        name = f"{name}@{resource.spec.version}"
    return (resource.kind, resource.metadata.tenant or "", name)
