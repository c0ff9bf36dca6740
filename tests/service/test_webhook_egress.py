"""Budget webhooks go only where the operator allows (issue 14: the webhook was an SSRF into the cluster's loopback).

A real Budgets server on port 0 over SQLite, a real HTTP receiver on 127.0.0.1, and the budget service's own alert
watcher, driven tick by tick. Where a test plays DNS (a public-looking name whose address is loopback when the alert
is sent), it gives the watcher's egress policy its own resolver: the one seam, since no real name can be made to
change its address here."""
from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import grpc
import pytest
from margin.budget.egress import EgressPolicy, Refused, internal_name, why_not_public
from margin.budget.store import Budget, BudgetStore
from margin.sdk import connect
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2
from prometheus_client import REGISTRY

from tests.conftest import running_cluster

TOTAL = 1_000


class Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((self.headers["Host"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def receiver() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 (what Triton's HTTP API, or any other internal endpoint, is to the probe)."""
    Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def start_cluster(tmp_path, monkeypatch, allow: str = ""):
    monkeypatch.setenv("MARGIN_BUDGET_ALERT_INTERVAL_SECONDS", "3600")  # the test drives the watcher
    monkeypatch.setenv("MARGIN_WEBHOOK_ALLOW", allow)
    return running_cluster(f"sqlite:///{tmp_path / 'margin.db'}", tmp_path / "artifacts")


def admin(cluster) -> tuple[budget_pb2_grpc.BudgetsStub, tuple]:
    conn = connect(cluster.budget.server.address, cluster.admin_key)
    return budget_pb2_grpc.BudgetsStub(conn.channel), conn.metadata


def set_webhook(cluster, tenant: str, url: str) -> budget_pb2.Budget:
    stub, md = admin(cluster)
    return stub.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
        tenant=tenant, period=budget_pb2.BUDGET_PERIOD_DAILY, total=common_pb2.Money(micros=TOTAL),
        webhook_url=url), webhook_secret="s3cret"), metadata=md)


def cross_half(cluster, tenant: str, entry_id: str = "spent") -> list[float]:
    """Spend half the budget and run one tick of the budget service's watcher: the thresholds it sent."""
    stub, md = admin(cluster)
    stub.RecordSpend(budget_pb2.RecordSpendRequest(entries=[budget_pb2.LedgerEntry(
        id=entry_id, tenant=tenant, category=budget_pb2.SPEND_CATEGORY_SERVING,
        amount=common_pb2.Money(micros=TOTAL // 2))]), metadata=md)
    return [a.threshold for a in cluster.budget.spec.extra["alerts"].check_once() if a.tenant == tenant]


def refused(tenant: str) -> float:
    return REGISTRY.get_sample_value("margin_budget_webhooks_refused_total", {"tenant": tenant}) or 0.0


def resolving(names: dict[str, str], calls: list[str] | None = None):
    """A resolver that answers ``names`` (and nothing else), noting each lookup in ``calls``."""
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in names:
            raise OSError(f"{host}: unknown name")
        return [names[host]]
    return resolve


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "fc00::1", "fd12::1", "169.254.169.254",
    "fe80::1", "100.64.0.1", "224.0.0.1", "ff02::1", "0.0.0.0", "::", "255.255.255.255", "240.0.0.1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1", "2002:a9fe:a9fe::1"])
def test_addresses_that_are_not_public_are_refused(address):
    assert why_not_public(ipaddress.ip_address(address))
    assert EgressPolicy().address_refusal(ipaddress.ip_address(address))


def test_public_addresses_pass_and_internal_names_do_not():
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"):
        assert why_not_public(ipaddress.ip_address(address)) == ""
    for name in ("localhost", "LOCALHOST.", "triton", "margin-triton-cpu.margin.svc", "x.svc.cluster.local",
                 "metadata.google.internal", "printer.local", "a.localhost"):
        assert internal_name(name), name
    assert not internal_name("hooks.example.com")
    policy = EgressPolicy.parse("hooks.corp.example, *.ops.example, 10.20.0.0/16, 127.0.0.1")
    assert policy.host_allowed("hooks.corp.example") and policy.host_allowed("a.b.ops.example")
    assert not policy.host_allowed("ops.example") and not policy.host_allowed("evil.example")
    assert policy.address_refusal(ipaddress.ip_address("10.20.3.4")) == ""
    assert policy.address_refusal(ipaddress.ip_address("127.0.0.1")) == ""
    assert policy.address_refusal(ipaddress.ip_address("127.0.0.2"))
    with pytest.raises(ValueError, match="not/ok"):
        EgressPolicy.parse("not/ok")


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://127.0.0.1:{port}/v2/repository/models/m/unload", "loopback"),
    ("http://[::1]:{port}/hook", "loopback"),
    ("http://localhost:{port}/hook", "cluster-internal"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.7:8000/v2/repository/models/m/unload", "private"),
    ("http://margin-triton-cpu:8000/v2/repository/index", "cluster-internal"),
    ("http://triton.margin.svc.cluster.local:8000/", "cluster-internal"),
    ("gopher://example.com/", "http(s)"),
    ("http://user:pw@example.com/", "credentials"),
])
def test_set_budget_refuses_an_obviously_internal_webhook_naming_the_field(tmp_path, monkeypatch, receiver, url,
                                                                           fragment):
    with start_cluster(tmp_path, monkeypatch) as cluster:
        with pytest.raises(grpc.RpcError) as info:
            set_webhook(cluster, "acme", url.format(port=receiver))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "webhook_url" in info.value.details() and fragment in info.value.details()
        stub, md = admin(cluster)
        assert not stub.GetSpend(budget_pb2.GetSpendRequest(tenant="acme"), metadata=md).HasField("budget")


def test_a_webhook_to_loopback_is_not_sent_by_default_and_the_alert_is_still_recorded(tmp_path, monkeypatch,
                                                                                      receiver):
    with start_cluster(tmp_path, monkeypatch) as cluster:
        # set before the policy existed (or while the operator allowed it): the send-time check is the guard
        sessions = cluster.budget.context.sessions
        tenant = cluster.budget.context.tenants.get_tenant("acme")
        BudgetStore(sessions, egress=EgressPolicy.parse("127.0.0.1")).set_budget(Budget(
            tenant_id=tenant.id, period="daily", total_micros=TOTAL,
            webhook_url=f"http://127.0.0.1:{receiver}/v2/repository/models/m/unload", webhook_secret="s3cret"))
        before = refused("acme")
        assert cross_half(cluster, "acme") == [0.5]  # claimed and logged: the alert is recorded
        assert Receiver.received == []               # but nothing reached the loopback endpoint
        assert refused("acme") == before + 1
        assert cluster.budget.spec.extra["alerts"].check_once() == []  # fired once, not retried


def test_a_webhook_the_operator_allows_is_sent(tmp_path, monkeypatch, receiver):
    with start_cluster(tmp_path, monkeypatch, allow="127.0.0.1") as cluster:
        set_webhook(cluster, "acme", f"http://127.0.0.1:{receiver}/hook")
        assert cross_half(cluster, "acme") == [0.5]
        assert [(host, body["threshold"]) for host, body in Receiver.received] == [(f"127.0.0.1:{receiver}", 0.5)]


def test_a_name_that_resolves_to_loopback_is_refused(tmp_path, monkeypatch, receiver):
    with start_cluster(tmp_path, monkeypatch, allow="10.0.0.0/8") as cluster:
        with pytest.raises(grpc.RpcError) as info:
            set_webhook(cluster, "acme", f"http://localhost:{receiver}/hook")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(Refused, match="localhost"):  # and at send time, whatever a store holds
            EgressPolicy.parse("10.0.0.0/8").pin(f"http://localhost:{receiver}/hook")


def test_a_public_name_that_resolves_to_loopback_when_sent_is_refused(tmp_path, monkeypatch, receiver):
    """DNS rebinding: the name passes SetBudget (no address yet); when the alert is sent it resolves to loopback."""
    with start_cluster(tmp_path, monkeypatch) as cluster:
        set_webhook(cluster, "acme", f"http://hooks.example.com:{receiver}/hook")
        watcher = cluster.budget.spec.extra["alerts"]
        watcher.egress = EgressPolicy.parse("", resolver=resolving({"hooks.example.com": "127.0.0.1"}))
        before = refused("acme")
        assert cross_half(cluster, "acme") == [0.5]
        assert Receiver.received == [] and refused("acme") == before + 1


def test_the_request_goes_to_the_one_address_checked_with_the_names_host_header(tmp_path, monkeypatch, receiver):
    """Allowed by network (127.0.0.1/32), the name is resolved once and the POST goes to that address, as the name."""
    with start_cluster(tmp_path, monkeypatch) as cluster:
        set_webhook(cluster, "acme", f"http://hooks.example.com:{receiver}/hook")
        calls: list[str] = []
        watcher = cluster.budget.spec.extra["alerts"]
        watcher.egress = EgressPolicy.parse("127.0.0.1/32", resolver=resolving({"hooks.example.com": "127.0.0.1"},
                                                                                calls))
        assert cross_half(cluster, "acme") == [0.5]
        assert [(host, body["tenant"]) for host, body in Receiver.received] == [
            (f"hooks.example.com:{receiver}", "acme")]
        assert calls == ["hooks.example.com"]  # resolved once: no second lookup to rebind between check and connect
