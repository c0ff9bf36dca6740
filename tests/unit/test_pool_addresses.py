"""Triton pool addresses (one Triton, a DNS name's every address, a fixed list) and a pool none of whose replicas
answers; the replicas themselves are real tritonservers in tests/integration/test_triton_replicas.py."""
from __future__ import annotations

import time

import pytest
from margin.cluster.processes import free_port
from margin.common.config import ConfigError
from margin.common.errors import Unavailable
from margin.inference.pools import parse_triton_urls
from margin.inference.replicas import TritonReplicas, parse_pool_address
from margin.inference.triton_client import RawTensor


@pytest.mark.parametrize(("text", "kind", "addresses"), [
    ("triton-cpu:8001", "single", ("triton-cpu:8001",)),
    ("127.0.0.1:8001", "single", ("127.0.0.1:8001",)),
    ("[::1]:8001", "single", ("[::1]:8001",)),
    ("ipv4:10.0.0.1:8001,10.0.0.2:8001", "static", ("10.0.0.1:8001", "10.0.0.2:8001")),
    ("ipv4:127.0.0.1:1, 127.0.0.1:2", "static", ("127.0.0.1:1", "127.0.0.1:2")),
    ("ipv6:[fd00::1]:8001,[fd00::2]:9001", "static", ("[fd00::1]:8001", "[fd00::2]:9001")),
])
def test_single_and_fixed_list_addresses(text, kind, addresses):
    address = parse_pool_address(text)
    assert (address.kind, address.addresses) == (kind, addresses)
    assert address.resolve() == list(addresses)


def test_a_dns_name_resolves_to_every_address_on_the_port():
    address = parse_pool_address("dns:///localhost:8001")
    assert (address.kind, address.host, address.port) == ("dns", "localhost", 8001)
    assert "127.0.0.1:8001" in address.resolve()
    assert parse_pool_address("dns:///no-such-pool.invalid:8001").resolve() == []  # no replica, not an error


@pytest.mark.parametrize(("text", "fragment"), [
    ("dns://10.0.0.10/triton:8001", "a DNS server authority is not supported"),
    ("dns:///triton", "needs host:port"),
    ("dns:///triton:http", "'http' is not a port"),
    ("ipv4:triton-a:8001", "'triton-a' is not an IPv4 address"),
    ("ipv4:10.0.0.1:8001,10.0.0.1:8001", "lists a replica twice"),
    ("ipv6:10.0.0.1:8001", "is not an IPv6 address"),
    ("ipv4:10.0.0.1:70000", "is not a port"),
    ("http://triton:8001", "use host:port, dns:///host:port or ipv4:a:p,b:q"),
    ("a:1,b:2", "use host:port"),
    ("triton", "needs host:port"),
])
def test_malformed_addresses_say_what_is_wrong(text, fragment):
    with pytest.raises(ConfigError, match="Triton pool address") as info:
        parse_pool_address(text)
    assert fragment in str(info.value)


def test_triton_urls_name_the_class_whose_address_is_malformed():
    assert parse_triton_urls('{"cpu": "dns:///triton-cpu:8001"}') == {"cpu": "dns:///triton-cpu:8001"}
    with pytest.raises(ConfigError, match=r"MARGIN_TRITON_URLS, device class 'nvidia-l4': .*not an IPv4 address"):
        parse_triton_urls('{"cpu": "triton-cpu:8001", "nvidia-l4": "ipv4:triton-l4:8001"}')


def test_a_pool_whose_replicas_do_not_answer_is_unavailable_at_once():
    pool = TritonReplicas(f"ipv4:127.0.0.1:{free_port()},127.0.0.1:{free_port()}")
    try:
        assert pool.probe() == [] and pool.live == () and not pool.server_ready()
        with pytest.raises(Unavailable, match="no replica answered \\(load m\\)"):
            pool.load("m")
        with pytest.raises(Unavailable):
            pool.replica()
        start = time.monotonic()
        with pytest.raises(Unavailable):
            pool.infer("m", [RawTensor("input", "FP32", (1,), bytes(4))], ["out"])
        assert time.monotonic() - start < 2.0
        assert not pool.model_ready("m")
    finally:
        pool.close()


def test_a_name_that_resolves_to_nothing_has_no_replica_to_load_on():
    pool = TritonReplicas("dns:///triton.invalid:8001", resolve=lambda: [])
    with pytest.raises(Unavailable, match="resolves to no replica"):
        pool.unload("m")


def test_replicas_follow_the_name_as_it_resolves():
    """Replicas the name stops resolving to are dropped (their channels closed); new ones are added."""
    answers = [["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:2", "127.0.0.1:3"]]
    pool = TritonReplicas("dns:///triton:8001", refresh_s=0, resolve=lambda: answers[0])
    try:
        first = pool.members()
        assert [c.url for c in first] == ["127.0.0.1:1", "127.0.0.1:2"]
        answers.pop(0)
        second = pool.members()
        assert [c.url for c in second] == ["127.0.0.1:2", "127.0.0.1:3"]
        assert second[0] is first[1]  # a replica that stays keeps its channel
    finally:
        pool.close()
