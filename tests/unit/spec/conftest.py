"""A realistic manifest (every kind, camelCase as operators write it) shared by the spec tests."""

from __future__ import annotations

import pytest

MANIFEST = """\
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: retail, labels: {team: stores}}
spec:
  weight: 2
  pools: [inference]
  quota: {memory: 8Gi, compute: 1.5, deployments: 10, requestsPerSecond: 500, maxQueued: 1000}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: rt-small}
spec: {memory: 1Gi, computeShare: 0.25, isolation: process, latencyClass: critical}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: mig-1g}
spec: {memory: 10Gi, computeShare: 0.14, isolation: partition, migProfile: 1g.10gb}
---
apiVersion: gpuvisor/v1
kind: Pool
metadata: {name: inference}
spec:
  selector: {kind: gpu, model: "H100*"}
  tenancy: shared
  scheduler: fixed-share
  requireSignedModels: true
  trustedKeys: ["ed25519:AAAAC3NzaC1lZDI1NTE5"]
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: shelf-detector, tenant: retail}
spec:
  version: 3
  format: onnx
  source: models/shelf-detector.onnx
  sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
  maxBatchSize: 32
  inputs:
  - {name: image, datatype: FP32, shape: [-1, 3, 32, 32]}
  outputs:
  - {name: probabilities, datatype: FP32, shape: [-1, 10]}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: shelf-detector, tenant: retail}
spec:
  model: shelf-detector@3
  profile: rt-small
  pool: inference
  replicas: 2
  batching: {maxBatchSize: 16, maxQueueDelay: 2ms}
  slo: {latency: 50ms}
  placement: {numa: local, antiAffinity: true, disallowMigration: true}
---
apiVersion: gpuvisor/v1
kind: Fleet
metadata: {name: lab}
spec:
  nodes:
  - name: edge-1
    numaNodes: 2
    devices:
    - {model: H100-80GB, count: 2, numa: 1, mig: {enabled: true}}
    - {model: L4}
---
apiVersion: gpuvisor/v1
kind: Node
metadata: {name: edge-1}
spec:
  cluster: store-42
  cpu: {enabled: auto, memory: 4Gi, threads: 4, concurrency: 2, quantum: 10ms}
  nvml: {enabled: false}
  fleet: fleet.yaml
  limits: {maxBodySize: 16Mi}
  workers: {startTimeout: 60s, restartBackoff: 250ms, restartBackoffMax: 10s}
  reconcilePeriod: 500ms
"""


@pytest.fixture
def manifest() -> str:
    """Every kind once or twice, as an operator would write them."""
    return MANIFEST
