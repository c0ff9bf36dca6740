"""Coalescing: the requests waiting for the same deployment go to Triton as one batch.

A Python gateway pays one gRPC round trip — a client call to Triton — per request it forwards, and that round trip
is much of what it costs (BENCHMARKS.md, "Where the microseconds go"). While a deployment already has a call on its
way to Triton for each batch its replicas can execute at once (``per_slot`` × instances × replicas), a new request
waits in that deployment's lane; the moment a call comes back — before its own requests are answered — everything
waiting that can share a batch leaves as one upstream request: the raw rows of each input are concatenated (the
batch dimension first, as Triton's own dynamic batcher does), and the outputs are split back by rows. Nothing waits
when the lane has room: the request is sent at once by its own task, so a lone request pays no added latency. Under
load Triton gets larger batches than direct clients give it, and spends less CPU per request.

A slow model (Deploy measured it over :data:`SLOW_MODEL_MS` at batch 1, less its queue delay) is not held back:
Triton, not the gateway's per-call CPU, limits it, and holding its requests would leave Triton idle between
batches; they go on as they come and Triton's dynamic batcher batches them, as it does a direct client's.

Requests share a batch only when they can: the same inputs (names, dtypes, every dimension but the first), the same
requested outputs, and no more rows together than the deployment's ``max_batch_size``. Each request was validated,
and is metered and answered, on its own; when Triton refuses a coalesced batch (a problem with one request's
values that validation could not see), its requests are sent again one by one, so the error reaches only the
request that has it. An outage (UNAVAILABLE) reaches every request of the batch, as it would have reached each.

The core knows nothing of gRPC: ``send`` is any coroutine taking ``(inputs, outputs)`` and returning the output
tensors.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from margin.common.errors import FailedPrecondition, InvalidArgument
from margin.inference.triton_client import RawTensor

SLOW_MODEL_MS = 5.0  # a model that takes longer than this per request (at batch 1) is not coalesced
UNLIMITED = 1 << 30
Send = Callable[[Sequence[RawTensor], Sequence[str]], Awaitable[list[RawTensor]]]
_LENGTH = struct.Struct("<I")


@dataclass
class _Waiting:
    group: tuple
    inputs: Sequence[RawTensor]
    rows: int
    future: asyncio.Future


@dataclass
class _Lane:
    """One deployment's calls on their way to Triton and the requests waiting for room."""

    in_flight: int = 0
    limit: int = 1
    waiting: deque[_Waiting] = field(default_factory=deque)


@dataclass(frozen=True)
class CoalescingStats:
    requests: int = 0      # requests through the coalescer
    upstream: int = 0      # calls made to Triton for them
    coalesced: int = 0     # requests that shared a call with another


class Coalescer:
    """Per-deployment lanes; each lane has ``per_slot`` upstream calls in flight per slot (a model instance on a
    replica: see :meth:`infer`) before requests wait."""

    def __init__(self, per_slot: int = 1, slow_model_ms: float = SLOW_MODEL_MS):
        if per_slot < 1:
            raise ValueError("per_slot must be at least 1")
        self.per_slot, self.slow_model_ms = per_slot, slow_model_ms
        self._lanes: dict[str, _Lane] = {}
        self._requests = self._upstream = self._coalesced = 0
        self._running: set[asyncio.Task] = set()

    def stats(self) -> CoalescingStats:
        return CoalescingStats(self._requests, self._upstream, self._coalesced)

    async def infer(self, lane_key: str, send: Send, inputs: Sequence[RawTensor], outputs: Sequence[str],
                    rows: int, max_rows: int, slots: int = 1, model_ms: float = 0.0) -> list[RawTensor]:
        """The outputs of ``inputs`` (``rows`` rows, the batch dimension first; ``max_rows`` 0: not batched, sent
        alone). ``outputs`` must be the full list of requested names (as validated); ``lane_key`` names the
        deployment, ``slots`` how many batches its replicas execute at once (instances × replicas), ``model_ms``
        how long one request takes it alone (Deploy's measurement at batch 1)."""
        self._requests += 1
        lane = self._lanes.get(lane_key)
        if lane is None:
            lane = self._lanes[lane_key] = _Lane()
        lane.limit = self.per_slot * max(slots, 1) if model_ms < self.slow_model_ms else UNLIMITED
        if lane.in_flight < lane.limit and not lane.waiting:
            lane.in_flight += 1
            self._upstream += 1
            return await self._call(lane, send, inputs, outputs)
        future = asyncio.get_running_loop().create_future()
        group = (tuple(outputs), max_rows, tuple((t.name, t.datatype, t.shape[1:]) for t in inputs))
        lane.waiting.append(_Waiting(group, inputs, rows if max_rows else 0, future))
        if lane.in_flight < lane.limit:  # room, but others were waiting: they go first, with this one
            self._dispatch(lane, send)
        return await future

    def _dispatch(self, lane: _Lane, send: Send) -> None:
        """Start upstream calls for the waiting requests while the lane has room."""
        while lane.in_flight < lane.limit and lane.waiting:
            batch = self._take(lane)
            if not batch:
                continue
            lane.in_flight += 1
            self._upstream += 1
            if len(batch) > 1:
                self._coalesced += len(batch)
            task = asyncio.get_running_loop().create_task(self._run(lane, send, batch))
            self._running.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._running.discard)

    @staticmethod
    def _take(lane: _Lane) -> list[_Waiting]:
        """The first waiting request and those after it that can share its batch (skipping any that gave up)."""
        first = lane.waiting.popleft()
        if first.future.done():  # its caller went away
            return []
        batch, rows, kept = [first], first.rows, deque()
        max_rows = first.group[1]
        while max_rows and lane.waiting:
            nxt = lane.waiting.popleft()
            if nxt.future.done():
                continue
            if nxt.group == first.group and rows + nxt.rows <= max_rows:
                batch.append(nxt)
                rows += nxt.rows
            else:
                kept.append(nxt)
        kept.extend(lane.waiting)
        lane.waiting = kept
        return batch

    async def _call(self, lane: _Lane, send: Send, inputs: Sequence[RawTensor], outputs: Sequence[str]) \
            -> list[RawTensor]:
        """One upstream call of the lane. The moment Triton answers, the next batch leaves — before this one's
        requests are answered, so that Triton does not wait while the gateway delivers."""
        try:
            return await send(inputs, outputs)
        finally:
            lane.in_flight -= 1
            self._dispatch(lane, send)

    async def _run(self, lane: _Lane, send: Send, batch: list[_Waiting]) -> None:
        outputs = batch[0].group[0]
        if len(batch) == 1:
            await _settle(batch[0].future, self._call(lane, send, batch[0].inputs, outputs))
            return
        try:
            merged = await self._call(lane, send, concatenate([w.inputs for w in batch]), outputs)
            parts = split(merged, [w.rows for w in batch])
        except (FailedPrecondition, InvalidArgument):  # Triton refused the batch: find whose request it was
            await asyncio.gather(*(_settle(w.future, send(w.inputs, outputs)) for w in batch))
            return
        except Exception as err:
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(err)
            return
        for w, part in zip(batch, parts, strict=True):
            if not w.future.done():
                w.future.set_result(part)


async def _settle(future: asyncio.Future, call: Awaitable[list[RawTensor]]) -> None:
    """Complete ``future`` with ``call``'s result or error (unless its caller gave up)."""
    try:
        result = await call
    except Exception as err:
        if not future.done():
            future.set_exception(err)
        return
    if not future.done():
        future.set_result(result)


# -- rows ------------------------------------------------------------------------------------------
def concatenate(requests: Sequence[Sequence[RawTensor]]) -> list[RawTensor]:
    """One request's worth of inputs holding every request's rows, in order (the inputs agree on everything but
    the first dimension)."""
    first = requests[0]
    return [RawTensor(t.name, t.datatype, (sum(r[i].shape[0] for r in requests), *t.shape[1:]),
                      b"".join(r[i].raw for r in requests))
            for i, t in enumerate(first)]


def split(outputs: Sequence[RawTensor], rows: Sequence[int]) -> list[list[RawTensor]]:
    """``outputs`` of a coalesced batch, cut back into each request's rows."""
    total = sum(rows)
    per_request: list[list[RawTensor]] = [[] for _ in rows]
    for tensor in outputs:
        if not tensor.shape or tensor.shape[0] != total:
            raise FailedPrecondition(f"Triton returned {tensor.name!r} with shape {list(tensor.shape)} for a batch of "
                                     f"{total} rows")
        for i, piece in enumerate(_row_slices(tensor, rows)):
            per_request[i].append(RawTensor(tensor.name, tensor.datatype, (rows[i], *tensor.shape[1:]), piece))
    return per_request


def _row_slices(tensor: RawTensor, rows: Sequence[int]) -> list[bytes]:
    view = memoryview(tensor.raw)
    per_row = math.prod(tensor.shape[1:])
    if tensor.datatype == "BYTES":
        bounds = bytes_element_bounds(view, per_row * sum(rows))
        cuts = [0]
        for n in rows:
            cuts.append(cuts[-1] + n * per_row)
        return [bytes(view[bounds[a]:bounds[b]]) for a, b in itertools.pairwise(cuts)]
    if len(view) % max(sum(rows), 1):
        raise FailedPrecondition(f"Triton returned {len(view)} bytes of {tensor.name!r} for {sum(rows)} rows")
    size = len(view) // sum(rows) if rows else 0
    out, at = [], 0
    for n in rows:
        out.append(bytes(view[at:at + n * size]))
        at += n * size
    return out


def bytes_element_bounds(raw: memoryview | bytes, count: int) -> list[int]:
    """The offsets where each of ``count`` BYTES elements starts (and the end), in KServe's raw encoding: each
    element is a 4-byte little-endian length and that many bytes. ValueError when ``raw`` is not exactly that."""
    bounds, at = [0], 0
    for _ in range(count):
        if at + 4 > len(raw):
            raise ValueError(f"BYTES data ends after {len(bounds) - 1} of {count} elements")
        (length,) = _LENGTH.unpack_from(raw, at)
        at += 4 + length
        if at > len(raw):
            raise ValueError(f"BYTES element {len(bounds) - 1} claims {length} bytes past the end of the data")
        bounds.append(at)
    if at != len(raw):
        raise ValueError(f"{len(raw) - at} bytes left over after {count} BYTES elements")
    return bounds
