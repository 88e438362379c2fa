"""The nodes a Fleet describes: their NUMA nodes, device groups and MIG instances."""

from __future__ import annotations

from pydantic import Field, model_validator

from gpuvisor.spec.types import Count, DnsLabel, SpecModel, field_error

__all__ = ["FleetDevices", "FleetNode", "MigInstanceSpec", "MigSetting"]


class MigInstanceSpec(SpecModel):
    """One GPU instance that exists on a simulated MIG GPU: a profile at a start memory slice."""

    profile: str = Field(min_length=1)
    start: Count = Field(ge=0)


class MigSetting(SpecModel):
    enabled: bool = False
    instances: list[MigInstanceSpec] = Field(default_factory=list)
    """The GPU instances that exist; checked against the model's MIG geometry when the fleet is
    loaded. A MIG GPU without instances is laid out by ``gpuvisor plan``."""

    @model_validator(mode="after")
    def _instances_need_mig(self) -> MigSetting:
        if self.instances and not self.enabled:
            raise field_error(
                "instances", "GPU instances need MIG: set mig.enabled: true or remove them"
            )
        return self


MAX_GPUS_PER_GROUP = 64
"""A node's GPUs of one model: more than any server holds, few enough to plan quickly."""


class FleetDevices(SpecModel):
    model: str = Field(min_length=1)
    count: Count = Field(default=1, ge=1, le=MAX_GPUS_PER_GROUP)
    numa: Count = Field(default=0, ge=0)
    mig: MigSetting = Field(default_factory=MigSetting)


class FleetNode(SpecModel):
    name: DnsLabel
    numa_nodes: Count = Field(default=1, ge=1)
    devices: list[FleetDevices] = Field(default_factory=list)

    @model_validator(mode="after")
    def _numa_in_range(self) -> FleetNode:
        for index, group in enumerate(self.devices):
            if group.numa >= self.numa_nodes:
                raise field_error(
                    f"devices[{index}].numa",
                    f"NUMA node {group.numa} does not exist: this node has numaNodes: "
                    f"{self.numa_nodes} (valid: 0..{self.numa_nodes - 1})",
                )
        return self
