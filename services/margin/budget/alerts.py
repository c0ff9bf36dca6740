"""Budget alerts: when a tenant's spend crosses a threshold of its budget (50/80/100 % by default) the alert is
logged, counted in Prometheus (``margin_budget_alerts_total``) and, when the budget has a webhook, POSTed to it
as JSON signed with HMAC-SHA256 (header ``X-Margin-Signature: sha256=<hex of HMAC(secret, body)>``).

Each threshold fires once per period: :meth:`BudgetStore.claim_alerts` claims it with a unique row before it is
sent. A webhook that fails is logged and not retried (the alert is in the log and the metric either way). A webhook
goes only where the egress policy allows (:mod:`margin.budget.egress`: public addresses and the operator's
``MARGIN_WEBHOOK_ALLOW``), checked on the address it resolves to when it is sent; a refused one is logged and
counted (``margin_budget_webhooks_refused_total``), never sent.
"""
from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import threading

from prometheus_client import Counter, Gauge
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from margin.budget.egress import EgressPolicy, Refused
from margin.budget.store import Alert, BudgetStore
from margin.common.costs import format_money
from margin.common.tenancy import TenantRow

log = logging.getLogger(__name__)
ALERTS = Counter("margin_budget_alerts_total", "Budget thresholds crossed (each fires once per period).",
                 ["tenant", "threshold"])
SPEND_RATIO = Gauge("margin_budget_spend_ratio", "This period's spend as a fraction of the budget.", ["tenant"])
WEBHOOKS_REFUSED = Counter("margin_budget_webhooks_refused_total",
                           "Budget alert webhooks not sent: their destination is not allowed (MARGIN_WEBHOOK_ALLOW).",
                           ["tenant"])
SIGNATURE_HEADER = "X-Margin-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(alert: Alert) -> dict:
    return {"type": "budget.threshold_crossed", "tenant": alert.tenant, "threshold": alert.threshold,
            "spent_micros": alert.spent_micros, "budget_micros": alert.total_micros,
            "period_start": alert.period_start.isoformat(), "period_end": alert.period_end.isoformat()}


def deliver(alert: Alert, egress: EgressPolicy, timeout_s: float = 5.0) -> bool:
    """Log and count the alert; POST it to the webhook when there is one and ``egress`` allows where it points.
    Returns whether the webhook took it."""
    ALERTS.labels(alert.tenant, f"{alert.threshold:g}").inc()
    log.warning("budget alert: %s has spent %s of %s (%.0f %% threshold crossed)", alert.tenant,
                format_money(alert.spent_micros), format_money(alert.total_micros), alert.threshold * 100)
    if not alert.webhook_url:
        return False
    body = json.dumps(payload(alert), sort_keys=True).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(alert.webhook_secret, body)}
    try:
        return 200 <= egress.post(alert.webhook_url, body, headers, timeout_s) < 300
    except Refused as err:
        WEBHOOKS_REFUSED.labels(alert.tenant).inc()
        log.warning("budget alert webhook of %s refused: %s", alert.tenant, err)
    except (OSError, http.client.HTTPException) as err:
        log.error("budget alert webhook %s failed: %s", alert.webhook_url, err)
    except Exception:  # the alert is claimed: whatever the webhook does, the watcher goes on to the next one
        log.exception("budget alert webhook %s failed", alert.webhook_url)
    return False


class AlertWatcher:
    """Checks every budgeted tenant's spend every ``interval_s`` and sends the thresholds it has crossed."""

    def __init__(self, store: BudgetStore, sessions: sessionmaker, interval_s: float = 5.0,
                 egress: EgressPolicy | None = None):
        self.store, self._sessions, self.interval_s = store, sessions, interval_s
        self.egress = egress or EgressPolicy()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="budget-alerts", daemon=True)

    def start(self) -> AlertWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check_once(self) -> list[Alert]:
        sent = []
        with self._sessions() as s:
            names = dict(s.execute(select(TenantRow.id, TenantRow.name)).all())
        for tenant_id in self.store.budgeted_tenants():
            name = names.get(tenant_id, str(tenant_id))
            spend = self.store.spend(tenant_id)
            if spend.budget:
                SPEND_RATIO.labels(name).set(spend.spent_micros / spend.budget.total_micros)
            for alert in self.store.claim_alerts(tenant_id, name):
                deliver(alert, self.egress)
                sent.append(alert)
        return sent

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:  # a bad tick must not end the watcher
                log.exception("budget alert check failed")
