"""The autoscaler's hands in Kubernetes: it applies a :class:`~margin.budget.autoscaler.controller.Decision`.

The controller (:mod:`margin.budget.autoscaler.controller`) only computes; this module carries its ``chosen``
replica count to the cluster through the ``kubernetes`` client, on the object that configuration names
(:class:`Target`):

- ``hpa`` — the deployment's ``autoscaling/v2`` HorizontalPodAutoscaler: ``spec.maxReplicas`` becomes the budget's
  ceiling (the HPA keeps scaling on its own metrics below it); ``spec.minReplicas`` is lowered with it when the
  ceiling falls under it, since the API server rejects ``minReplicas > maxReplicas``.
- ``keda`` — a KEDA ``keda.sh/v1alpha1`` ScaledObject: ``spec.maxReplicaCount``, same meaning.
- ``deployment`` — an ``apps/v1`` Deployment without an autoscaler: its ``scale`` subresource's ``spec.replicas``.
- ``report-only`` — no Kubernetes (local runs): nothing is sent; the plan is only computed and reported.

The pool's floor, ``minimum`` (the planner passes 0 when every deployment of the pool is scaled to zero, so nothing
needs a replica, else 1; None leaves the object's floor alone, as before floors existed):

- ``keda`` — ``minimum`` 0 sets ``spec.minReplicaCount: 0`` (KEDA scales the Deployment to zero) and
  ``spec.maxReplicaCount: max(replicas, 1)`` (KEDA needs a ceiling of at least 1). The floor the object had (the
  chart's ``minReplicas``) is kept in the annotation ``margin.dev/min-replica-count``; once ``minimum`` is 1 or more
  again, ``minReplicaCount`` is restored from it (never below ``minimum``) and the annotation removed (set to null in
  the merge patch). (KEDA refuses ``minReplicaCount: 0`` on a ScaledObject with ``idleReplicaCount``; the chart
  sets none.)
- ``hpa`` — an HPA cannot go below ``minReplicas: 1`` without the ``HPAScaleToZero`` feature gate (alpha, off by
  default), so ``minimum`` 0 leaves one replica: ``minReplicas`` 1 and ``maxReplicas`` at least 1 (``replicas`` 0 gives
  ``maxReplicas: 1``, not the API server's min > max rejection). This is logged once per target (again only after
  the floor was 1 or more in between), and the reason annotation says so. A chart floor above 1 lowered this way is
  remembered in the same annotation and restored like KEDA's. Use KEDA for pools that should reach zero replicas.
- ``deployment`` — ``replicas`` as given, 0 included; ``minimum`` changes nothing there.

With ``minimum`` given, an HPA's / ScaledObject's ceiling is never below ``minimum`` nor below 1, and a floor above
the ceiling is lowered to it (never below ``minimum``), the object's own floor remembered in the annotation until the
ceiling lets it back — KEDA, like the API server for HPAs, refuses a floor above the ceiling.

Every patch is a JSON merge patch (``application/merge-patch+json``), set explicitly: left to itself the client
sends a dict body to a built-in type as ``application/strategic-merge-patch+json`` (it picks
``json-patch+json`` and swaps it when the body is not a list), which custom resources such as KEDA's reject.
The HPA and the ScaledObject also get two annotations, ``margin.dev/scaling-reason`` (the decision's reason) and
``margin.dev/scaled-at`` (UTC, RFC 3339), so ``kubectl describe`` tells why the ceiling moved. The scale
subresource carries no annotations of the Deployment, so there the reason is only logged.

Each apply first reads the object and sends nothing when it already holds the values (ceiling, floor and the
remembered floor: no write, no new ``resourceVersion``, no audit-log noise every tick).

Least-privilege RBAC (a namespaced ``Role`` in the serving namespace, bound to the autoscaler's ServiceAccount;
the Helm chart renders it), only the rule for the configured kind:

.. code-block:: yaml

    - apiGroups: ["autoscaling"]            # kind: hpa
      resources: ["horizontalpodautoscalers"]
      verbs: ["get", "patch"]
    - apiGroups: ["keda.sh"]                # kind: keda
      resources: ["scaledobjects"]
      verbs: ["get", "patch"]
    - apiGroups: ["apps"]                   # kind: deployment
      resources: ["deployments/scale"]
      verbs: ["get", "patch"]
    - apiGroups: ["coordination.k8s.io"]    # leader election, when replicas > 1 (see LeaseElector)
      resources: ["leases"]
      verbs: ["get", "create", "update"]

``resourceNames`` may pin the get/patch/update rules to the named objects (not ``create``: Kubernetes cannot
restrict create by name). Nothing cluster-wide, no list/watch, no delete.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

if TYPE_CHECKING:
    from margin.budget.autoscaler.controller import Decision

log = logging.getLogger(__name__)

KINDS = frozenset({"hpa", "keda", "deployment", "report-only"})
REASON_ANNOTATION = "margin.dev/scaling-reason"
SCALED_AT_ANNOTATION = "margin.dev/scaled-at"
# The floor an HPA / ScaledObject had before the autoscaler lowered it (scale to zero, or a ceiling under it).
MIN_ANNOTATION = "margin.dev/min-replica-count"
HPA_KEEPS_ONE = "the HPA keeps 1 replica: minReplicas >= 1 without the HPAScaleToZero feature gate"
MERGE_PATCH = "application/merge-patch+json"
# The client (v37) sends POST/PUT bodies without a Content-Type (and ignores ``_content_type`` there); the API server
# assumes JSON then, but say it: ``_headers`` is honoured.
JSON_HEADERS = {"Content-Type": "application/json"}
KEDA_GROUP, KEDA_VERSION, KEDA_PLURAL = "keda.sh", "v1alpha1", "scaledobjects"
MAX_ANNOTATION_CHARS = 1024


class KubeError(Exception):
    """A request to the Kubernetes API failed; ``status`` is the HTTP status (None: no answer at all)."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason


class ScalingError(KubeError):
    """Applying replicas to the target failed (not found, forbidden, invalid, API server unreachable...)."""


class LeaseError(KubeError):
    """Leader election failed for a reason other than losing the race (a 409 Conflict is not an error)."""


def _describe(exc: ApiException) -> tuple[int | None, str, str]:
    """(status, reason, message) of an ApiException; the message is the API server's Status.message, if any."""
    message = ""
    if exc.body:
        try:
            body = json.loads(exc.body)
        except (TypeError, ValueError):
            body = None
        if isinstance(body, dict):
            message = str(body.get("message") or "")
    return exc.status, str(exc.reason or ""), message


def _wrap(err_type: type[KubeError], what: str, exc: Exception) -> KubeError:
    if isinstance(exc, ApiException):
        status, reason, message = _describe(exc)
        text = f"{what}: HTTP {status} {reason}" + (f": {message}" if message else "")
        return err_type(text, status=status, reason=reason)
    return err_type(f"{what}: Kubernetes API unreachable: {exc}", status=None, reason=type(exc).__name__)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Target:
    """What one deployment's replicas are applied to: ``kind`` in :data:`KINDS`, in ``namespace``, named ``name``.

    For ``hpa``/``keda`` the name is the HPA's/ScaledObject's, for ``deployment`` the Deployment's.
    """

    kind: str
    namespace: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown scaling target kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if self.kind != "report-only" and not (self.namespace and self.name):
            raise ValueError(f"a {self.kind!r} target needs a namespace and a name")

    def __str__(self) -> str:
        return self.kind if self.kind == "report-only" else f"{self.kind} {self.namespace}/{self.name}"


class KubeScaler:
    """Applies replica counts to :class:`Target` objects through a ``kubernetes.client.ApiClient``.

    ``api_client`` is whatever the caller configured (in-cluster config in production; any host in tests); it may
    be None only for ``report-only`` targets. Needs the RBAC in this module's docstring: get + patch on the one
    resource the target kind touches, in the target's namespace.
    """

    def __init__(self, api_client: client.ApiClient | None, clock: Callable[[], datetime] | None = None):
        self._api_client = api_client
        self._clock = clock or (lambda: datetime.now(UTC))
        self._kept_one: set[Target] = set()  # HPAs told (logged) that they keep one replica at floor 0

    def apply_decision(self, target: Target, decision: Decision) -> bool:
        return self.apply(target, decision.chosen, decision.reason)

    def apply(self, target: Target, replicas: int, reason: str, minimum: int | None = None) -> bool:
        """Set the target's replica ceiling (or count) to ``replicas`` and, when ``minimum`` is given, its floor (see
        the module docstring); True when a patch was sent.

        False: ``report-only``, or the object already holds the values. Raises :class:`ScalingError` when the
        API answers with an error (the message has the HTTP status and reason) or cannot be reached.
        """
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be a non-negative int, got {replicas!r}")
        if minimum is not None and (isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0):
            raise ValueError(f"minimum must be None or a non-negative int, got {minimum!r}")
        if target.kind == "report-only":
            log.info("report-only: would scale to %d replicas (%s)", replicas, reason)
            return False
        if self._api_client is None:
            raise ScalingError(f"{target}: no Kubernetes API client configured (use kind 'report-only' locally)")
        apply = {"hpa": self._apply_hpa, "keda": self._apply_keda, "deployment": self._apply_deployment}[target.kind]
        try:
            changed = apply(target, replicas, reason, minimum)
        except (ApiException, HTTPError) as exc:
            raise _wrap(ScalingError, f"scaling {target} to {replicas}", exc) from exc
        if changed:
            log.info("%s: scaled to %d replicas (%s)", target, replicas, reason)
        return changed

    def _annotations(self, reason: str) -> dict[str, Any]:
        return {REASON_ANNOTATION: reason[:MAX_ANNOTATION_CHARS], SCALED_AT_ANNOTATION: _rfc3339(self._clock())}

    def _floor(self, target: Target, annotations: dict[str, str] | None, current_min: int, ceiling: int,
               minimum: int, lowest: int) -> tuple[int, str | None]:
        """(the floor to set, the value of :data:`MIN_ANNOTATION` afterwards: None = absent).

        ``current_min`` is the object's floor now, ``ceiling`` the one it gets, ``lowest`` the least floor the kind
        takes (KEDA 0, an HPA 1). The floor the object had before the autoscaler lowered it (``original``) is the
        annotation's when present, else ``current_min``. ``minimum`` 0 gives ``lowest``; otherwise ``original`` as far
        as the ceiling allows, never below ``minimum``. ``original`` is remembered while the floor set is below it.
        """
        original = current_min
        saved = (annotations or {}).get(MIN_ANNOTATION)
        if saved is not None:
            try:
                original = int(saved)
                if original < 0:
                    raise ValueError(saved)
            except ValueError:
                log.warning("%s: ignoring annotation %s=%r (not a replica count); the floor now is %d", target,
                            MIN_ANNOTATION, saved, current_min)
                original = current_min
        floor = lowest if minimum == 0 else max(minimum, min(original, ceiling), lowest)
        return floor, (str(original) if floor < original else None)

    def _apply_hpa(self, target: Target, replicas: int, reason: str, minimum: int | None) -> bool:
        api = client.AutoscalingV2Api(self._api_client)
        hpa = api.read_namespaced_horizontal_pod_autoscaler(target.name, target.namespace)
        current_max = hpa.spec.max_replicas
        current_min = hpa.spec.min_replicas if hpa.spec.min_replicas is not None else 1  # the API's default
        spec: dict[str, Any] = {}
        annotations: dict[str, Any] = {}
        if minimum is None:
            new_max = replicas
            if replicas < current_min:
                # minReplicas must stay >= 1 (0 only with the HPAScaleToZero gate): a ceiling of 0 leaves min at 1,
                # which the API server rejects (min > max) — surfaced as a ScalingError, not hidden.
                new_min = max(replicas, 1)
            else:
                new_min = current_min
        else:
            new_max = max(replicas, minimum, 1)
            current_annotations = hpa.metadata.annotations if hpa.metadata is not None else None
            new_min, remembered = self._floor(target, current_annotations, current_min, new_max, minimum, 1)
            if remembered != (current_annotations or {}).get(MIN_ANNOTATION):
                annotations[MIN_ANNOTATION] = remembered  # None: removed by the merge patch
            self._note_hpa_floor(target, minimum, replicas)
            if minimum == 0:
                reason = f"{reason[:MAX_ANNOTATION_CHARS - len(HPA_KEEPS_ONE) - 2]}; {HPA_KEEPS_ONE}"
        if current_max != new_max:
            spec["maxReplicas"] = new_max
        if new_min != current_min:
            spec["minReplicas"] = new_min
        if not spec and not annotations:
            return False
        body: dict[str, Any] = {"metadata": {"annotations": {**self._annotations(reason), **annotations}}}
        if spec:
            body["spec"] = spec
        api.patch_namespaced_horizontal_pod_autoscaler(target.name, target.namespace, body, _content_type=MERGE_PATCH)
        return True

    def _note_hpa_floor(self, target: Target, minimum: int, replicas: int) -> None:
        """Log, once per target until the floor is 1 or more again, that an HPA cannot scale to zero."""
        if minimum != 0:
            self._kept_one.discard(target)
            return
        if target in self._kept_one:
            return
        self._kept_one.add(target)
        log.warning("%s: the pool's floor is 0, but an HPA keeps minReplicas >= 1 without the HPAScaleToZero "
                    "feature gate: the HPA keeps one replica%s (a KEDA ScaledObject can scale the pool to zero)",
                    target, " (maxReplicas 1, not 0)" if replicas == 0 else "")

    def _apply_keda(self, target: Target, replicas: int, reason: str, minimum: int | None) -> bool:
        api = client.CustomObjectsApi(self._api_client)
        obj = api.get_namespaced_custom_object(KEDA_GROUP, KEDA_VERSION, target.namespace, KEDA_PLURAL, target.name)
        current = obj.get("spec") or {}
        spec: dict[str, Any] = {}
        annotations: dict[str, Any] = {}
        if minimum is None:
            new_max = replicas
        else:
            new_max = max(replicas, minimum, 1)  # KEDA needs maxReplicaCount >= 1
            current_min = current.get("minReplicaCount")
            current_min = 0 if current_min is None else int(current_min)  # KEDA's default
            current_annotations = (obj.get("metadata") or {}).get("annotations")
            new_min, remembered = self._floor(target, current_annotations, current_min, new_max, minimum, 0)
            if new_min != current_min:
                spec["minReplicaCount"] = new_min
            if remembered != (current_annotations or {}).get(MIN_ANNOTATION):
                annotations[MIN_ANNOTATION] = remembered  # None: removed by the merge patch
        if current.get("maxReplicaCount") != new_max:
            spec["maxReplicaCount"] = new_max
        if not spec and not annotations:
            return False
        body: dict[str, Any] = {"metadata": {"annotations": {**self._annotations(reason), **annotations}}}
        if spec:
            body["spec"] = spec
        api.patch_namespaced_custom_object(
            KEDA_GROUP, KEDA_VERSION, target.namespace, KEDA_PLURAL, target.name, body, _content_type=MERGE_PATCH
        )
        return True

    def _apply_deployment(self, target: Target, replicas: int, reason: str, minimum: int | None) -> bool:
        api = client.AppsV1Api(self._api_client)
        scale = api.read_namespaced_deployment_scale(target.name, target.namespace)
        if scale.spec is not None and scale.spec.replicas == replicas:
            return False
        body = {"spec": {"replicas": replicas}}
        api.patch_namespaced_deployment_scale(target.name, target.namespace, body, _content_type=MERGE_PATCH)
        return True


class MicroTime(datetime):
    """A datetime that serializes as a Kubernetes ``MicroTime``: RFC 3339, always 6 fraction digits, ``Z``.

    The client serializes datetimes with ``isoformat()``, which drops the fraction when the microseconds are 0
    (``2024-01-01T00:00:00+00:00``); the API server parses MicroTime with the layout
    ``2006-01-02T15:04:05.000000Z07:00`` and rejects such a value (400). This subclass keeps the fraction.
    """

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return self.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    @classmethod
    def of(cls, moment: datetime) -> MicroTime:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
        return cls(moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second,
                   moment.microsecond, tzinfo=UTC)


class LeaseElector:
    """Leader election on a ``coordination.k8s.io/v1`` Lease, for an autoscaler run with more than one replica.

    Only the leader applies decisions; the others compute and wait. Call :meth:`try_acquire_or_renew` every tick
    (well within ``lease_duration_s``, e.g. a third of it): it creates the Lease when missing, renews it while we
    hold it, takes it over once the holder's ``renewTime + leaseDurationSeconds`` has passed (a crashed leader),
    and otherwise answers False. Every write is a ``replace`` (PUT) carrying the ``resourceVersion`` that was read,
    so of two candidates racing for an expired lease the API server lets exactly one win; the other gets
    409 Conflict, which here means "not the leader", not an error.

    Expiry compares the holder's ``renewTime`` with our clock, so it assumes clocks agree within a small fraction
    of the lease duration (true on NTP-synced nodes; client-go avoids the assumption by timing its own
    observations instead). ``clock`` returns an aware UTC datetime and is injectable for tests.

    RBAC: ``get``, ``create`` and ``update`` on ``leases`` (group ``coordination.k8s.io``) in its namespace;
    ``get``/``update`` may be pinned with ``resourceNames`` to the lease's name, ``create`` cannot be.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: int = 15,
        clock: Callable[[], datetime] | None = None,
    ):
        if not identity:
            raise ValueError("a leader-election identity is required (e.g. the pod name)")
        if lease_duration_s <= 0:
            raise ValueError("lease_duration_s must be positive")
        self._api = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = int(lease_duration_s)
        self._clock = clock or (lambda: datetime.now(UTC))
        self.is_leader = False

    def try_acquire_or_renew(self) -> bool:
        """True when this identity holds the lease after the call.

        A lost race (409 Conflict on update, 409 AlreadyExists on create) is False; other API errors raise
        :class:`LeaseError`, and ``is_leader`` is False then too (stop acting until a renewal succeeds).
        """
        self.is_leader = False
        self.is_leader = self._attempt()
        return self.is_leader

    def _attempt(self) -> bool:
        now = MicroTime.of(self._clock())
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise _wrap(LeaseError, f"reading lease {self.namespace}/{self.name}", exc) from exc
            return self._create(now)
        except HTTPError as exc:
            raise _wrap(LeaseError, f"reading lease {self.namespace}/{self.name}", exc) from exc

        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or ""
        transitions = spec.lease_transitions or 0
        acquire_time = spec.acquire_time
        if holder != self.identity:
            if holder and not self._expired(spec, now):
                return False
            acquire_time = now
            if holder:
                transitions += 1
        new_spec = client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=self.lease_duration_s,
            acquire_time=MicroTime.of(acquire_time) if acquire_time is not None else now,
            renew_time=now,
            lease_transitions=transitions,
        )
        meta = lease.metadata
        body = client.V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=client.V1ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                resource_version=meta.resource_version,
                labels=meta.labels,
                annotations=meta.annotations,
            ),
            spec=new_spec,
        )
        try:
            self._api.replace_namespaced_lease(self.name, self.namespace, body, _headers=JSON_HEADERS)
        except ApiException as exc:
            if exc.status == 409:
                return False  # someone else updated the lease since we read it
            raise _wrap(LeaseError, f"updating lease {self.namespace}/{self.name}", exc) from exc
        except HTTPError as exc:
            raise _wrap(LeaseError, f"updating lease {self.namespace}/{self.name}", exc) from exc
        return True

    def _expired(self, spec: client.V1LeaseSpec, now: datetime) -> bool:
        if spec.renew_time is None:
            return True
        renewed = spec.renew_time if spec.renew_time.tzinfo else spec.renew_time.replace(tzinfo=UTC)
        duration = spec.lease_duration_seconds or self.lease_duration_s
        return renewed + timedelta(seconds=duration) < now

    def _create(self, now: MicroTime) -> bool:
        body = client.V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=self.lease_duration_s,
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        try:
            self._api.create_namespaced_lease(self.namespace, body, _headers=JSON_HEADERS)
        except ApiException as exc:
            if exc.status == 409:
                return False  # another candidate created it first
            raise _wrap(LeaseError, f"creating lease {self.namespace}/{self.name}", exc) from exc
        except HTTPError as exc:
            raise _wrap(LeaseError, f"creating lease {self.namespace}/{self.name}", exc) from exc
        return True
