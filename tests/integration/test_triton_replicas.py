"""A serving pool of several Triton replicas behind one address (``ipv4:a:p,b:q,c:r``, as a headless Service's
``dns:///`` name gives in a cluster): three real tritonservers on one model repository. Every deployment is loaded
on every replica, requests spread over them, a replica that dies takes no requests and gets the deployments back
when it returns, and a replica added later (``--load-model=*``) serves what is deployed and not what was undeployed.
"""
from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2
from margin.cluster.processes import ManagedProcess
from margin.inference.triton_process import triton_spec
from margin.v1 import inference_pb2

from tests.integration.inference_stack import (
    Stack,
    another_service,
    deploy,
    health,
    inference_stack,
    predict,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]
MODEL = "replicated"
X = np.zeros((1, 64), np.float32)


@dataclass
class Replicated:
    view: Stack                    # the stack as seen through an inference service whose "cpu" pool has 3 replicas
    replicas: list[ManagedProcess]  # A and B run from the start; C (started with --load-model=*) joins later
    repository: Path               # the pool's model repository, shared by the replicas
    tenant_id: int

    def triton_name(self, number: int) -> str:
        return f"t{self.tenant_id}--{MODEL}-v{number}"

    def _ask(self, replica: ManagedProcess, call):
        if replica.proc is None or replica.proc.poll() is not None:
            return None
        client = triton_grpc.InferenceServerClient(replica.spec.address)
        try:
            return call(client)
        finally:
            client.close()

    def ready_on(self, number: int) -> list[bool | None]:
        """Per replica, whether it has v<number> ready (asking that Triton itself); None for one not running."""
        return [self._ask(r, lambda c: bool(c.is_model_ready(self.triton_name(number)))) for r in self.replicas]

    def served(self, number: int) -> list[int]:
        """Per replica, how many inference requests for v<number> it has answered (Triton's own statistics)."""
        def count(client) -> int:
            if not client.is_model_ready(self.triton_name(number)):
                return 0
            stats = client.get_inference_statistics(self.triton_name(number))
            return sum(m.inference_stats.success.count for m in stats.model_stats)
        return [self._ask(r, count) or 0 for r in self.replicas]

    def health(self) -> int:
        return health(self.view)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    with inference_stack(tmp_path_factory.mktemp("replicas")) as stack:
        repository = stack.home / "replicated-repo"
        replicas = [ManagedProcess(dataclasses.replace(triton_spec(stack.home, repository / "cpu", load_all=i == 2),
                                                       name=f"triton-{'abc'[i]}"), stack.home) for i in range(3)]
        for replica in replicas[:2]:
            replica.start()
        try:
            for replica in replicas[:2]:
                replica.wait_healthy(60)
            pool = "ipv4:" + ",".join(r.spec.address for r in replicas)
            settings = dataclasses.replace(stack.settings, triton_url="127.0.0.1:1",  # unused: cpu has its pool
                                           repository=repository, triton_urls={"cpu": pool})
            with another_service(stack, settings, MODEL, (21, 22), "replicated") as (view, tenant_id):
                yield Replicated(view, replicas, repository / "cpu", tenant_id)
        finally:
            for replica in replicas:
                replica.stop()


def test_a_deployment_is_loaded_on_every_replica_and_requests_spread_over_them(replicated):
    assert deploy(replicated.view, 1, model=MODEL, device_class="cpu").state == inference_pb2.DEPLOYMENT_STATE_READY
    assert replicated.ready_on(1) == [True, True, None]  # C is not running: skipped, the deploy still succeeds
    before = replicated.served(1)
    for _ in range(40):
        assert predict(replicated.view, X, model=MODEL).deployment == f"{MODEL}-v1"
    gained = [after - b for after, b in zip(replicated.served(1), before, strict=True)]
    assert sum(gained) == 40 and gained[0] >= 10 and gained[1] >= 10, gained  # round-robin: 20 and 20


def test_a_dead_replica_takes_no_requests_and_gets_the_deployments_back_when_it_returns(replicated):
    deploy(replicated.view, 1, model=MODEL, device_class="cpu")
    b = replicated.replicas[1]
    os.kill(b.proc.pid, signal.SIGKILL)
    b.proc.wait()
    for _ in range(20):  # not one request fails: the one that meets the dead replica is tried on the next
        predict(replicated.view, X, model=MODEL)
    assert replicated.health() == health_pb2.HealthCheckResponse.SERVING  # the pool still has a ready replica

    b.start()  # explicit model control, nothing loaded at start: the gateway must give it the deployment
    b.wait_healthy(60)
    wait_for(lambda: replicated.ready_on(1)[1], 60, "the returning replica was never given the deployment")
    before = replicated.served(1)[1]
    for _ in range(20):
        predict(replicated.view, X, model=MODEL)
    assert replicated.served(1)[1] - before >= 5  # it takes requests again


def test_an_undeployed_model_leaves_the_repository_and_a_new_replica_serves_only_what_is_deployed(replicated):
    deploy(replicated.view, 1, model=MODEL, device_class="cpu")
    deploy(replicated.view, 2, model=MODEL, device_class="cpu")
    assert replicated.ready_on(2)[:2] == [True, True]
    replicated.view.stub().Undeploy(inference_pb2.UndeployRequest(name=f"{MODEL}-v2"), metadata=replicated.view.md())
    assert replicated.ready_on(2)[:2] == [False, False]
    assert not (replicated.repository / replicated.triton_name(2)).exists()
    assert (replicated.repository / replicated.triton_name(1)).is_dir()

    c = replicated.replicas[2]  # a replica the autoscaler adds: --load-model=* loads the repository's models
    c.start()
    c.wait_healthy(60)
    wait_for(lambda: replicated.ready_on(1)[2], 30, "the new replica did not load v1 from the repository")
    assert replicated.ready_on(2)[2] is False

    def reaches_c() -> bool:
        predict(replicated.view, X, model=MODEL)
        return replicated.served(1)[2] > 0
    wait_for(reaches_c, 30, "the new replica never took a request")  # found by the watcher's next probe
