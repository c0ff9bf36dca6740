"""``margin report fleet|margin``, ``margin prices`` and the deployment tables, in-process (typer's CliRunner) against
real budget and registry servers (port 0, SQLite) with the tenants acme and other.

The fleet's data comes from real ReportFleet calls with the admin key: two metering intervals of 360 s ending in the
recent past, each with a serving pool (two replicas of cpu, acme's and other's digits deployments) and a worker
pool (one cpu replica, half busy with an acme training job). At $0.17 per cpu replica-hour a 360 s interval bills
exactly $0.034 for the serving pool and $0.017 for the worker, so the expected bill needs no rounding."""
from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from margin.cli import compress as compress_cli
from margin.cli import render as render_cli
from margin.cli import reports
from margin.cli.main import app
from margin.common import protoconv
from margin.common.costs import PriceCatalog
from margin.sdk import connect
from margin.sdk.pages import all_pages
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2, compression_pb2, inference_pb2
from rich.console import Console
from typer.testing import CliRunner, Result

runner = CliRunner()
MICROS = 1_000_000
INTERVAL_S = 360
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACME_REQUESTS, OTHER_REQUESTS = 1000, 500  # per interval, through the gateway
ACME_PRICE = 2_000_000  # micros per million requests: $2.00
MONEY = r"-?\$[\d,]+\.\d+"
RECONCILIATION = re.compile(
    rf"fleet (?P<bill>{MONEY}) \(replica-seconds × price\) = tenants (?P<tenants>{MONEY})"
    rf"(?: \(serving (?P<serving>{MONEY}) \+ job time (?P<jobs>{MONEY})\))? \+ platform idle (?P<idle>{MONEY}) — "
    r"(?P<verdict>equal to the micro|NOT equal)")


@pytest.fixture()
def env(cluster, tmp_path: Path) -> Iterator[dict[str, str | None]]:
    """Where the CLI finds the budget service and keys: acme's key by default, the cluster's admin key as the
    admin key; MARGIN_HOME is a fresh folder (no local cluster)."""
    yield {"MARGIN_BUDGET_ADDR": cluster.budget.server.address, "MARGIN_API_KEY": cluster.keys["acme"],
           "MARGIN_ADMIN_KEY": cluster.admin_key, "MARGIN_HOME": str(tmp_path / "home"), "NO_COLOR": "1",
           "MARGIN_INFERENCE_ADDR": None, "MARGIN_REGISTRY_ADDR": cluster.registry.server.address}


def margin(env: dict[str, str | None], *args: str, code: int = 0) -> Result:
    """``margin *args`` in-process; asserts the exit code and that nothing but SystemExit escaped."""
    result = runner.invoke(app, list(args), env=env)
    shown = f"margin {' '.join(args)} -> exit {result.exit_code}\n{result.output}"
    assert result.exit_code == code, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output, shown
    return result


def flat(result: Result) -> str:
    """The output with rich's soft wraps undone (it wraps long lines at spaces, usage errors inside a box)."""
    return " ".join(line.strip().strip("│").strip() for line in result.output.splitlines())


def row(output: str, *first_cells: str) -> list[str]:
    """The cells of the table row whose first cells are ``first_cells``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃|").split("│")]
        if cells[:len(first_cells)] == list(first_cells):
            return cells
    raise AssertionError(f"no table row starting with {first_cells} in:\n{output}")


def micros(text: str) -> int:
    """``$1,234.567891`` → 1234567891."""
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-$").replace(",", "").partition(".")
    return sign * (int(whole) * MICROS + int(frac.ljust(6, "0")))


def budgets(cluster, key: str | None = None) -> tuple[budget_pb2_grpc.BudgetsStub, tuple]:
    conn = connect(cluster.budget.server.address, key or cluster.admin_key)
    return budget_pb2_grpc.BudgetsStub(conn.channel), conn.metadata


def _deployment(tenant: str, triton_name: str, compute_s: int, requests: int) -> budget_pb2.FleetDeployment:
    return budget_pb2.FleetDeployment(
        tenant=tenant, deployment="digits-v1", model="digits", version=1, triton_name=triton_name, state="READY",
        device_class="cpu", compute_ns=compute_s * 10**9, executions=requests // 10, inferences=requests,
        gateway_requests=requests, reserved_replica_us=INTERVAL_S * MICROS, min_replicas=1, max_replicas=2,
        capacity_rps=500.0, price_micros_per_hour=PriceCatalog.load().device("cpu").micros_per_hour)


def report_interval(cluster, end: datetime) -> budget_pb2.ReportFleetResponse:
    """One metering interval ending at ``end``, reported with the admin key as the gateway and a worker would."""
    serving = budget_pb2.FleetPool(
        pool="triton/default", kind="serving", device_class="cpu", replica_us=2 * INTERVAL_S * MICROS, replicas=2,
        deployments=[_deployment("acme", "t1--digits-v1", 36, ACME_REQUESTS),
                     _deployment("other", "t2--digits-v1", 18, OTHER_REQUESTS)])
    worker = budget_pb2.FleetPool(
        pool="worker/train.cpu", kind="worker", device_class="cpu", replica="worker-1", replica_us=INTERVAL_S * MICROS,
        replicas=1, jobs=[budget_pb2.FleetJob(tenant="acme", job_id="job-1", kind="training",
                                              busy_us=INTERVAL_S * MICROS // 2)])
    stub, md = budgets(cluster)
    return stub.ReportFleet(budget_pb2.ReportFleetRequest(
        interval_start=protoconv.timestamp(end - timedelta(seconds=INTERVAL_S)),
        interval_end=protoconv.timestamp(end), pools=[serving, worker], observer="test"), metadata=md)


@pytest.fixture()
def fleet(cluster) -> datetime:
    """Two metering intervals ending 10 s ago; returns the start of the first."""
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=10)
    for i in (1, 0):
        reply = report_interval(cluster, end - timedelta(seconds=i * INTERVAL_S))
        assert (reply.billed, reply.duplicates) == (2, 0)
    return end - timedelta(seconds=2 * INTERVAL_S)


def fleet_view(cluster) -> budget_pb2.FleetView:
    stub, md = budgets(cluster)
    since = datetime.now(UTC) - timedelta(hours=1)
    return stub.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_FLEET,
                                                    since=protoconv.timestamp(since)), metadata=md).fleet


# -- report fleet --------------------------------------------------------------------------------------------------
def test_report_fleet_reconciles_to_the_micro_with_the_ledgers_figures(cluster, env, fleet) -> None:
    result = margin(env, "report", "fleet", "--since", "1h")
    text = flat(result)
    line = RECONCILIATION.search(text)
    assert line, result.output
    assert line["verdict"] == "equal to the micro", result.output

    view = fleet_view(cluster)
    price = PriceCatalog.load().device("cpu").micros_per_hour
    replica_seconds = 2 * (2 * INTERVAL_S + INTERVAL_S)  # two intervals of two serving replicas and one worker
    assert view.bill.micros == replica_seconds * price // 3600 == 102_000  # the bill: replica-seconds × price
    assert micros(line["bill"]) == view.bill.micros
    assert micros(line["tenants"]) == view.tenants.micros + view.jobs.micros
    assert micros(line["serving"]) == view.tenants.micros > 0
    assert micros(line["jobs"]) == view.jobs.micros == 2 * 8_500  # half of each worker interval, acme's job
    assert micros(line["idle"]) == view.platform_idle.micros
    assert micros(line["tenants"]) + micros(line["idle"]) == micros(line["bill"])

    # the figures are the ledger's: the platform's fleet lines sum to the bill, the tenants' alloc: lines to theirs
    stub, md = budgets(cluster)
    ledger = partial(all_pages, partial(stub.ListLedger, metadata=md))
    platform = ledger(budget_pb2.ListLedgerRequest(tenant="_platform", page_size=100), "entries")
    by_category = {c: sum(e.amount.micros for e in platform if e.category == c)
                   for c in (budget_pb2.SPEND_CATEGORY_FLEET, budget_pb2.SPEND_CATEGORY_IDLE,
                             budget_pb2.SPEND_CATEGORY_JOBS)}
    assert by_category[budget_pb2.SPEND_CATEGORY_FLEET] == micros(line["bill"])
    assert by_category[budget_pb2.SPEND_CATEGORY_IDLE] == micros(line["idle"])
    assert by_category[budget_pb2.SPEND_CATEGORY_JOBS] == micros(line["jobs"])
    allocated = sum(e.amount.micros for tenant in ("acme", "other")
                    for e in ledger(budget_pb2.ListLedgerRequest(tenant=tenant, page_size=100), "entries")
                    if e.id.startswith("alloc:"))
    assert allocated == micros(line["serving"])

    serving = row(result.output, "triton/default")
    assert serving[1:4] == ["serving", "cpu", "2"] and serving[4] == f"{2 * 2 * INTERVAL_S:,.1f}", serving
    assert serving[5] == "$0.17" and serving[6] == "$0.068", serving
    worker = row(result.output, "worker/train.cpu")
    assert worker[6:10] == ["$0.034", "$0.017", "$0.017", "50.0%"], worker
    total = row(result.output, "total")
    assert total[6] == "$0.102", total
    assert "acme" in row(result.output, "acme")[0] and "other" in row(result.output, "other")[0]


def test_report_fleet_of_a_window_without_intervals_balances_at_zero(env, fleet) -> None:
    until = (fleet - timedelta(seconds=1)).isoformat()
    result = margin(env, "report", "fleet", "--since", "2h", "--until", until)
    assert "no metering intervals in the window" in result.output, result.output
    line = RECONCILIATION.search(flat(result))
    assert line and line["bill"] == "$0.00" and line["verdict"] == "equal to the micro", result.output
    assert line["serving"] is None, result.output  # no job time: no itemization


def test_a_tenant_key_cannot_run_report_fleet(cluster, env, fleet) -> None:
    result = margin(env, "report", "fleet", "--api-key", cluster.keys["acme"], code=1)
    assert result.output.startswith("PERMISSION_DENIED: "), result.output
    assert "admin key" in flat(result), result.output
    assert "fleet $" not in result.output, result.output


def test_an_unbalanced_fleet_says_not_equal_in_red_and_exits_1(env, monkeypatch: pytest.MonkeyPatch) -> None:
    m = partial(common_pb2.Money, currency="USD")
    view = budget_pb2.FleetView(bill=m(micros=1_500_000), tenants=m(micros=1_000_000), jobs=m(micros=250_000),
                                platform_idle=m(micros=249_999), balanced=False, idle_policy="usage")
    line = reports.reconciliation_line(view)
    assert "[bold red]NOT equal[/]" in line and "equal to the micro" not in line, line
    assert "fleet $1.50 (replica-seconds × price) = tenants $1.25 (serving $1.00 + job time $0.25) + platform idle " \
           "$0.249999" in line, line
    assert "off by $0.000001" in line, line

    class Stub:
        def GetSpend(self, request, metadata):
            assert request.view == budget_pb2.SPEND_VIEW_FLEET
            return budget_pb2.SpendReport(fleet=view)

    monkeypatch.setattr(reports, "budgets", lambda address, key, admin: (Stub(), ()))
    result = margin(env, "report", "fleet", code=1)
    assert "NOT equal" in flat(result) and "off by $0.000001" in flat(result), result.output


def test_every_micro_is_shown_in_the_reconciliation() -> None:
    m = partial(common_pb2.Money, currency="USD")
    view = budget_pb2.FleetView(bill=m(micros=12_345_678_901), tenants=m(micros=12_000_000_000), jobs=m(),
                                platform_idle=m(micros=345_678_901), balanced=True)
    line = reports.reconciliation_line(view)
    assert line.startswith("fleet $12,345.678901 (replica-seconds × price) = tenants $12,000.00 + platform idle "
                           "$345.678901 — "), line


# -- report margin ---------------------------------------------------------------------------------------------------
def test_margin_without_a_price_list_says_revenue_is_zero(env, fleet) -> None:
    result = margin(env, "report", "margin", "--since", "1h")
    assert "no price list is set" in flat(result), result.output
    acme = row(result.output, "acme", "digits")
    assert acme[2] == f"{2 * ACME_REQUESTS:,}" and acme[3] == "$0.00", acme


def test_margin_revenue_is_requests_times_price(cluster, env, tmp_path: Path) -> None:
    margin(env, "prices", "set", "--tenant", "acme", "--model", "digits", "--per-million", "2")
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=10)
    for i in (1, 0):
        report_interval(cluster, end - timedelta(seconds=i * INTERVAL_S))

    # acme's key (the default): its own lines only
    result = margin(env, "report", "margin", "--since", "1h")
    assert "no price list" not in result.output and "other" not in result.output, result.output
    acme = row(result.output, "acme", "digits")
    requests = int(acme[2].replace(",", ""))
    assert requests == 2 * ACME_REQUESTS
    assert micros(acme[3]) == requests * ACME_PRICE // MICROS == 4_000  # revenue = requests × price
    stub, md = budgets(cluster, cluster.keys["acme"])
    view = stub.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_MARGIN, since=protoconv.timestamp(
        end - timedelta(hours=1))), metadata=md).margin
    cost = next(x.cost.micros for x in view.lines if x.model == "digits")
    assert micros(acme[4]) == cost > 0 and micros(acme[5]) == 4_000 - cost, acme
    assert "platform" not in result.output, result.output

    # every tenant with the admin key: other has no price, so a negative margin; and the platform's idle line
    everyone = margin(env, "report", "margin", "--all", "--since", "1h")
    other = row(everyone.output, "other", "digits")
    assert other[2] == f"{2 * OTHER_REQUESTS:,}" and other[3] == "$0.00" and other[5].startswith("-$"), other
    idle = row(everyone.output, "platform")
    assert micros(idle[4]) == fleet_view(cluster).platform_idle.micros > 0, idle
    admin_view = budgets(cluster)[0].GetSpend(budget_pb2.GetSpendRequest(
        view=budget_pb2.SPEND_VIEW_MARGIN, since=protoconv.timestamp(end - timedelta(hours=1))),
        metadata=budgets(cluster)[1])
    table = reports.margin_table(admin_view)
    margins = table.columns[5]._cells
    assert any(c.startswith("[red]-$") for c in margins), margins  # the negative margin is red
    assert not any("[red]" in c for c, x in zip(margins, admin_view.margin.lines, strict=False)
                   if x.gross_margin.micros >= 0)

    # one tenant, seen by the admin
    assert "acme" not in margin(env, "report", "margin", "--tenant", "other", "--since", "1h").output

    # the PNG: cumulative cost against cumulative revenue
    png = tmp_path / "plots" / "margin.png"
    result = margin(env, "report", "margin", "--all", "--since", "1h", "--png", str(png))
    assert "cost against revenue saved to" in result.output and png.name in result.output, result.output
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    from matplotlib import image

    height, width = image.imread(png).shape[:2]
    assert height > 100 and width > 100


def test_margin_keys_and_options_are_checked(cluster, env, fleet) -> None:
    result = margin(env, "report", "margin", "--all", "--api-key", cluster.keys["acme"], code=1)
    assert "--all needs the admin key" in result.output, result.output
    other = margin(env, "report", "margin", "--tenant", "other", "--api-key", cluster.keys["acme"], code=1)
    assert other.output.startswith("PERMISSION_DENIED: "), other.output
    both = margin(env, "report", "margin", "--all", "--tenant", "acme", code=2)
    assert "--tenant NAME or --all" in both.output, both.output
    bad = margin(env, "report", "margin", "--since", "yesterday", code=2)
    assert "ISO 8601" in bad.output, bad.output
    empty = margin(env, "report", "fleet", "--since", "1h", "--until", "2h", code=2)
    assert "the window is empty" in empty.output, empty.output


# -- prices ----------------------------------------------------------------------------------------------------------
def test_prices_set_then_show_round_trips_and_keeps_the_other_entries(cluster, env) -> None:
    margin(env, "prices", "set", "--tenant", "acme", "--model", "digits", "--per-million", "2.50")
    margin(env, "prices", "set", "--tenant", "acme", "--per-request", "0.0000005")
    shown = margin(env, "prices", "show", "--tenant", "acme").output
    assert row(shown, "digits")[1:] == ["$2.50", "$0.0000025"], shown
    assert row(shown, "(every model)")[1:] == ["$0.50", "$0.0000005"], shown

    margin(env, "prices", "set", "--tenant", "acme", "--model", "digits", "--per-million", "3")  # replaces digits
    stub, md = budgets(cluster)
    entries = {e.model: e.per_million.micros
               for e in stub.GetPriceList(budget_pb2.GetPriceListRequest(tenant="acme"), metadata=md).entries}
    assert entries == {"digits": 3_000_000, "": 500_000}

    # acme's own key reads its own list
    own = margin(env, "prices", "show", "--api-key", cluster.keys["acme"]).output
    assert row(own, "digits")[1] == "$3.00", own

    # the default list is separate, and a tenant without its own list is told it applies
    margin(env, "prices", "set", "--per-million", "1")
    assert row(margin(env, "prices", "show").output, "(every model)")[1] == "$1.00"
    other = margin(env, "prices", "show", "--tenant", "other").output
    assert "other has no list of its own: the default list applies" in other, other

    margin(env, "prices", "remove", "--tenant", "acme", "--model", "digits")
    entries = stub.GetPriceList(budget_pb2.GetPriceListRequest(tenant="acme"), metadata=md).entries
    assert [(e.model, e.per_million.micros) for e in entries] == [("", 500_000)]
    gone = margin(env, "prices", "remove", "--tenant", "acme", "--model", "digits", code=1)
    assert "no entry for digits" in gone.output, gone.output


@pytest.mark.parametrize(("args", "code", "message"), [
    pytest.param(("--per-million", "-1"), 2, "0 or more", id="negative"),
    pytest.param(("--per-million", "abc"), 2, "not an amount of dollars", id="not-a-number"),
    pytest.param(("--per-million", "1", "--per-request", "0.1"), 2, "exactly one", id="both"),
    pytest.param((), 2, "exactly one", id="neither"),
    pytest.param(("--per-million", "0.0000001"), 2, "finer than a micro-dollar", id="too-fine"),
    pytest.param(("--tenant", "nobody", "--per-million", "1"), 1, "nobody", id="unknown-tenant"),
    pytest.param(("--model", "../x", "--per-million", "1"), 1, "INVALID_ARGUMENT", id="bad-model-name"),
])
def test_bad_price_input_is_refused_clearly(cluster, env, args: tuple[str, ...], code: int, message: str) -> None:
    result = margin(env, "prices", "set", *args, code=code)
    assert message in flat(result), result.output
    if code == 1:
        assert re.match(r"^[A-Z_]+: ", result.output), result.output
    stub, md = budgets(cluster)
    assert not stub.GetPriceList(budget_pb2.GetPriceListRequest(), metadata=md).entries  # nothing was written


def test_a_tenant_key_cannot_set_prices(cluster, env) -> None:
    result = margin(env, "prices", "set", "--per-million", "1", "--api-key", cluster.keys["acme"], code=1)
    assert result.output.startswith("PERMISSION_DENIED: "), result.output


# -- deployments and the compression report ---------------------------------------------------------------------------
def _render(table) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_deployments_table_shows_scale_to_zero_cold_starts_and_the_served_cost() -> None:
    cold = datetime(2025, 5, 1, 12, 3, 4, tzinfo=UTC)
    zero = inference_pb2.Deployment(
        name="digits-v2", version=common_pb2.VersionRef(model="digits", number=2), device_class="cpu",
        state=inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO, min_replicas=0, scale_to_zero_after_seconds=300,
        price_per_hour=common_pb2.Money(micros=170_000), cost_per_million=common_pb2.Money(micros=94_000),
        last_cold_start_ms=812.4, last_cold_start_time=protoconv.timestamp(cold),
        served_cost_per_million=common_pb2.Money(micros=120_500), served_cost_source="triton",
        allocated_cost_per_million=common_pb2.Money(micros=450_000))
    ready = inference_pb2.Deployment(
        name="digits-v3", version=common_pb2.VersionRef(model="digits", number=3), device_class="cpu",
        state=inference_pb2.DEPLOYMENT_STATE_READY, min_replicas=0, scale_to_zero_after_seconds=300,
        served_cost_per_million=common_pb2.Money(micros=94_000), served_cost_source="deploy")
    text = _render(render_cli.deployments_table([zero, ready]))
    assert "scaled to zero" in text and "DEPLOYMENT_STATE" not in text, text
    assert "812 ms" in text and cold.astimezone().strftime("%Y-%m-%d %H:%M:%S") in text, text
    assert "$0.1205" in text and "(Triton, live)" in text and "(Deploy)" in text, text
    assert "billed $0.45" in text, text
    assert "READY" in text and "to zero after 300 s idle" in text, text


def test_deploy_sets_min_replicas_only_when_given(env, monkeypatch: pytest.MonkeyPatch) -> None:
    from margin.cli import main

    sent: list[inference_pb2.DeployRequest] = []

    class Stub:
        def Deploy(self, request, metadata):
            sent.append(request)
            return inference_pb2.Deployment(name="digits-v1", version=request.version,
                                            state=inference_pb2.DEPLOYMENT_STATE_READY,
                                            min_replicas=request.min_replicas if request.HasField("min_replicas")
                                            else 1)

    monkeypatch.setattr(main, "inference", lambda address, key: (Stub(), ()))
    margin(env, "deploy", "digits:1")
    margin(env, "deploy", "digits:1", "--min-replicas", "0", "--scale-to-zero-after", "120")
    margin(env, "deploy", "digits:1", "--min-replicas", "2")
    assert [r.HasField("min_replicas") for r in sent] == [False, True, True]
    assert [r.min_replicas for r in sent] == [0, 0, 2] and sent[1].scale_to_zero_after_seconds == 120
    refused = margin(env, "deploy", "digits:1", "--scale-to-zero-after", "120", code=2)
    assert "--min-replicas 0" in refused.output, refused.output
    assert margin(env, "deploy", "digits:1", "--min-replicas", "-1", code=2)
    assert len(sent) == 3


def _job() -> compression_pb2.CompressionJob:
    def variant(number: int, name: str, micros: int) -> compression_pb2.VariantReport:
        return compression_pb2.VariantReport(
            version=common_pb2.VersionRef(model="digits", number=number), recipe=compression_pb2.Recipe(name=name),
            cost_per_million=common_pb2.Money(micros=micros), run_cost=common_pb2.Money(micros=1_000),
            size_bytes=10_000, compression_ratio=2.0, quality=0.97, quality_metric="accuracy")

    return compression_pb2.CompressionJob(id="cj-1", source=common_pb2.VersionRef(model="digits", number=1),
                                          baseline=variant(1, "", 40_000),
                                          variants=[variant(2, "int8", 20_000), variant(3, "int8-wo", 30_000)],
                                          chosen=0, state=common_pb2.JOB_STATE_SUCCEEDED)


def test_compress_report_labels_the_worker_figure_and_shows_the_served_cost_of_deployed_variants() -> None:
    job = _job()
    plain = _render(compress_cli.front_table(job))
    assert "model compute cost per million (worker)" in " ".join(plain.split()) and "(Triton)" not in plain, plain
    served = {("digits", 2): inference_pb2.Deployment(
        name="digits-v2", version=common_pb2.VersionRef(model="digits", number=2),
        state=inference_pb2.DEPLOYMENT_STATE_READY, served_cost_per_million=common_pb2.Money(micros=55_000),
        served_cost_source="triton")}
    text = _render(compress_cli.front_table(job, served))
    assert "served cost per million (Triton)" in " ".join(text.split()) and "$0.055" in text, text
    assert re.search(r"\$0\.02\s+\$0\.055", text), text  # next to the worker's figure for that variant
    assert re.search(r"\$0\.03\s+—", text), text  # int8-wo is not deployed


def test_compress_report_skips_an_unreachable_inference_gateway(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARGIN_HOME", str(tmp_path))  # no local cluster
    monkeypatch.delenv("MARGIN_INFERENCE_ADDR", raising=False)
    job = _job()
    assert compress_cli.deployed_versions(job, "127.0.0.1:9", "mk_key", timeout_s=2) == {}
    assert compress_cli.deployed_versions(job, None, "mk_key") == {}  # no address anywhere (MARGIN_HOME is empty)

