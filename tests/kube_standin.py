"""A stand-in for the Kubernetes API server over real HTTP, shared by the suites that talk to Kubernetes.

There is no Kubernetes here, so :class:`KubeApiStandIn` plays the API server on 127.0.0.1: the real ``kubernetes``
client builds, serializes and sends the requests, and the tests check what it sent (method, path, content type,
body) and what the objects look like afterwards. Import it as ``from kube_standin import KubeApiStandIn`` (``tests/``
is on ``sys.path`` because ``tests/conftest.py`` lives there).
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")  # metav1.RFC3339Micro


def hpa_path(namespace: str, name: str) -> str:
    return f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers/{name}"


def keda_path(namespace: str, name: str) -> str:
    return f"/apis/keda.sh/v1alpha1/namespaces/{namespace}/scaledobjects/{name}"


def scale_path(namespace: str, name: str) -> str:
    return f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"


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
