"""Running one slice's requests in the worker: decoding, batching, running and encoding a
batch's requests, and measuring the slice's execution profile when it loads.

The worker process (``runtime/worker.py``, its loop in ``runtime/worker_loop.py``) owns the
process, the link to the node and the order batches run in; this module is what a batch does
once its turn comes.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpuvisor.errors import GpuvisorError, InvalidRequest, ModelError, is_out_of_memory
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.executors.base import Executor
from gpuvisor.runtime.tensors import (
    DATATYPES,
    InferRequest,
    TensorMeta,
    decode_infer_request,
    encode_error,
    encode_infer_response,
)

log = logging.getLogger("gpuvisor.worker")  # runs inside the worker: keeps the worker's logger


@dataclass
class LoadedSlice:
    """A model loaded in this worker, with what the node needs to serve it."""

    spec: p.LoadModel
    executor: Executor
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    batchable: bool  # requests may be merged along the first dimension (``batch_check``)


def synthetic_inputs(metas: Sequence[TensorMeta], rows: int) -> dict[str, np.ndarray]:
    """Return zero-valued inputs of the model's shapes: ``rows`` in a first dimension the
    model leaves open, the model's own size in one it fixes, 1 in other open ones."""
    out: dict[str, np.ndarray] = {}
    for meta in metas:
        shape = [d if d > 0 else (rows if i == 0 else 1) for i, d in enumerate(meta.shape)]
        if meta.datatype == "BYTES":
            out[meta.name] = np.full(shape, b"", dtype=object)
        else:
            out[meta.name] = np.zeros(shape, dtype=DATATYPES[meta.datatype])
    return out


def profile_batches(
    slice_: LoadedSlice, batch_sizes: Sequence[int], repeats: int
) -> dict[int, float]:
    """Return the median measured seconds per batch for each batch size the model accepts."""
    profile: dict[int, float] = {}
    sizes = batch_sizes if slice_.batchable else [1]
    last_error = ""
    for rows in sizes:
        feed = synthetic_inputs(slice_.inputs, rows)
        try:
            slice_.executor.run(feed)  # warm-up: first runs allocate
            times = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                slice_.executor.run(feed)
                times.append(time.perf_counter() - t0)
        except GpuvisorError as exc:
            if not profile and is_out_of_memory(exc.message.encode()):
                # not even the smallest batch fits in memory: the slice could serve nothing
                raise ModelError(
                    f"the model ran out of memory running a batch of {rows} while loading: "
                    f"{exc.message}"
                ) from exc
            # synthetic inputs a model rejects (values out of its range, say) say nothing
            # about real requests: that size goes unprofiled
            log.debug("profiling %s at batch %d failed: %s", slice_.spec.slice_id, rows, exc)
            last_error = exc.message
            continue
        profile[rows] = statistics.median(times)
    if not profile and last_error:
        log.warning(
            "slice %s: every run of the model at load failed (last: %s); it serves, but its "
            "requests may fail the same way, and the dispatcher predicts nothing for it",
            slice_.spec.slice_id,
            last_error,
        )
    return profile


def _rows_of(request: InferRequest, batchable: bool) -> int:
    if not batchable or not request.inputs:
        return 1
    # the largest first dimension: a model that broadcasts a 1-row input runs the others' rows
    return max((int(a.shape[0]) for a in request.inputs.values() if a.ndim), default=1)


def _batch_key(request: InferRequest, rows: int) -> tuple[object, ...] | None:
    """What requests must share to run in one batch: each input's dtype and shape past the
    first dimension. None when the request must run alone: an input without a first
    dimension, or one whose first dimension is not the request's rows (a model that
    broadcasts would take it alone, but merged, its rows would pair with another request's)."""
    if any(arr.ndim == 0 or arr.shape[0] != rows for arr in request.inputs.values()):
        return None
    return tuple(
        (name, arr.dtype.str, arr.shape[1:]) for name, arr in sorted(request.inputs.items())
    )


def run_requests(
    loaded: LoadedSlice, headers: Sequence[p.RequestHeader], bodies: Sequence[memoryview]
) -> tuple[list[p.RequestResult], list[bytes]]:
    """Decode, run (batched where shapes allow), and encode each request; errors stay per request.

    Returns one result and one payload per header. A batch whose bodies do not match its
    headers one for one runs nothing: which body belongs to which request cannot be trusted,
    so every request of it is answered 500.
    """
    n = len(headers)
    if len(bodies) != n:
        problem = f"the batch carried {len(bodies)} bodies for {n} requests"
        log.warning("slice %s: %s; none of them runs", loaded.spec.slice_id, problem)
        results = [p.RequestResult(h.request_id, 500, -1, 0) for h in headers]
        return results, [encode_error(problem, "internal") for _ in headers]
    statuses: list[int] = [200] * n
    payloads: list[bytes] = [b""] * n
    header_lengths: list[int] = [-1] * n
    row_counts: list[int] = [0] * n
    decoded: dict[int, InferRequest] = {}
    for i, (header, body) in enumerate(zip(headers, bodies)):
        try:
            request = decode_infer_request(
                bytes(body),
                header.header_length if header.header_length >= 0 else None,
                loaded.inputs,
                loaded.outputs,
            )
        except GpuvisorError as exc:
            statuses[i], payloads[i] = exc.http_status, encode_error(exc.message, exc.code)
            continue
        except Exception as exc:  # a decoder bug, or no memory: this request only, not the worker
            log.exception("slice %s: decoding request %s failed", loaded.spec.slice_id, i)
            statuses[i], payloads[i] = 500, encode_error(_unexpected("decode", exc), "internal")
            continue
        decoded[i] = request
        row_counts[i] = _rows_of(request, loaded.batchable)

    groups: dict[tuple[object, ...], list[int]] = {}
    for i, request in decoded.items():
        key = _batch_key(request, row_counts[i]) if loaded.batchable else None
        groups.setdefault(("solo", i) if key is None else key, []).append(i)

    max_rows = max(1, loaded.spec.max_batch_size)
    for members in groups.values():
        chunk: list[int] = []
        chunk_rows = 0
        for i in members:
            if chunk and chunk_rows + row_counts[i] > max_rows:
                _run_chunk(loaded, chunk, decoded, row_counts, statuses, payloads, header_lengths)
                chunk, chunk_rows = [], 0
            chunk.append(i)
            chunk_rows += row_counts[i]
        if chunk:
            _run_chunk(loaded, chunk, decoded, row_counts, statuses, payloads, header_lengths)

    results = [
        p.RequestResult(h.request_id, statuses[i], header_lengths[i], row_counts[i])
        for i, h in enumerate(headers)
    ]
    return results, payloads


def _run_chunk(
    loaded: LoadedSlice,
    chunk: list[int],
    decoded: dict[int, InferRequest],
    row_counts: list[int],
    statuses: list[int],
    payloads: list[bytes],
    header_lengths: list[int],
) -> None:
    requests = [decoded[i] for i in chunk]
    try:
        if len(requests) == 1:
            outputs_per_request = [loaded.executor.run(requests[0].inputs)]
        else:
            feed = {
                name: np.concatenate([r.inputs[name] for r in requests], axis=0)
                for name in requests[0].inputs
            }
            merged = loaded.executor.run(feed)
            total = sum(row_counts[i] for i in chunk)
            if any(v.ndim == 0 or v.shape[0] != total for v in merged.values()):
                # an output not batched along the first dimension (a reduction over the
                # batch, say) cannot be split back into the requests' rows: each runs alone
                for i in chunk:
                    _run_chunk(loaded, [i], decoded, row_counts, statuses, payloads, header_lengths)
                return
            outputs_per_request = []
            offset = 0
            for i in chunk:
                rows = row_counts[i]
                outputs_per_request.append(
                    {k: v[offset : offset + rows] for k, v in merged.items()}
                )
                offset += rows
    except GpuvisorError as exc:
        if len(chunk) > 1:
            # One bad request must not fail its batch-mates: run each alone to isolate it.
            for i in chunk:
                _run_chunk(loaded, [i], decoded, row_counts, statuses, payloads, header_lengths)
            return
        if exc.http_status == 500 and loaded.batchable:
            exc = _rows_disagree(requests[0], exc)
        statuses[chunk[0]], payloads[chunk[0]] = (
            exc.http_status,
            encode_error(exc.message, exc.code),
        )
        return
    for i, request, results in zip(chunk, requests, outputs_per_request):
        try:
            body, header_length = encode_infer_response(
                loaded.spec.model_name, loaded.spec.model_version, request, results, loaded.outputs
            )
        except GpuvisorError as exc:
            statuses[i], payloads[i] = exc.http_status, encode_error(exc.message, exc.code)
            continue
        except Exception as exc:  # an encoder bug, or no memory: this request only
            log.exception(
                "slice %s: encoding the answer of request %s failed", loaded.spec.slice_id, i
            )
            statuses[i], payloads[i] = 500, encode_error(_unexpected("encode", exc), "internal")
            continue
        payloads[i] = body
        header_lengths[i] = header_length if header_length is not None else -1


def _rows_disagree(request: InferRequest, failed: GpuvisorError) -> GpuvisorError:
    """A request whose inputs disagree on their first dimension (the batch) that the model
    could not run is the request's fault, as Triton says: 400 naming the inputs' rows."""
    rows = {name: arr.shape[0] for name, arr in request.inputs.items() if arr.ndim}
    if len(set(rows.values())) < 2:
        return failed
    each = ", ".join(f"{name}: {n}" for name, n in sorted(rows.items()))
    return InvalidRequest(
        f"the inputs disagree on their first dimension, the batch ({each} rows), and the "
        f"model could not run them: {failed.message}. Send the same number of rows in each "
        "input"
    )


def _unexpected(step: str, exc: Exception) -> str:
    what = "the worker ran out of memory" if isinstance(exc, MemoryError) else "unexpected error"
    return f"could not {step} this request: {what} ({type(exc).__name__}: {exc})"
