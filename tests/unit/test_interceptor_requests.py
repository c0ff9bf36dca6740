"""The interceptor's request checks: a request that does not parse becomes an Undecodable (never grpc's INTERNAL /
UNKNOWN), a unary one is INVALID_ARGUMENT, and a request stream raises INVALID_ARGUMENT at that message and can be
read on afterwards (a servicer may answer the one bad message and go on)."""
from __future__ import annotations

import asyncio

import pytest
from margin.common.errors import InvalidArgument
from margin.common.interceptor import AioCheckedRequests, CheckedRequests, Undecodable, _decoded, _tolerant
from margin.v1 import common_pb2

GOOD = common_pb2.VersionRef(model="m", number=1)
BAD = Undecodable("margin.v1.VersionRef", "Error parsing message")


def test_a_request_that_does_not_parse_becomes_undecodable_naming_its_type():
    parse = _tolerant(common_pb2.VersionRef.FromString)
    assert parse(GOOD.SerializeToString()) == GOOD
    bad = parse(b"\x0a\xff")
    assert isinstance(bad, Undecodable) and bad.type_name == "margin.v1.VersionRef"
    with pytest.raises(InvalidArgument, match=r"the request is not a valid margin\.v1\.VersionRef"):
        _decoded(bad)
    assert _decoded(GOOD) is GOOD


def test_a_request_stream_raises_at_the_bad_message_and_goes_on():
    requests = CheckedRequests([GOOD, BAD, GOOD])
    assert next(requests) == GOOD
    with pytest.raises(InvalidArgument, match=r"not a valid margin\.v1\.VersionRef"):
        next(requests)
    assert next(requests) == GOOD
    with pytest.raises(StopIteration):
        next(requests)


def test_an_asyncio_request_stream_raises_at_the_bad_message_and_goes_on():
    async def source():
        for item in (GOOD, BAD, GOOD):
            yield item

    async def read() -> list:
        requests, seen = AioCheckedRequests(source()), []
        while True:
            try:
                seen.append(await anext(requests))
            except InvalidArgument as err:
                seen.append(str(err))
            except StopAsyncIteration:
                return seen

    first, error, last = asyncio.run(read())
    assert first == last == GOOD and "not a valid margin.v1.VersionRef" in error
