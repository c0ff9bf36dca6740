"""The autoscaler's Kubernetes adapter and Lease leader election, against a stand-in of the Kubernetes API server.

There is no Kubernetes here, so :class:`KubeApiStandIn` plays the API server over real HTTP on 127.0.0.1: the real
``kubernetes`` client builds, serializes and sends the requests, and the tests check what it sent (method, path,
content type, body) and what the objects look like afterwards.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client
from margin.budget.autoscaler.controller import Decision
from margin.budget.autoscaler.kube import (
    REASON_ANNOTATION,
    SCALED_AT_ANNOTATION,
    KubeScaler,
    LeaseElector,
    LeaseError,
    ScalingError,
    Target,
)

NS = "serving"
HPA_PATH = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/resnet"
KEDA_PATH = f"/apis/keda.sh/v1alpha1/namespaces/{NS}/scaledobjects/resnet"
SCALE_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/resnet/scale"
LEASES_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
LEASE_PATH = f"{LEASES_PATH}/margin-autoscaler"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)  # whole seconds on purpose: MicroTime must keep ".000000"
MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")  # metav1.RFC3339Micro


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    content_type: str | None
    body: Any  # parsed JSON, or None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also how strategic merge treats these scalar/map fields)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class KubeApiStandIn:
    """A stand-in for the Kubernetes API server, because none can run here.

    A ``ThreadingHTTPServer`` on 127.0.0.1 (port 0) that stores objects in a dict keyed by their API path and
    answers the exact paths the adapter uses — HPAs (autoscaling/v2), KEDA ScaledObjects (keda.sh/v1alpha1),
    Deployment scale subresources (apps/v1) and Leases (coordination.k8s.io/v1) — like the real server does for
    these cases: GET (404 with a ``Status`` for unknown objects), PATCH (merge patch; strategic merge patch
    for built-in types only, 415 for custom resources like the real server), POST to the lease collection
    (409 AlreadyExists), PUT with optimistic concurrency (409 Conflict on a stale ``resourceVersion``) and
    MicroTime validation (400 when ``renewTime``/``acquireTime`` lack the 6 fraction digits). Every request is
    recorded (method, path, content type, parsed body). ``errors`` forces an error answer for a (method, path);
    ``before`` runs a callback before a (method, path) is handled (to simulate a concurrent writer).
    """

    OBJECT_PATHS = (
        re.compile(r"^/apis/autoscaling/v2/namespaces/[^/]+/horizontalpodautoscalers/[^/]+$"),
        re.compile(r"^/apis/keda\.sh/v1alpha1/namespaces/[^/]+/scaledobjects/[^/]+$"),
        re.compile(r"^/apis/apps/v1/namespaces/[^/]+/deployments/[^/]+/scale$"),
        re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/[^/]+/leases/[^/]+$"),
    )
    LEASE_COLLECTION = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/leases$")
    CUSTOM_RESOURCE = re.compile(r"^/apis/keda\.sh/")

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self.errors: dict[tuple[str, str], tuple[int, str, str]] = {}
        self.before: dict[tuple[str, str], Callable[[], None]] = {}
        self._resource_version = 1000
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._stopped = False

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> KubeApiStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def put_object(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            obj = json.loads(json.dumps(obj))
            obj.setdefault("metadata", {})["resourceVersion"] = self._next_version()
            self.objects[path] = obj
            return obj

    def requests_of(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]

    def _next_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    # -- request handling ---------------------------------------------------------------------------------------
    def _handle(self, method: str, path: str, content_type: str | None, raw: bytes) -> tuple[int, dict[str, Any]]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self.requests.append(Recorded(method, path, content_type, raw.decode("utf-8", "replace")))
            return self._status(400, "BadRequest", "the request body is not JSON")
        with self._lock:
            self.requests.append(Recorded(method, path, content_type, body))
            hook = self.before.pop((method, path), None)
            if hook is not None:
                hook()
            if (method, path) in self.errors:
                return self._status(*self.errors[(method, path)])
            if method == "POST" and (m := self.LEASE_COLLECTION.match(path)):
                return self._create(path, m["ns"], body)
            if not any(p.match(path) for p in self.OBJECT_PATHS):
                return self._status(404, "NotFound", f"the server could not find the requested resource {path}")
            if method == "POST":
                return self._status(405, "MethodNotAllowed", "POST is not allowed on an object")
            current = self.objects.get(path)
            if current is None:
                return self._status(404, "NotFound", f"{path.rsplit('/', 1)[-1]!r} not found")
            if method == "GET":
                return 200, current
            if method == "PATCH":
                return self._patch(path, current, content_type, body)
            if method == "PUT":
                return self._replace(path, current, body)
            return self._status(405, "MethodNotAllowed", f"{method} is not supported by the stand-in")

    def _patch(self, path: str, current: dict[str, Any], content_type: str | None, body: Any) -> tuple[int, dict]:
        media = (content_type or "").split(";")[0].strip()
        allowed = {MERGE} if self.CUSTOM_RESOURCE.match(path) else {MERGE, STRATEGIC}
        if media not in allowed:
            return self._status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                                f"- accepted media types include: {', '.join(sorted(allowed))}")
        if not isinstance(body, dict):
            return self._status(400, "BadRequest", "a merge patch must be a JSON object")
        patched = merge_patch(current, body)
        patched["metadata"]["resourceVersion"] = self._next_version()
        self.objects[path] = patched
        return 200, patched

    def _replace(self, path: str, current: dict[str, Any], body: Any) -> tuple[int, dict]:
        if not isinstance(body, dict):
            return self._status(400, "BadRequest", "the body must be an object")
        version = (body.get("metadata") or {}).get("resourceVersion")
        if version and version != current["metadata"]["resourceVersion"]:
            return self._status(409, "Conflict", "Operation cannot be fulfilled on leases: the object has been "
                                "modified; please apply your changes to the latest version and try again")
        if error := self._invalid_lease(body):
            return error
        body["metadata"]["resourceVersion"] = self._next_version()
        body["metadata"]["creationTimestamp"] = current["metadata"].get("creationTimestamp")
        self.objects[path] = body
        return 200, body

    def _create(self, collection: str, namespace: str, body: Any) -> tuple[int, dict]:
        name = ((body or {}).get("metadata") or {}).get("name")
        if not name:
            return self._status(422, "Invalid", "metadata.name: Required value")
        path = f"{collection}/{name}"
        if path in self.objects:
            return self._status(409, "AlreadyExists", f"leases.coordination.k8s.io {name!r} already exists")
        if error := self._invalid_lease(body):
            return error
        body["metadata"].update(namespace=namespace, resourceVersion=self._next_version(),
                                creationTimestamp="2024-05-01T00:00:00Z")
        self.objects[path] = body
        return 201, body

    def _invalid_lease(self, body: dict[str, Any]) -> tuple[int, dict] | None:
        for field in ("renewTime", "acquireTime"):
            value = (body.get("spec") or {}).get(field)
            if value is not None and not MICROTIME.match(str(value)):
                return self._status(400, "BadRequest", f"parsing time {value!r} as RFC3339Micro: spec.{field}")
        return None

    @staticmethod
    def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
        return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                code, payload = stand_in._handle(self.command, path, self.headers.get("Content-Type"), raw)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_POST = do_PUT = _serve  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        return Handler


@pytest.fixture
def stand_in() -> Iterator[KubeApiStandIn]:
    server = KubeApiStandIn().start()
    yield server
    server.stop()


@pytest.fixture
def api_client(stand_in: KubeApiStandIn) -> Iterator[client.ApiClient]:
    api = client.ApiClient(client.Configuration(host=stand_in.host))
    yield api
    api.close()


def hpa(min_replicas: int = 2, max_replicas: int = 10) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "resnet", "namespace": NS, "annotations": {"team": "vision"}},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "resnet"},
            "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}],
        },
    }


def scaled_object(max_count: int = 10) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": "resnet", "namespace": NS},
        "spec": {"scaleTargetRef": {"name": "resnet"}, "minReplicaCount": 1, "maxReplicaCount": max_count,
                 "triggers": [{"type": "prometheus", "metadata": {"threshold": "50"}}]},
    }


def deployment_scale(replicas: int = 3) -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "resnet", "namespace": NS},
            "spec": {"replicas": replicas}, "status": {"replicas": replicas, "selector": "app=resnet"}}


def scaler(api_client: client.ApiClient | None) -> KubeScaler:
    return KubeScaler(api_client, clock=lambda: NOW)


# -- HPA ------------------------------------------------------------------------------------------------------------
def test_hpa_max_replicas_patched_with_reason(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(HPA_PATH, hpa(min_replicas=2, max_replicas=10))

    assert scaler(api_client).apply(Target("hpa", NS, "resnet"), 6, "budget: affordable 6 replicas") is True

    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", HPA_PATH), ("PATCH", HPA_PATH)]
    patch = stand_in.requests[1]
    assert patch.content_type == MERGE
    assert patch.body == {
        "metadata": {"annotations": {REASON_ANNOTATION: "budget: affordable 6 replicas",
                                     SCALED_AT_ANNOTATION: "2024-05-01T12:00:00Z"}},
        "spec": {"maxReplicas": 6},
    }
    stored = stand_in.objects[HPA_PATH]
    assert stored["spec"]["maxReplicas"] == 6 and stored["spec"]["minReplicas"] == 2
    assert stored["metadata"]["annotations"] == {"team": "vision", REASON_ANNOTATION: "budget: affordable 6 replicas",
                                                 SCALED_AT_ANNOTATION: "2024-05-01T12:00:00Z"}
    assert stored["spec"]["metrics"] == hpa()["spec"]["metrics"]  # the patch left the rest alone


def test_hpa_not_patched_when_already_at_value(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    before = stand_in.put_object(HPA_PATH, hpa(max_replicas=7))
    assert scaler(api_client).apply(Target("hpa", NS, "resnet"), 7, "demand 7") is False
    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", HPA_PATH)]
    assert stand_in.objects[HPA_PATH]["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_hpa_min_replicas_lowered_below_min(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(HPA_PATH, hpa(min_replicas=3, max_replicas=10))
    assert scaler(api_client).apply(Target("hpa", NS, "resnet"), 2, "budget: affordable 2") is True
    assert stand_in.requests_of("PATCH")[0].body["spec"] == {"maxReplicas": 2, "minReplicas": 2}
    assert stand_in.objects[HPA_PATH]["spec"]["minReplicas"] == 2
    assert stand_in.objects[HPA_PATH]["spec"]["maxReplicas"] == 2


def test_apply_decision_uses_chosen_and_reason(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(HPA_PATH, hpa())
    decision = Decision(demand=9, affordable=4, chosen=4, reason="budget")
    assert scaler(api_client).apply_decision(Target("hpa", NS, "resnet"), decision) is True
    assert stand_in.objects[HPA_PATH]["spec"]["maxReplicas"] == 4
    assert stand_in.objects[HPA_PATH]["metadata"]["annotations"][REASON_ANNOTATION] == "budget"


# -- KEDA, Deployment, report-only ----------------------------------------------------------------------------------
def test_keda_max_replica_count_merge_patched(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(KEDA_PATH, scaled_object(max_count=10))

    assert scaler(api_client).apply(Target("keda", NS, "resnet"), 4, "budget: affordable 4") is True

    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", KEDA_PATH), ("PATCH", KEDA_PATH)]
    patch = stand_in.requests[1]
    assert patch.content_type == MERGE  # custom resources take no strategic merge patch
    assert patch.body["spec"] == {"maxReplicaCount": 4}
    assert patch.body["metadata"]["annotations"][REASON_ANNOTATION] == "budget: affordable 4"
    stored = stand_in.objects[KEDA_PATH]
    assert stored["spec"]["maxReplicaCount"] == 4 and stored["spec"]["minReplicaCount"] == 1
    assert stored["spec"]["triggers"] == scaled_object()["spec"]["triggers"]

    stand_in.requests.clear()
    assert scaler(api_client).apply(Target("keda", NS, "resnet"), 4, "again") is False
    assert [r.method for r in stand_in.requests] == ["GET"]


def test_deployment_scale_subresource_patched(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(SCALE_PATH, deployment_scale(replicas=3))

    assert scaler(api_client).apply(Target("deployment", NS, "resnet"), 5, "demand 5") is True

    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", SCALE_PATH), ("PATCH", SCALE_PATH)]
    assert stand_in.requests[1].content_type == MERGE
    assert stand_in.requests[1].body == {"spec": {"replicas": 5}}
    assert stand_in.objects[SCALE_PATH]["spec"]["replicas"] == 5

    stand_in.requests.clear()
    assert scaler(api_client).apply(Target("deployment", NS, "resnet"), 5, "demand 5") is False
    assert [r.method for r in stand_in.requests] == ["GET"]


def test_report_only_sends_nothing(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    assert scaler(api_client).apply(Target("report-only"), 3, "demand 3") is False
    assert KubeScaler(None).apply(Target("report-only"), 3, "demand 3") is False  # locally: no client at all
    assert stand_in.requests == []


def test_target_validation() -> None:
    with pytest.raises(ValueError, match="unknown scaling target kind"):
        Target("statefulset", NS, "resnet")
    with pytest.raises(ValueError, match="namespace and a name"):
        Target("hpa")
    with pytest.raises(ScalingError, match="no Kubernetes API client"):
        KubeScaler(None).apply(Target("hpa", NS, "resnet"), 2, "x")


# -- errors ---------------------------------------------------------------------------------------------------------
def test_missing_object_is_a_scaling_error(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    with pytest.raises(ScalingError, match=r"HTTP 404 Not Found") as caught:
        scaler(api_client).apply(Target("hpa", NS, "resnet"), 3, "demand 3")
    assert caught.value.status == 404
    assert "hpa serving/resnet" in str(caught.value)
    assert stand_in.requests_of("PATCH") == []


@pytest.mark.parametrize("method", ["GET", "PATCH"])
def test_forbidden_is_a_scaling_error(stand_in: KubeApiStandIn, api_client: client.ApiClient, method: str) -> None:
    stand_in.put_object(KEDA_PATH, scaled_object())
    stand_in.errors[(method, KEDA_PATH)] = (
        403, "Forbidden", 'scaledobjects.keda.sh "resnet" is forbidden: User "system:serviceaccount:serving:margin" '
        'cannot patch resource "scaledobjects"')
    with pytest.raises(ScalingError, match=r"HTTP 403 Forbidden: scaledobjects\.keda\.sh") as caught:
        scaler(api_client).apply(Target("keda", NS, "resnet"), 3, "demand 3")
    assert caught.value.status == 403 and caught.value.reason == "Forbidden"


def test_unreachable_api_server_is_a_scaling_error(stand_in: KubeApiStandIn) -> None:
    stand_in.stop()
    config = client.Configuration(host=stand_in.host)
    config.retries = 0
    with client.ApiClient(config) as api, pytest.raises(ScalingError, match="unreachable") as caught:
        scaler(api).apply(Target("deployment", NS, "resnet"), 3, "demand 3")
    assert caught.value.status is None


# -- leader election ------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def elector(api_client: client.ApiClient, identity: str, clock: Clock) -> LeaseElector:
    return LeaseElector(api_client, NS, "margin-autoscaler", identity, lease_duration_s=15, clock=clock)


def test_lease_election_create_hold_expire_take_over(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    clock = Clock(NOW)
    a, b = elector(api_client, "autoscaler-a", clock), elector(api_client, "autoscaler-b", clock)

    assert a.try_acquire_or_renew() is True
    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", LEASE_PATH), ("POST", LEASES_PATH)]
    created = stand_in.requests[1]
    assert created.content_type == "application/json"
    assert created.body["spec"] == {"holderIdentity": "autoscaler-a", "leaseDurationSeconds": 15,
                                    "acquireTime": "2024-05-01T12:00:00.000000Z",
                                    "renewTime": "2024-05-01T12:00:00.000000Z", "leaseTransitions": 0}

    clock.now = NOW + timedelta(seconds=5)
    assert b.try_acquire_or_renew() is False  # fresh lease held by a
    assert a.try_acquire_or_renew() is True   # renew
    lease = stand_in.objects[LEASE_PATH]
    assert lease["spec"]["holderIdentity"] == "autoscaler-a"
    assert lease["spec"]["renewTime"] == "2024-05-01T12:00:05.000000Z"
    assert lease["spec"]["acquireTime"] == "2024-05-01T12:00:00.000000Z"
    renew = stand_in.requests_of("PUT")[-1]
    assert renew.path == LEASE_PATH and renew.content_type == "application/json"
    assert renew.body["metadata"]["resourceVersion"]  # optimistic concurrency

    clock.now = NOW + timedelta(seconds=5 + 14)
    assert b.try_acquire_or_renew() is False  # renewTime + 15 s not passed yet
    clock.now = NOW + timedelta(seconds=5 + 16)  # a stopped renewing: expired
    assert b.try_acquire_or_renew() is True
    lease = stand_in.objects[LEASE_PATH]["spec"]
    assert lease["holderIdentity"] == "autoscaler-b" and lease["leaseTransitions"] == 1
    assert lease["acquireTime"] == lease["renewTime"] == "2024-05-01T12:00:21.000000Z"
    assert a.try_acquire_or_renew() is False and a.is_leader is False
    assert b.is_leader is True


def test_lease_concurrent_update_loses_without_error(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    clock = Clock(NOW)
    assert elector(api_client, "autoscaler-a", clock).try_acquire_or_renew() is True
    clock.now = NOW + timedelta(seconds=60)  # expired: both b and c go for it

    def c_wins() -> None:  # c's update lands between b's read and b's write
        lease = json.loads(json.dumps(stand_in.objects[LEASE_PATH]))
        lease["spec"]["holderIdentity"] = "autoscaler-c"
        stand_in.put_object(LEASE_PATH, lease)

    stand_in.before[("PUT", LEASE_PATH)] = c_wins
    assert elector(api_client, "autoscaler-b", clock).try_acquire_or_renew() is False
    assert stand_in.objects[LEASE_PATH]["spec"]["holderIdentity"] == "autoscaler-c"


def test_lease_create_race_loses_without_error(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    clock = Clock(NOW)
    assert elector(api_client, "autoscaler-a", clock).try_acquire_or_renew() is True
    stand_in.errors[("GET", LEASE_PATH)] = (404, "NotFound", "not found")  # b read before a created it
    assert elector(api_client, "autoscaler-b", clock).try_acquire_or_renew() is False
    assert stand_in.requests[-1].method == "POST"
    assert stand_in.objects[LEASE_PATH]["spec"]["holderIdentity"] == "autoscaler-a"


def test_lease_forbidden_is_an_error(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.errors[("GET", LEASE_PATH)] = (403, "Forbidden", "cannot get resource leases")
    with pytest.raises(LeaseError, match="HTTP 403 Forbidden"):
        elector(api_client, "autoscaler-a", Clock(NOW)).try_acquire_or_renew()
