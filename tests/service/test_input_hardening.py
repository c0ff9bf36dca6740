"""Input a client controls never reaches INTERNAL: out-of-range times, non-finite numbers, overflowing durations and
names that are not whole safe strings are INVALID_ARGUMENT naming the field (budget + registry over real gRPC)."""
from __future__ import annotations

import hashlib
import io
import time

import grpc
import pytest
import torch
from google.protobuf import timestamp_pb2
from margin.budget import seed
from margin.common.config import ConfigError
from margin.common.errors import InvalidArgument
from margin.inference.deployments import DeploymentManager, DeploySpec
from margin.sdk import connect
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2, registry_pb2

YEAR_10000 = 253_402_300_800  # the first second a Timestamp cannot hold
BAD_TIMES = {"nanos 1e9": timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=1_000_000_000),
             "negative nanos": timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=-1),
             "year 10000": timestamp_pb2.Timestamp(seconds=YEAR_10000),
             "before year 1": timestamp_pb2.Timestamp(seconds=-62_135_596_801)}
BAD_NAMES = ["x\n", "x\r\n", "x\t", "x\x00", "x\x7f", "x\u0085"]


def torchscript() -> bytes:
    """A real TorchScript archive (what any format check accepts)."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), buffer)
    return buffer.getvalue()


def budgets(cluster, key: str) -> tuple[budget_pb2_grpc.BudgetsStub, tuple]:
    conn = connect(cluster.budget.server.address, key)
    return budget_pb2_grpc.BudgetsStub(conn.channel), conn.metadata


def refused(call) -> str:
    """The details of a call that must answer INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    return info.value.details()


@pytest.mark.parametrize("case", list(BAD_TIMES))
def test_an_out_of_range_timestamp_is_invalid_argument_naming_the_field(cluster, case):
    bad = BAD_TIMES[case]
    tenant, md = budgets(cluster, cluster.keys["acme"])
    assert "since" in refused(lambda: tenant.ListLedger(budget_pb2.ListLedgerRequest(since=bad), metadata=md))
    assert "until" in refused(lambda: tenant.ListLedger(budget_pb2.ListLedgerRequest(until=bad), metadata=md))
    assert "until" in refused(lambda: tenant.GetSpend(budget_pb2.GetSpendRequest(until=bad), metadata=md))
    admin, amd = budgets(cluster, cluster.admin_key)
    entry = budget_pb2.LedgerEntry(id="e1", tenant="acme", category=budget_pb2.SPEND_CATEGORY_TRAINING,
                                   amount=common_pb2.Money(currency="USD", micros=5), time=bad)
    assert "e1.time" in refused(lambda: admin.RecordSpend(budget_pb2.RecordSpendRequest(entries=[entry]),
                                                          metadata=amd))
    assert "interval_start" in refused(lambda: admin.ReportFleet(budget_pb2.ReportFleetRequest(
        interval_start=bad, interval_end=timestamp_pb2.Timestamp(seconds=1_700_000_000)), metadata=amd))


@pytest.mark.parametrize("ttl", [2**62, 10**12, 20 * 366 * 86_400])
def test_a_key_lifetime_beyond_ten_years_is_invalid_argument(cluster, ttl):
    admin, md = budgets(cluster, cluster.admin_key)
    details = refused(lambda: admin.CreateApiKey(budget_pb2.CreateApiKeyRequest(tenant="acme", ttl_seconds=ttl),
                                                 metadata=md))
    assert "ttl_seconds" in details and "10 years" in details
    assert admin.CreateApiKey(budget_pb2.CreateApiKeyRequest(tenant="acme", ttl_seconds=9 * 365 * 86_400),
                              metadata=md).api_key.HasField("expire_time")


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_number_in_an_uploaded_architecture_is_invalid_argument(cluster, number):
    client = cluster.client()
    client.create_model("m")
    arch = {"family": "mlp", "input_dim": 64, "hidden": [32, number], "num_classes": 10}
    for field in ("architecture", "recipe"):
        meta = registry_pb2.UploadMetadata(model="m", format=registry_pb2.ARTIFACT_FORMAT_ONNX)
        getattr(meta, field).update(arch)
        details = refused(lambda meta=meta: client.upload_bytes(b"\x08\x07", meta))
        assert f"metadata.{field}.hidden[1]" in details and "finite" in details


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_with_a_control_character_is_refused_for_every_kind(cluster, name):
    admin, amd = budgets(cluster, cluster.admin_key)
    assert "tenant name" in refused(lambda: admin.CreateTenant(budget_pb2.CreateTenantRequest(name=name),
                                                               metadata=amd))
    assert "price_list.entries.model" in refused(lambda: admin.SetPriceList(budget_pb2.SetPriceListRequest(
        price_list=budget_pb2.PriceList(entries=[budget_pb2.PriceListEntry(
            model=name, per_million=common_pb2.Money(currency="USD", micros=1))])), metadata=amd))
    client = cluster.client()
    assert "model name" in refused(lambda: client.create_model(name))
    assert "label key" in refused(lambda: client.create_model("ok", labels={name: "v"}))
    client.create_model("m")
    client.upload_bytes(torchscript(), registry_pb2.UploadMetadata(model="m",
                                                                   format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT))
    assert "alias" in refused(lambda: client.stub.SetAlias(registry_pb2.SetAliasRequest(
        model="m", alias=name, number=1), metadata=client.metadata))
    assert "metric name" in refused(lambda: client.stub.AttachMetrics(registry_pb2.AttachMetricsRequest(
        version=common_pb2.VersionRef(model="m", number=1), metrics={name: 1.0}), metadata=client.metadata))
    names = [m.name for m in client.stub.ListModels(registry_pb2.ListModelsRequest(),
                                                    metadata=client.metadata).models]
    assert names == ["m"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_with_a_control_character_is_refused_in_budgets_files_deployments_and_fleet_pools(cluster, name):
    assert "tenant name" in str(refused_config(
        lambda: seed.parse(f'- {{name: "{name.encode("unicode_escape").decode()}", period: monthly, total: 1}}\n',
                           "budgets.yaml")))
    with pytest.raises(InvalidArgument, match="model name"):
        DeploymentManager._check_spec(DeploySpec(model=name, number=1, alias="", device_class="cpu"))
    admin, md = budgets(cluster, cluster.admin_key)
    start = timestamp_pb2.Timestamp(seconds=int(time.time()) - 2)
    end = timestamp_pb2.Timestamp(seconds=start.seconds + 1)
    for pool, replica in ((f"triton/{name}", ""), ("worker/train.cpu", f"host/{name}")):
        report = budget_pb2.ReportFleetRequest(interval_start=start, interval_end=end, observer="t", pools=[
            budget_pb2.FleetPool(pool=pool, replica=replica, kind="serving" if not replica else "worker",
                                 device_class="cpu", replica_us=1_000_000, replicas=1)])
        assert "control character" in refused(lambda report=report: admin.ReportFleet(report, metadata=md))


def refused_config(call) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call()
    return info.value


def test_a_window_ending_in_the_last_period_a_timestamp_can_hold_is_answered(cluster):
    """No since: the window starts at the budget period holding ``until`` — December 9999's ends at the end of time."""
    last = timestamp_pb2.Timestamp(seconds=YEAR_10000 - 1)
    tenant, md = budgets(cluster, cluster.keys["acme"])
    tenant.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_MARGIN, until=last), metadata=md)
    admin, amd = budgets(cluster, cluster.admin_key)
    admin.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_FLEET, until=last), metadata=amd)
    admin.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
        tenant="acme", period=budget_pb2.BUDGET_PERIOD_DAILY, total=common_pb2.Money(currency="USD", micros=10))),
        metadata=amd)
    tenant.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_MARGIN, until=last), metadata=md)


def test_a_ledger_amount_that_would_overflow_the_period_sums_is_invalid_argument(cluster):
    admin, amd = budgets(cluster, cluster.admin_key)

    def entry(i: int, micros: int = 1, quantity: int = 0) -> budget_pb2.LedgerEntry:
        return budget_pb2.LedgerEntry(id=f"big-{i}", tenant="acme", category=budget_pb2.SPEND_CATEGORY_TRAINING,
                                      amount=common_pb2.Money(currency="USD", micros=micros), quantity=quantity)
    for bad in (entry(1, micros=2**63 - 1), entry(2, quantity=2**63 - 1), entry(3, quantity=-1)):
        assert f"entry {bad.id}" in refused(lambda bad=bad: admin.RecordSpend(
            budget_pb2.RecordSpendRequest(entries=[bad]), metadata=amd))
    admin.RecordSpend(budget_pb2.RecordSpendRequest(entries=[entry(4, micros=10**15), entry(5, micros=10**15)]),
                      metadata=amd)
    tenant, md = budgets(cluster, cluster.keys["acme"])
    assert tenant.GetSpend(budget_pb2.GetSpendRequest(), metadata=md).spent.micros == 2 * 10**15


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_double_in_a_request_is_invalid_argument_naming_it(cluster, number):
    client = cluster.client()
    client.create_model("m")
    meta = registry_pb2.UploadMetadata(model="m", format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                                       cost=common_pb2.Cost(total=common_pb2.Money(currency="USD", micros=1),
                                                            device_hours=number))
    assert "metadata.cost.device_hours" in refused(lambda: client.upload_bytes(torchscript(), meta))
    admin, md = budgets(cluster, cluster.admin_key)
    start = timestamp_pb2.Timestamp(seconds=int(time.time()) - 2)
    report = budget_pb2.ReportFleetRequest(
        interval_start=start, interval_end=timestamp_pb2.Timestamp(seconds=start.seconds + 1), observer="t",
        pools=[budget_pb2.FleetPool(pool="triton/p", kind="serving", device_class="cpu", replica_us=1_000_000,
                                    replicas=1, deployments=[budget_pb2.FleetDeployment(
                                        tenant="acme", deployment="m-v1", model="m", version=1, triton_name="t--m-v1",
                                        state="READY", capacity_rps=number)])])
    assert "capacity_rps" in refused(lambda: admin.ReportFleet(report, metadata=md))


def test_a_digest_with_a_trailing_newline_is_refused(cluster):
    client = cluster.client()
    client.create_model("m")
    data = torchscript()
    meta = registry_pb2.UploadMetadata(model="m", format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                                       sha256=hashlib.sha256(data).hexdigest() + "\n", size_bytes=len(data))
    requests = iter([registry_pb2.UploadVersionRequest(metadata=meta), registry_pb2.UploadVersionRequest(chunk=data)])
    assert "64-character" in refused(lambda: client.stub.UploadVersion(requests, metadata=client.metadata))
