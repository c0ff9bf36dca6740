"""margin.v1 budget messages <-> the budget core's dataclasses."""
from __future__ import annotations

from datetime import UTC

from margin.budget.autoscaler.planner import Plan
from margin.budget.store import DEFAULT_THRESHOLDS, Budget, Spend, SpendLine
from margin.common import protoconv
from margin.common.errors import InvalidArgument
from margin.common.ledger import LedgerEntry, LedgerRow
from margin.common.tenancy import as_utc
from margin.v1 import budget_pb2

PERIOD_TO_PROTO = {"daily": budget_pb2.BUDGET_PERIOD_DAILY, "monthly": budget_pb2.BUDGET_PERIOD_MONTHLY}
PERIOD_FROM_PROTO = {v: k for k, v in PERIOD_TO_PROTO.items()}
CATEGORY_TO_PROTO = {"training": budget_pb2.SPEND_CATEGORY_TRAINING,
                     "compression": budget_pb2.SPEND_CATEGORY_COMPRESSION,
                     "serving": budget_pb2.SPEND_CATEGORY_SERVING}
CATEGORY_FROM_PROTO = {v: k for k, v in CATEGORY_TO_PROTO.items()}
POLICY_TO_PROTO = {"reject": budget_pb2.EXHAUSTED_POLICY_REJECT, "degrade": budget_pb2.EXHAUSTED_POLICY_DEGRADE,
                   "throttle": budget_pb2.EXHAUSTED_POLICY_THROTTLE}
POLICY_FROM_PROTO = {**{v: k for k, v in POLICY_TO_PROTO.items()}, budget_pb2.EXHAUSTED_POLICY_UNSPECIFIED: "reject"}


def category(value: int, what: str = "category") -> str:
    if value not in CATEGORY_FROM_PROTO:
        raise InvalidArgument(f"{what}: set a spend category (training, compression or serving)")
    return CATEGORY_FROM_PROTO[value]


def budget_from_proto(msg: budget_pb2.Budget, tenant_id: int, webhook_secret: str) -> Budget:
    if msg.period not in PERIOD_FROM_PROTO:
        raise InvalidArgument("budget.period: DAILY or MONTHLY")
    if msg.exhausted_policy not in POLICY_FROM_PROTO:
        raise InvalidArgument(f"budget.exhausted_policy {msg.exhausted_policy} is not a policy")
    limits: dict[str, int] = {}
    for line in msg.category_limits:
        name = category(line.category, "budget.category_limits.category")
        if name in limits:
            raise InvalidArgument(f"budget.category_limits: {name} is given twice")
        limits[name] = line.limit.micros
    return Budget(tenant_id=tenant_id, period=PERIOD_FROM_PROTO[msg.period], total_micros=msg.total.micros,
                  category_limits=limits, policy=POLICY_FROM_PROTO[msg.exhausted_policy],
                  thresholds=tuple(msg.alert_thresholds) or DEFAULT_THRESHOLDS, webhook_url=msg.webhook_url,
                  webhook_secret=webhook_secret, currency=msg.total.currency or "USD")


def budget_to_proto(b: Budget, tenant: str, spend: Spend | None = None) -> budget_pb2.Budget:
    msg = budget_pb2.Budget(
        tenant=tenant, period=PERIOD_TO_PROTO[b.period], total=protoconv.money(b.total_micros, b.currency),
        category_limits=[budget_pb2.CategoryLimit(category=CATEGORY_TO_PROTO[c], limit=protoconv.money(m, b.currency))
                         for c, m in sorted(b.category_limits.items())],
        exhausted_policy=POLICY_TO_PROTO[b.policy], alert_thresholds=list(b.thresholds), webhook_url=b.webhook_url)
    if spend is not None:
        msg.period_start.CopyFrom(protoconv.timestamp(spend.period_start))
        msg.period_end.CopyFrom(protoconv.timestamp(spend.period_end))
    return msg


def _line(line: SpendLine, currency: str) -> budget_pb2.SpendLine:
    msg = budget_pb2.SpendLine(key=line.key, category=CATEGORY_TO_PROTO.get(line.category, 0),
                               amount=protoconv.money(line.micros, currency), entries=line.entries)
    if line.limit_micros is not None:
        msg.limit.CopyFrom(protoconv.money(line.limit_micros, currency))
    return msg


def spend_to_proto(spend: Spend, tenant: str) -> budget_pb2.SpendReport:
    currency = spend.budget.currency if spend.budget else "USD"
    msg = budget_pb2.SpendReport(
        spent=protoconv.money(spend.spent_micros, currency),
        projected_end_of_period=protoconv.money(spend.projected_micros, currency),
        by_category=[_line(x, currency) for x in spend.by_category],
        by_model=[_line(x, currency) for x in spend.by_model],
        by_deployment=[_line(x, currency) for x in spend.by_deployment])
    if spend.budget is not None:
        msg.budget.CopyFrom(budget_to_proto(spend.budget, tenant, spend))
        msg.remaining.CopyFrom(protoconv.money(spend.remaining_micros, currency))
    return msg


def entry_to_proto(row: LedgerRow, tenant: str) -> budget_pb2.LedgerEntry:
    return budget_pb2.LedgerEntry(
        id=row.id, tenant=tenant, category=CATEGORY_TO_PROTO[row.category],
        amount=protoconv.money(row.micros, row.currency), model=row.model, version=row.version,
        deployment=row.deployment, job_id=row.job_id, description=row.description, quantity=row.quantity,
        time=protoconv.timestamp(as_utc(row.created_at)))


def entry_from_proto(msg: budget_pb2.LedgerEntry, tenant_id: int) -> LedgerEntry:
    if not msg.id or len(msg.id) > 100:
        raise InvalidArgument("entry.id: every entry needs an id (1–100 characters) chosen by the writer")
    if msg.amount.micros < 0:
        raise InvalidArgument(f"entry {msg.id}: amounts are never negative")
    fields = {"created_at": msg.time.ToDatetime(tzinfo=UTC)} if msg.HasField("time") else {}
    return LedgerEntry(id=msg.id, tenant_id=tenant_id, category=category(msg.category, f"entry {msg.id}.category"),
                       micros=msg.amount.micros, quantity=msg.quantity, model=msg.model, version=msg.version,
                       deployment=msg.deployment, job_id=msg.job_id, description=msg.description[:300],
                       currency=msg.amount.currency or "USD", **fields)


def plan_to_proto(plan: Plan) -> budget_pb2.ScalingPlan:
    msg = budget_pb2.ScalingPlan(
        deployment=plan.deployment, current_replicas=plan.current, demand_replicas=plan.demand,
        affordable_replicas=-1 if plan.affordable is None else plan.affordable, min_replicas=plan.minimum,
        chosen_replicas=plan.chosen, reason=plan.reason, price_per_replica_hour=protoconv.money(
            plan.price_micros_per_hour), hours_left_in_period=plan.hours_left, observed_rps=plan.observed_rps,
        capacity_rps_per_replica=plan.capacity_rps, queue_time_us_per_request=plan.queue_us_per_request,
        target_kind=plan.target_kind, applied=plan.applied, time=protoconv.timestamp(plan.at))
    if plan.remaining_micros is not None:
        msg.remaining_serving_budget.CopyFrom(protoconv.money(plan.remaining_micros))
    return msg
