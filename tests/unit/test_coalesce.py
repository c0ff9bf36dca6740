"""The coalescer's core on an event loop: its ``send`` here is a real computation on the rows (each output row is
its input row times two plus the row's sum), gated so a test can hold calls in flight — no Triton involved; the
integration tests (tests/integration/test_oip.py) drive it through a real tritonserver."""
from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
from margin.common.errors import FailedPrecondition, Unavailable
from margin.inference.coalesce import Coalescer, bytes_element_bounds, concatenate, split
from margin.inference.triton_client import RawTensor

MAX_ROWS = 8
POISON = -999.0  # a value the "model" refuses (as Triton refuses what validation cannot see)


class Upstream:
    """What the coalescer sends to: computes each row's output; holds every call until ``gate`` is set."""

    def __init__(self) -> None:
        self.calls: list[list[RawTensor]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_with: Exception | None = None

    async def send(self, inputs, outputs):
        self.calls.append(list(inputs))
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        x = np.frombuffer(inputs[0].raw, dtype=np.float32).reshape(inputs[0].shape)
        if (x == POISON).any():
            raise FailedPrecondition("the model refused a row")
        y = x * 2 + x.sum(axis=1, keepdims=True)
        return [RawTensor(name, "FP32", y.shape, y.astype(np.float32).tobytes()) for name in outputs]


def rows(n: int, start: float, width: int = 3) -> list[RawTensor]:
    x = (np.arange(n * width, dtype=np.float32).reshape(n, width) + start)
    return [RawTensor("x", "FP32", x.shape, x.tobytes())]


def expected(tensors: list[RawTensor]) -> np.ndarray:
    x = np.frombuffer(tensors[0].raw, dtype=np.float32).reshape(tensors[0].shape)
    return x * 2 + x.sum(axis=1, keepdims=True)


def values(out: list[RawTensor]) -> np.ndarray:
    return np.frombuffer(out[0].raw, dtype=np.float32).reshape(out[0].shape)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def test_a_lone_request_goes_at_once_as_it_is():
    async def main():
        up, c = Upstream(), Coalescer()
        req = rows(2, 0)
        out = await c.infer("d", up.send, req, ["y"], 2, MAX_ROWS)
        assert up.calls == [req] and np.array_equal(values(out), expected(req))
        assert c.stats().upstream == 1 and c.stats().coalesced == 0
    run(main())


def test_requests_waiting_behind_a_full_lane_share_one_call_and_get_their_own_rows():
    async def main():
        up, c = Upstream(), Coalescer()
        up.gate.clear()
        first = asyncio.create_task(c.infer("d", up.send, rows(1, 0), ["y"], 1, MAX_ROWS))
        await settle()
        waiting = [rows(n, 100 * (i + 1)) for i, n in enumerate((1, 3, 2))]
        tasks = [asyncio.create_task(c.infer("d", up.send, r, ["y"], r[0].shape[0], MAX_ROWS)) for r in waiting]
        await settle()
        assert len(up.calls) == 1  # the lane is full: the others wait
        up.gate.set()
        await first
        outs = await asyncio.gather(*tasks)
        assert len(up.calls) == 2 and up.calls[1][0].shape == (6, 3)
        for r, out in zip(waiting, outs, strict=True):
            assert out[0].shape == r[0].shape and np.array_equal(values(out), expected(r))
        assert c.stats().coalesced == 3 and c.stats().requests == 4
    run(main())


def test_only_requests_that_can_share_a_batch_do():
    """Different non-batch dims, different outputs, or more rows than max_batch_size: separate calls."""
    async def main():
        up, c = Upstream(), Coalescer()
        up.gate.clear()
        blocker = asyncio.create_task(c.infer("d", up.send, rows(1, 0), ["y"], 1, MAX_ROWS))
        await settle()
        reqs = [(rows(5, 1), ["y"]), (rows(2, 2, width=4), ["y"]), (rows(1, 3), ["y", "z"]), (rows(4, 4), ["y"])]
        tasks = [asyncio.create_task(c.infer("d", up.send, r, o, r[0].shape[0], MAX_ROWS)) for r, o in reqs]
        await settle()
        up.gate.set()
        await blocker
        outs = await asyncio.gather(*tasks)
        for (r, o), out in zip(reqs, outs, strict=True):
            assert [t.name for t in out] == o and np.array_equal(values(out), expected(r))
        assert all(call[0].shape[0] <= MAX_ROWS for call in up.calls)
        assert len(up.calls) == 5  # 5 + 4 rows exceed 8; the width-4 and two-output requests go alone
    run(main())


def test_unbatched_deployments_never_coalesce():
    async def main():
        up, c = Upstream(), Coalescer()
        up.gate.clear()
        tasks = [asyncio.create_task(c.infer("d", up.send, rows(1, i), ["y"], 1, 0)) for i in range(4)]
        await settle()
        up.gate.set()
        await asyncio.gather(*tasks)
        assert len(up.calls) == 4 and c.stats().coalesced == 0
    run(main())


def test_a_refused_batch_is_retried_one_by_one_so_only_the_bad_request_fails():
    async def main():
        up, c = Upstream(), Coalescer()
        up.gate.clear()
        blocker = asyncio.create_task(c.infer("d", up.send, rows(1, 0), ["y"], 1, MAX_ROWS))
        await settle()
        bad = [RawTensor("x", "FP32", (1, 3), np.full((1, 3), POISON, dtype=np.float32).tobytes())]
        reqs = [rows(1, 10), bad, rows(2, 20)]
        tasks = [asyncio.create_task(c.infer("d", up.send, r, ["y"], r[0].shape[0], MAX_ROWS)) for r in reqs]
        await settle()
        up.gate.set()
        await blocker
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[1], FailedPrecondition)
        assert np.array_equal(values(results[0]), expected(reqs[0]))
        assert np.array_equal(values(results[2]), expected(reqs[2]))
    run(main())


def test_an_outage_reaches_every_request_of_the_batch_and_the_lane_recovers():
    async def main():
        up, c = Upstream(), Coalescer()
        up.gate.clear()
        blocker = asyncio.create_task(c.infer("d", up.send, rows(1, 0), ["y"], 1, MAX_ROWS))
        await settle()
        tasks = [asyncio.create_task(c.infer("d", up.send, rows(1, i), ["y"], 1, MAX_ROWS)) for i in range(3)]
        await settle()
        up.fail_with = Unavailable("Triton is unreachable")
        up.gate.set()
        results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        assert all(isinstance(r, Unavailable) for r in results)
        up.fail_with = None
        out = await c.infer("d", up.send, rows(1, 5), ["y"], 1, MAX_ROWS)
        assert np.array_equal(values(out), expected(rows(1, 5)))
    run(main())


def test_a_caller_that_gave_up_is_skipped():
    async def main():
        up, c = Upstream(), Coalescer()
        up.gate.clear()
        blocker = asyncio.create_task(c.infer("d", up.send, rows(1, 0), ["y"], 1, MAX_ROWS))
        await settle()
        gone = asyncio.create_task(c.infer("d", up.send, rows(2, 7), ["y"], 2, MAX_ROWS))
        stays = asyncio.create_task(c.infer("d", up.send, rows(1, 9), ["y"], 1, MAX_ROWS))
        await settle()
        gone.cancel()
        up.gate.set()
        await blocker
        assert np.array_equal(values(await stays), expected(rows(1, 9)))
        assert up.calls[-1][0].shape == (1, 3)  # only the request still waiting went up
    run(main())


def test_bytes_rows_concatenate_and_split_back():
    def encode(items):
        return b"".join(struct.pack("<I", len(v)) + v for v in items)
    a = [RawTensor("s", "BYTES", (2, 1), encode([b"ab", b""]))]
    b = [RawTensor("s", "BYTES", (1, 1), encode([b"xyz"]))]
    merged = concatenate([a, b])
    assert merged[0].shape == (3, 1) and merged[0].raw == encode([b"ab", b"", b"xyz"])
    parts = split(merged, [2, 1])
    assert parts[0][0].raw == a[0].raw and parts[1][0].raw == b[0].raw and parts[1][0].shape == (1, 1)


@pytest.mark.parametrize("raw", [b"\x05\x00\x00\x00ab", b"\x01\x00\x00\x00a\x00", b"\x01\x00"])
def test_malformed_bytes_data_is_refused(raw):
    with pytest.raises(ValueError):
        bytes_element_bounds(raw, 1)


def test_an_output_without_the_batch_rows_is_a_clear_error():
    with pytest.raises(FailedPrecondition):
        split([RawTensor("y", "FP32", (2, 3), bytes(24))], [1, 2])


def test_a_slow_model_is_not_held_back_so_tritons_own_batcher_keeps_it_fed():
    """Deploy measured it at 50 ms a request: its requests go on at once, none waits at the gateway."""
    async def main():
        up, c = Upstream(), Coalescer()
        up.gate.clear()
        tasks = [asyncio.create_task(c.infer("d", up.send, rows(1, i), ["y"], 1, MAX_ROWS, model_ms=50.0))
                 for i in range(4)]
        await settle()
        assert len(up.calls) == 4  # all four on their way while none has come back
        up.gate.set()
        await asyncio.gather(*tasks)
        assert c.stats().coalesced == 0
    run(main())


def test_a_lane_has_a_call_in_flight_per_model_instance_and_replica():
    async def main():
        up, c = Upstream(), Coalescer()
        up.gate.clear()
        tasks = [asyncio.create_task(c.infer("d", up.send, rows(1, i), ["y"], 1, MAX_ROWS, slots=3))
                 for i in range(6)]
        await settle()
        assert len(up.calls) == 3  # three slots busy, the other three wait to share the next call
        up.gate.set()
        await asyncio.gather(*tasks)
        assert len(up.calls) == 4 and c.stats().coalesced == 3
    run(main())
