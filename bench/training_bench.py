"""Training jobs benchmark: submit → RUNNING latency, a burst of small jobs, and DDP on CPU.

Starts redis-server, ``margin.budget``, ``margin.registry`` and ``margin.training`` as real processes on one
SQLite database in a temp dir, plus real Celery workers (``margin.cluster.processes.worker_spec``: one
training process each, consuming ``train.cpu``), and drives them through the TrainingJobs gRPC API with a
tenant key, as a user would. Triton and the inference gateway are not started: training does not use them,
and on a small machine they would only take CPU from the workers.

1. **Idle worker.** N tiny jobs (mlp, 1 epoch on sklearn:digits), one at a time: each is submitted only when
   the previous one has ended and the worker is idle again. Per job: the SubmitJob call, the job's
   ``start_time`` (set in SQL by the worker when it takes the lease) minus the moment the client started the
   SubmitJob call, ``start_time - create_time`` (both server-side UTC), and when a WatchJob stream opened
   right after SubmitJob returned delivered the RUNNING event.
2. **Burst.** M small jobs (1 epoch, tiny hidden layer) submitted as fast as possible from T threads; one
   burst per worker count in ``--burst-workers`` (default 1, then 2 worker processes). Checks that every job
   SUCCEEDED exactly once: ``attempts == 1``, a distinct result version per job, the registry's ListVersions
   holds exactly M versions whose recipes name M distinct jobs, one ledger entry per job (the ledger table,
   read from SQLite: Budgets.ListLedger is not served yet), one attempt row per job, and no task received
   twice (the Celery workers' logs). Reports ``start_time - create_time`` (which includes waiting behind
   earlier jobs) and the dispatch latency proper: ``start_time - max(create_time, end_time of the previous
   job on the same worker)``, i.e. how long a job waited while a worker was free.
3. **DDP.** The same job (mlp [256, 256] on digits, 20 epochs, batch 64) with world_size 1 and 2 (gloo on
   CPU), in A-B-B-A order. Reports wall times, the job's stored distributed_efficiency (η) and
   scaling_efficiency, η = T1/T2 from the two runs' training-loop times and from their wall times, and cost.
4. **A team's own code (the sandbox's overhead).** The same CNN twice, on digits uploaded once as a registry
   dataset-npz: as the built-in ``cnn`` family, and as a model package whose ``build_model`` returns that built-in
   model (so it trains in the bubblewrap sandbox, its loop's hooks answered by the worker over a pipe). Same spec
   otherwise (epochs, batch, lr, seed, world_size 1, fp32), in alternating order after a warm-up job of each.
   Per job, from what the worker records: job start → first training step (``start_time`` → the attempt's
   before-training WatchJob event), the training loop per step (loop start → the last epoch's end event, over
   the steps) and the part of it inside the step (``efficiency.t_distributed_s``), last epoch's end → end, wall
   time, ``training_throughput.overhead_seconds``, cost; medians per kind and package / built-in ratios.

The default order is idle, DDP, package, burst, so the DDP and package runs have one worker to themselves. Run
with some ``--phases`` only, the results file keeps the other phases' sections from its previous run (their date
and settings under ``carried_over``).

    PYTHONPATH=services python bench/training_bench.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import re
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from google.protobuf import json_format
from harness import cpu_model, cpu_seconds, machine_busy, process_tree, run_and_write, start, tenant_key
from margin.cluster.processes import ManagedProcess, redis_spec, standalone_service_spec, worker_spec
from margin.common import config, protoconv
from margin.modelzoo.architectures import build_model
from margin.modelzoo.datasets import load_builtin
from margin.sdk.channel import connect
from margin.sdk.pages import all_pages
from margin.sdk.registry import RegistryClient
from margin.v1 import common_pb2, registry_pb2, registry_pb2_grpc, training_pb2, training_pb2_grpc
from margin.worker.sandbox import Limits, Sandbox, SandboxDirs, code_root
from rich.console import Console
from rich.table import Table

GOAL_IDLE_P50_MS = 100.0      # idle worker: submit → RUNNING p50
GOAL_BURST_P99_S = 2.0        # burst: submit → dispatch p99
GOAL_DUPLICATES = 0
TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED,
            common_pb2.JOB_STATE_BUDGET_EXCEEDED}


def state_name(value: int) -> str:
    return common_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


# -- processes -------------------------------------------------------------------------------------
@dataclass
class CpuProbe:
    """CPU used between two snaps by this benchmark's processes (services, workers with their pool processes
    and DDP ranks, the client) and by the whole machine: the difference is load from outside the benchmark."""
    processes: list[ManagedProcess]

    def snap(self) -> dict[str, float]:
        ours = sum(cpu_seconds(process_tree(p.proc.pid), reaped_children=True) for p in self.processes if p.proc)
        busy, total = machine_busy()
        return {"ours": ours + sum(os.times()[:4]), "machine_busy": busy, "machine_total": total,
                "wall": time.monotonic()}

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        d = {k: after[k] - before[k] for k in before}
        wall = max(d.pop("wall"), 1e-9)
        return {"wall_s": wall, "benchmark_cores": d["ours"] / wall, "machine_busy_cores": d["machine_busy"] / wall,
                "machine_cores": d["machine_total"] / wall,
                "outside_cores": max(0.0, d["machine_busy"] - d["ours"]) / wall}


# -- the stack -------------------------------------------------------------------------------------
class Stack:
    """redis-server, budget, registry and training services, and Celery workers, in ``workdir``."""

    def __init__(self, workdir: Path, admin_key: str, lease_seconds: float):
        self.workdir, self.admin_key = workdir, admin_key
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.started: list[ManagedProcess] = []
        self.redis = start(redis_spec(workdir), workdir, self.started, 30)
        redis_url = f"redis://{self.redis.spec.address}/0"
        # Budget first: each service creates its schema on start, and SQLite DDL from two processes can race.
        self.budget = start(standalone_service_spec("budget", "margin.budget", workdir, admin_key),
                            workdir, self.started, 60)
        self.registry = start(standalone_service_spec("registry", "margin.registry", workdir, admin_key),
                              workdir, self.started, 60)
        common = {"MARGIN_REDIS_URL": redis_url, "MARGIN_REGISTRY_ADDR": self.registry.spec.address,
                  "MARGIN_BUDGET_ADDR": self.budget.spec.address,  # admission reads the tenant's budget there
                  "MARGIN_JOB_LEASE_SECONDS": str(lease_seconds), "MARGIN_MAX_WORLD_SIZE": "2"}
        self.training = start(standalone_service_spec("training", "margin.training", workdir, admin_key, **common),
                              workdir, self.started, 60)
        # The worker sees what the training service sees (same database, Redis, registry, admin key).
        env = dict(self.training.spec.env)
        for key in ("MARGIN_GRPC_PORT", "MARGIN_GRPC_HOST", "MARGIN_METRICS_PORT"):
            env.pop(key, None)
        self.worker_env = {**env, "MARGIN_CHECKPOINT_DIR": str(workdir / "checkpoints")}
        self.workers: list[ManagedProcess] = []

    def add_worker(self, threads: int = 0) -> ManagedProcess:
        """One more worker; ``threads`` torch threads per training process (0 = every core)."""
        name = "worker-cpu" if not self.workers else f"worker-cpu-{len(self.workers) + 1}"
        env = {**self.worker_env, "MARGIN_TORCH_THREADS": str(threads)}
        worker = start(worker_spec(self.workdir, env, name=name), self.workdir, self.started, 120)
        self.workers.append(worker)
        return worker

    def replace_workers(self, count: int) -> None:
        """Stop every worker and start ``count`` fresh ones sharing the cores (cores // count threads each)."""
        for worker in self.workers:
            worker.stop()
            self.started.remove(worker)
        self.workers = []
        for _ in range(count):
            self.add_worker(threads=max(1, (os.cpu_count() or 1) // count))

    def check_alive(self) -> None:
        for process in self.started:
            if process.proc.poll() is not None:
                raise RuntimeError(f"{process.spec.name} died during the run\n{process.log_tail()}")

    def stop(self) -> None:
        for process in reversed(self.started):
            process.stop()

    def sql(self, query: str, args: tuple = ()) -> list[tuple]:
        """A read-only query on the stack's SQLite database (the ledger, stored job fields the API omits)."""
        db = sqlite3.connect(f"file:{self.workdir / 'margin.db'}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(query, args).fetchall()
        finally:
            db.close()


class Client:
    def __init__(self, stack: Stack, key: str):
        self.training_conn = connect(stack.training.spec.address, key)
        self.registry_conn = connect(stack.registry.spec.address, key)
        self.md = self.training_conn.metadata
        self.jobs = training_pb2_grpc.TrainingJobsStub(self.training_conn.channel)
        self.registry = registry_pb2_grpc.ModelRegistryStub(self.registry_conn.channel)

    def close(self) -> None:
        self.training_conn.close()
        self.registry_conn.close()

    def get(self, job_id: str) -> training_pb2.TrainingJob:
        return self.jobs.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=self.md, timeout=30)

    def all_jobs(self, state: int = common_pb2.JOB_STATE_UNSPECIFIED) -> list[training_pb2.TrainingJob]:
        call = lambda r: self.jobs.ListJobs(r, metadata=self.md, timeout=60)  # noqa: E731
        return all_pages(call, training_pb2.ListJobsRequest(page_size=500, state=state), "jobs")

    def versions(self, model: str) -> list[registry_pb2.ModelVersion]:
        call = lambda r: self.registry.ListVersions(r, metadata=self.md, timeout=60)  # noqa: E731
        return all_pages(call, registry_pb2.ListVersionsRequest(model=model, page_size=500), "versions")


def spec(model: str, hidden: list[int], epochs: int, batch: int, world_size: int = 1,
         seed: int = 0) -> training_pb2.TrainingSpec:
    return training_pb2.TrainingSpec(
        model=model, family="mlp", architecture=protoconv.struct({"hidden": hidden}),
        dataset=common_pb2.DatasetRef(builtin="sklearn:digits"), epochs=epochs, batch_size=batch,
        world_size=world_size, seed=seed)


def seconds(ts) -> float:
    """A google.protobuf.Timestamp as POSIX seconds (0.0 when unset)."""
    return ts.seconds + ts.nanos / 1e9


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def dist_summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99),
            "mean": float(np.mean(values)) if values else float("nan"),
            "min": min(values, default=float("nan")), "max": max(values, default=float("nan"))}


def wait_terminal(client: Client, job_id: str, timeout: float) -> training_pb2.TrainingJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job.state in TERMINAL:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not end within {timeout:.0f}s")


# -- 1. idle worker --------------------------------------------------------------------------------
def one_idle_job(client: Client, model: str, settle_s: float) -> dict:
    time.sleep(settle_s)  # the worker has acked the previous task and is back waiting on the queue
    t_call = time.time()
    job = client.jobs.SubmitJob(training_pb2.SubmitJobRequest(spec=spec(model, [32], 1, 64)),
                                metadata=client.md, timeout=30)
    t_return = time.time()
    t_running_seen = None
    for event in client.jobs.WatchJob(training_pb2.WatchJobRequest(id=job.id), metadata=client.md, timeout=120):
        if t_running_seen is None and event.state == common_pb2.JOB_STATE_RUNNING:
            t_running_seen = time.time()
        if event.state in TERMINAL:
            break
    final = wait_terminal(client, job.id, 60)
    start, create = seconds(final.start_time), seconds(final.create_time)
    return {"id": job.id, "state": state_name(final.state), "attempts": final.attempts,
            "submit_rpc_ms": (t_return - t_call) * 1000,
            "call_to_running_ms": (start - t_call) * 1000,
            "create_to_running_ms": (start - create) * 1000,
            "call_to_create_ms": (create - t_call) * 1000,
            "call_to_running_seen_ms": (t_running_seen - t_call) * 1000 if t_running_seen else None,
            "run_s": seconds(final.end_time) - start}


def idle_phase(client: Client, stack: Stack, args: argparse.Namespace, console: Console) -> dict:
    model = "bench-idle"
    warmup = [one_idle_job(client, model, args.settle) for _ in range(args.idle_warmup)]
    probe = CpuProbe(stack.started)
    before = probe.snap()
    jobs = []
    for i in range(args.idle_jobs):
        jobs.append(one_idle_job(client, model, args.settle))
        if (i + 1) % 10 == 0:
            console.print(f"  idle: {i + 1}/{args.idle_jobs} jobs, last submit→RUNNING "
                          f"{jobs[-1]['call_to_running_ms']:.1f} ms")
    cpu = CpuProbe.delta(before, probe.snap())
    loop_s = train_seconds(stack, [j["id"] for j in jobs])
    for j in jobs:
        j["train_loop_s"] = loop_s.get(j["id"])
    seen = [j["call_to_running_seen_ms"] for j in jobs if j["call_to_running_seen_ms"] is not None]
    return {"jobs": len(jobs), "warmup_jobs": warmup, "settle_s": args.settle,
            "all_succeeded": all(j["state"] == "SUCCEEDED" for j in jobs + warmup),
            "spec": "mlp hidden [32], 1 epoch, batch 64, sklearn:digits",
            "call_to_running_ms": dist_summary([j["call_to_running_ms"] for j in jobs]),
            "create_to_running_ms": dist_summary([j["create_to_running_ms"] for j in jobs]),
            "submit_rpc_ms": dist_summary([j["submit_rpc_ms"] for j in jobs]),
            "call_to_running_seen_ms": dist_summary(seen), "watch_running_events": len(seen),
            "job_run_s": dist_summary([j["run_s"] for j in jobs]),
            "job_train_loop_s": dist_summary([j["train_loop_s"] for j in jobs if j["train_loop_s"] is not None]),
            "cpu": cpu, "per_job": jobs}


# -- 2. burst --------------------------------------------------------------------------------------
TASK_RECEIVED = re.compile(r"Task margin\.train\[([^\]]+)\] received")


def tasks_received(workers: list[ManagedProcess], ids: set[str]) -> dict[str, list[str]]:
    """Job id -> the workers that received a task for it, from the Celery main processes' logs (a task id is
    the job id; a re-queue by the reaper appends ``.requeueN``). Two entries = a second delivery."""
    received: dict[str, list[str]] = {}
    for worker in workers:
        text = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
        for task_id in TASK_RECEIVED.findall(text):
            job_id = task_id.split(".requeue")[0]
            if job_id in ids:
                received.setdefault(job_id, []).append(worker.spec.name)
    return received


def train_seconds(stack: Stack, ids: set[str] | list[str]) -> dict[str, float]:
    """Job id -> seconds inside the training loop (``efficiency.t_distributed_s``, stored in SQL by the worker;
    the API exposes only η), so a job's run time splits into training and everything around it."""
    ids = list(ids)
    marks = ",".join("?" * len(ids))
    rows = stack.sql(f"SELECT id, efficiency FROM jobs WHERE id IN ({marks})", tuple(ids))
    out = {}
    for job_id, raw in rows:
        value = json.loads(raw or "{}").get("t_distributed_s")
        if value is not None:
            out[job_id] = float(value)
    return out


def dispatch_latencies(jobs: list[training_pb2.TrainingJob], worker_of: dict[str, str]) -> list[float]:
    """Per job: start_time - max(create_time, end_time of the previous job on the same worker), in seconds —
    the time a job waited while its worker was free (worker start-up excluded: the first job on a worker
    that started before the burst waits from its create_time)."""
    by_worker: dict[str, list[training_pb2.TrainingJob]] = {}
    for job in jobs:
        by_worker.setdefault(worker_of.get(job.id, "?"), []).append(job)
    out = []
    for runs in by_worker.values():
        runs.sort(key=lambda j: seconds(j.start_time))
        free_at = 0.0
        for job in runs:
            out.append(seconds(job.start_time) - max(seconds(job.create_time), free_at))
            free_at = seconds(job.end_time)
    return out


def burst_phase(client: Client, stack: Stack, args: argparse.Namespace, console: Console) -> dict:
    """One burst per entry of ``--burst-workers``, each on fresh workers that split the cores between them."""
    runs = []
    for workers in sorted(args.burst_workers):
        stack.replace_workers(workers)
        time.sleep(1.0)  # a new worker's first BRPOP is in place
        console.print(f"  burst with {len(stack.workers)} worker process(es)")
        runs.append(one_burst(client, stack, args, console, f"bench-burst-w{workers}"))
        stack.check_alive()
    return {"runs": runs}


def one_burst(client: Client, stack: Stack, args: argparse.Namespace, console: Console, model: str) -> dict:
    probe = CpuProbe(stack.started)
    submitted: list[dict] = []
    lock = threading.Lock()
    errors: list[str] = []

    def submit(i: int) -> None:
        t0 = time.time()
        try:
            job = client.jobs.SubmitJob(training_pb2.SubmitJobRequest(
                spec=spec(model, [args.burst_hidden], 1, 64, seed=i), idempotency_key=f"{model}-{i}"),
                metadata=client.md, timeout=60)
        except grpc.RpcError as err:
            with lock:
                errors.append(f"{i}: {err.code().name} {err.details()}")
            return
        with lock:
            submitted.append({"i": i, "id": job.id, "t_call": t0, "t_return": time.time()})

    before = probe.snap()
    t_first = time.time()
    with ThreadPoolExecutor(args.burst_threads) as pool:
        list(pool.map(submit, range(args.burst_jobs)))
    t_submitted = time.time()
    cpu_submit = CpuProbe.delta(before, probe.snap())
    console.print(f"  burst: {len(submitted)} jobs submitted in {t_submitted - t_first:.2f} s from "
                  f"{args.burst_threads} threads ({len(errors)} refused); waiting for them to end")
    deadline = time.monotonic() + args.burst_timeout
    while time.monotonic() < deadline:
        open_jobs = sum(len(client.all_jobs(s)) for s in (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING))
        if open_jobs == 0:
            break
        time.sleep(1.0)
    else:
        raise TimeoutError(f"burst: jobs still open after {args.burst_timeout:.0f}s")
    cpu = CpuProbe.delta(before, probe.snap())
    ids = {s["id"] for s in submitted}
    jobs = [j for j in client.all_jobs() if j.id in ids]
    by_id = {j.id: j for j in jobs}
    t_call = {s["id"]: s["t_call"] for s in submitted}

    received = tasks_received(stack.workers, ids)
    worker_of = {job_id: names[0] for job_id, names in received.items()}
    attempt_rows: dict[str, int] = {}
    for job_id, n in stack.sql(f"SELECT job_id, COUNT(*) FROM job_attempts WHERE job_id IN "
                               f"({','.join('?' * len(ids))}) GROUP BY job_id", tuple(ids)):
        attempt_rows[job_id] = n
    versions = client.versions(model)
    version_jobs = [json_format.MessageToDict(v.recipe).get("job_id", "") for v in versions]
    registry_matches = all(job_id in by_id and by_id[job_id].result_version.number == v.number
                           for job_id, v in zip(version_jobs, versions, strict=True))
    result_versions = [(j.result_version.model, j.result_version.number) for j in jobs
                       if j.state == common_pb2.JOB_STATE_SUCCEEDED]
    marks = ",".join("?" * len(ids))
    ledger = stack.sql(f"SELECT id, job_id, micros FROM ledger_entries WHERE job_id IN ({marks})", tuple(ids))
    ledger_per_job: dict[str, int] = {}
    for _, job_id, _ in ledger:
        ledger_per_job[job_id] = ledger_per_job.get(job_id, 0) + 1
    job_cost = sum(j.cost.total.micros for j in jobs)
    ledger_cost = sum(m for _, _, m in ledger)

    states: dict[str, int] = {}
    for j in jobs:
        states[state_name(j.state)] = states.get(state_name(j.state), 0) + 1
    checks = {
        "submitted": len(submitted), "refused_at_submit": errors, "states": states,
        "all_succeeded": states.get("SUCCEEDED", 0) == args.burst_jobs,
        "attempts_not_1": sum(1 for j in jobs if j.attempts != 1),
        "distinct_result_versions": len(set(result_versions)),
        "registry_versions": len(versions), "registry_versions_distinct_jobs": len(set(version_jobs)),
        "registry_versions_of_burst_jobs": len(set(version_jobs) & ids),
        "result_version_matches_registry": registry_matches,
        "ledger_entries": len(ledger), "ledger_jobs": len(ledger_per_job),
        "ledger_jobs_with_more_than_one_entry": sum(1 for n in ledger_per_job.values() if n > 1),
        "ledger_micros": ledger_cost, "job_cost_micros": job_cost,
        "attempt_rows": sum(attempt_rows.values()),
        "jobs_with_more_than_one_attempt_row": sum(1 for n in attempt_rows.values() if n > 1),
        "tasks_received": sum(len(v) for v in received.values()),
        "tasks_received_more_than_once": sum(1 for v in received.values() if len(v) > 1),
    }
    duplicates = (checks["attempts_not_1"] + (args.burst_jobs - checks["distinct_result_versions"])
                  + checks["jobs_with_more_than_one_attempt_row"]
                  + max(0, checks["registry_versions"] - checks["registry_versions_distinct_jobs"])
                  + checks["ledger_jobs_with_more_than_one_entry"] + checks["tasks_received_more_than_once"])
    checks["duplicates"] = duplicates
    checks["ok"] = (checks["all_succeeded"] and duplicates == 0 and checks["registry_versions"] == args.burst_jobs
                    and checks["registry_versions_of_burst_jobs"] == args.burst_jobs
                    and checks["result_version_matches_registry"] and checks["ledger_entries"] == args.burst_jobs
                    and ledger_cost == job_cost)

    done = [j for j in jobs if j.start_time.seconds]
    create_to_running = [seconds(j.start_time) - seconds(j.create_time) for j in done]
    call_to_running = [seconds(j.start_time) - t_call[j.id] for j in done]
    dispatch = dispatch_latencies(done, worker_of)
    last_end = max(seconds(j.end_time) for j in done)
    run_s = [seconds(j.end_time) - seconds(j.start_time) for j in done]
    loop_s = train_seconds(stack, ids)
    per_worker: dict[str, int] = {}
    for name in worker_of.values():
        per_worker[name] = per_worker.get(name, 0) + 1
    return {
        "model": model, "jobs": args.burst_jobs, "threads": args.burst_threads, "workers": len(stack.workers),
        "worker_concurrency": 1, "jobs_per_worker": per_worker,
        "spec": f"mlp hidden [{args.burst_hidden}], 1 epoch, batch 64, sklearn:digits",
        "submit_wall_s": t_submitted - t_first, "submit_rate_per_s": len(submitted) / (t_submitted - t_first),
        "submit_rpc_ms": dist_summary([(s["t_return"] - s["t_call"]) * 1000 for s in submitted]),
        "wall_s": last_end - t_first, "jobs_per_s": len(done) / (last_end - t_first),
        "create_to_running_s": dist_summary(create_to_running),
        "call_to_running_s": dist_summary(call_to_running),
        "dispatch_latency_s": dist_summary(dispatch),
        "job_run_s": dist_summary(run_s), "job_train_loop_s": dist_summary(list(loop_s.values())),
        "job_outside_loop_s": dist_summary([seconds(j.end_time) - seconds(j.start_time) - loop_s[j.id]
                                            for j in done if j.id in loop_s]),
        "checks": checks, "cpu_during_submit": cpu_submit, "cpu": cpu,
    }


# -- 3. DDP ----------------------------------------------------------------------------------------
def ddp_job(client: Client, stack: Stack, args: argparse.Namespace, world_size: int) -> dict:
    probe = CpuProbe(stack.started)
    before = probe.snap()
    t0 = time.time()
    job = client.jobs.SubmitJob(training_pb2.SubmitJobRequest(
        spec=spec("bench-ddp", [256, 256], args.ddp_epochs, 64, world_size=world_size)),
        metadata=client.md, timeout=30)
    final = wait_terminal(client, job.id, 600)
    t_done = time.time()
    # The job is terminal once rank 0 wrote it; the worker's task ends when every rank process has exited.
    names = tasks_received(stack.workers, {job.id}).get(job.id, [])
    worker = next((w for w in stack.workers if names and w.spec.name == names[0]), None)
    deadline = time.monotonic() + 60
    while worker and len(process_tree(worker.proc.pid)) > 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the Celery main process and its pool process remain; DDP ranks are below them
    t_free = time.time()
    cpu = CpuProbe.delta(before, probe.snap())
    efficiency = json.loads(stack.sql("SELECT efficiency FROM jobs WHERE id = ?", (job.id,))[0][0] or "{}")
    start, end = seconds(final.start_time), seconds(final.end_time)
    return {"id": job.id, "world_size": world_size, "state": state_name(final.state), "attempts": final.attempts,
            "wall_s": end - start, "client_wall_s": t_done - t0, "worker": ",".join(names) or "?",
            "end_to_worker_free_s": t_free - end,
            "train_s": efficiency.get("t_distributed_s"),
            "outside_loop_s": end - start - float(efficiency.get("t_distributed_s") or 0.0),
            "efficiency": efficiency, "cpu": cpu,
            "distributed_efficiency": final.distributed_efficiency, "scaling_efficiency": final.scaling_efficiency,
            "cost_micros": final.cost.total.micros, "device_hours": final.cost.device_hours,
            "currency": final.cost.total.currency,
            "val_accuracy": final.metrics.get("val_accuracy"), "message": final.message}


def ddp_phase(client: Client, stack: Stack, args: argparse.Namespace, console: Console) -> dict:
    runs = []
    order = [1, 2, 2, 1] * args.ddp_repeats
    for world_size in order:  # A-B-B-A: linear drift affects both equally
        run = ddp_job(client, stack, args, world_size)
        runs.append(run)
        console.print(f"  ddp: world_size {world_size} on {run['worker']}: {run['state']} wall {run['wall_s']:.2f} s, "
                      f"train {run['train_s'] or float('nan'):.2f} s, stored η {run['distributed_efficiency']:.2f}")
    summary = {}
    for ws in (1, 2):
        mine = [r for r in runs if r["world_size"] == ws]
        summary[ws] = {
            "runs": len(mine), "all_succeeded": all(r["state"] == "SUCCEEDED" for r in mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine),
            "train_s": statistics.median(r["train_s"] for r in mine if r["train_s"] is not None),
            "outside_loop_s": statistics.median(r["outside_loop_s"] for r in mine),
            "outside_cores": statistics.median(r["cpu"]["outside_cores"] for r in mine),
            "end_to_worker_free_s": statistics.median(r["end_to_worker_free_s"] for r in mine),
            "single_samples_per_s": statistics.median(r["efficiency"].get("single_samples_per_s", 0) for r in mine),
            "distributed_efficiency": statistics.median(r["distributed_efficiency"] for r in mine),
            "scaling_efficiency": statistics.median(r["scaling_efficiency"] for r in mine),
            "cost_micros": statistics.median(r["cost_micros"] for r in mine),
            "device_hours": statistics.median(r["device_hours"] for r in mine),
            "val_accuracy": statistics.median(r["val_accuracy"] for r in mine),
            "currency": mine[0]["currency"]}
    one, two = summary[1], summary[2]
    return {"spec": f"mlp hidden [256, 256], {args.ddp_epochs} epochs, batch 64, sklearn:digits, fp32, gloo on CPU",
            "order": order, "runs": runs, "by_world_size": {str(k): v for k, v in summary.items()},
            "eta_train_measured": one["train_s"] / two["train_s"],
            "eta_wall_measured": one["wall_s"] / two["wall_s"],
            "cost_ratio_2_over_1": two["cost_micros"] / max(one["cost_micros"], 1)}


# -- 4. a team's own code: the sandbox's overhead ----------------------------------------------------
PACKAGE_ARCH = {"image_size": 8, "channels": [16, 32], "num_classes": 10}
PACKAGE_SOURCE = b'''"""Margin's built-in CNN brought as a model package: the same model, trained in the sandbox."""
from margin.modelzoo.architectures import build_model as margin_build


def build_model(**config):
    return margin_build({"family": "cnn", **config})
'''
KINDS = ("builtin", "package")
PACKAGE_MEASURES = ("start_overhead_s", "loop_step_ms", "compute_step_ms", "around_step_ms", "end_overhead_s",
                    "wall_s", "throughput_overhead_s", "cost_micros", "val_accuracy")


def upload_package_inputs(client: Client) -> tuple[common_pb2.VersionRef, common_pb2.VersionRef]:
    """(dataset, package): sklearn's digits as a registry dataset-npz (``x`` FP32[n, 64], ``y`` INT64[n]), so both
    jobs read the same bytes from the registry, and the package above."""
    registry = RegistryClient(client.registry_conn)
    x, y = load_builtin("sklearn:digits")
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    refs = []
    for model, fmt, data in (("bench-digits", registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ, buffer.getvalue()),
                             ("bench-cnn-code", registry_pb2.ARTIFACT_FORMAT_MODEL_PACKAGE, PACKAGE_SOURCE)):
        registry.ensure_model(model)
        version = registry.upload_bytes(data, registry_pb2.UploadMetadata(model=model, format=fmt))
        refs.append(common_pb2.VersionRef(model=version.model, number=version.number))
    return refs[0], refs[1]


def same_model_specs(dataset: common_pb2.VersionRef, package: common_pb2.VersionRef,
                     epochs: int) -> dict[str, training_pb2.TrainingSpec]:
    """The built-in CNN and the package that builds it; everything else equal (data, epochs, batch, lr, seed,
    optimizer, world size 1, fp32)."""
    common = {"dataset": common_pb2.DatasetRef(registry=dataset), "epochs": epochs, "batch_size": 64,
              "learning_rate": 0.01, "seed": 0, "world_size": 1, "precision": training_pb2.PRECISION_FP32}
    return {"builtin": training_pb2.TrainingSpec(model="bench-cnn-builtin", family="cnn",
                                                 architecture=protoconv.struct(PACKAGE_ARCH), **common),
            "package": training_pb2.TrainingSpec(model="bench-cnn-package", package=package,
                                                 config=protoconv.struct(PACKAGE_ARCH), **common)}


def watched_job(client: Client, spec: training_pb2.TrainingSpec) -> tuple[training_pb2.TrainingJob, list]:
    """Submit ``spec``, follow its WatchJob stream to the end; returns the final job and every event seen."""
    job = client.jobs.SubmitJob(training_pb2.SubmitJobRequest(spec=spec), metadata=client.md, timeout=30)
    events = []
    for event in client.jobs.WatchJob(training_pb2.WatchJobRequest(id=job.id), metadata=client.md, timeout=600):
        events.append(event)
        if event.state in TERMINAL:
            break
    return wait_terminal(client, job.id, 60), events


def loop_marks(events: list[training_pb2.JobEvent], epochs: int) -> tuple[float, float]:
    """(loop start, loop end) of a job's training loop, in POSIX seconds stamped by the worker on its WatchJob
    events. Start: the last RUNNING event at step 0 before the first event past it, i.e. the heartbeat the
    attempt sends from ``before_training`` once data and model are ready and the first step is next (a sandbox's
    earlier heartbeats while it starts are also at step 0, and come before it). End: the RUNNING event of the
    last epoch's end, sent after its evaluation and checkpoint."""
    running = [e for e in events if e.state == common_pb2.JOB_STATE_RUNNING]
    first_step = next((i for i, e in enumerate(running) if e.step > 0), len(running))
    at_zero = [e for e in running[:first_step] if e.step == 0]
    last_epoch = [e for e in running if e.epoch == epochs]
    if not at_zero or not last_epoch:
        raise RuntimeError(f"the job's events lack the loop's start or its last epoch's end: "
                           f"{[(state_name(e.state), e.epoch, e.step) for e in events]}")
    return seconds(at_zero[-1].time), seconds(last_epoch[-1].time)


def newest_throughput_overhead(stack: Stack, builtin: bool) -> float:
    """``overhead_seconds`` of the newest training_throughput row (the worker's own account of a job's time outside
    its training loop, which it writes just before the job ends): jobs here run one at a time, so it is the job's
    that just ended. Its family (``cnn``, or ``pkg:…`` for a package) is checked."""
    family, overhead = stack.sql("SELECT family, overhead_seconds FROM training_throughput "
                                 "ORDER BY id DESC LIMIT 1")[0]
    if (family == "cnn") != builtin:
        raise RuntimeError(f"the newest throughput row is for {family!r}, not this job")
    return float(overhead)


def machine_load(window_s: float) -> float:
    """Busy cores of the whole machine over the next ``window_s`` seconds. Taken between jobs, while the stack
    idles, it is the load from outside the benchmark. (Per job, :class:`CpuProbe` cannot split it: the worker
    kills a finished sandbox, whose processes then leave its process tree unreaped, so their CPU would read as
    load from outside.)"""
    busy, _ = machine_busy()
    t0 = time.monotonic()
    time.sleep(window_s)
    return (machine_busy()[0] - busy) / (time.monotonic() - t0)


def same_model_run(client: Client, stack: Stack, kind: str, spec: training_pb2.TrainingSpec) -> dict:
    """One job, timed from its record: start (RUNNING) → loop start → last epoch's end → end, step times, cost."""
    outside = machine_load(0.5)
    probe = CpuProbe(stack.started)
    before = probe.snap()
    job, events = watched_job(client, spec)
    cpu = CpuProbe.delta(before, probe.snap())
    if job.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{kind} job {job.id} ended {state_name(job.state)}: {job.message}")
    loop_start, loop_end = loop_marks(events, spec.epochs)
    start, end = seconds(job.start_time), seconds(job.end_time)
    loop_step_ms = (loop_end - loop_start) / job.step * 1000
    compute_step_ms = train_seconds(stack, [job.id])[job.id] / job.step * 1000
    return {"kind": kind, "id": job.id, "attempts": job.attempts, "steps": job.step, "events": len(events),
            "start_overhead_s": loop_start - start, "loop_s": loop_end - loop_start, "loop_step_ms": loop_step_ms,
            "compute_step_ms": compute_step_ms, "around_step_ms": loop_step_ms - compute_step_ms,
            "end_overhead_s": end - loop_end, "wall_s": end - start,
            "throughput_overhead_s": newest_throughput_overhead(stack, kind == "builtin"),
            "cost_micros": job.cost.total.micros, "currency": job.cost.total.currency,
            "val_accuracy": job.metrics["val_accuracy"], "val_loss": job.metrics["val_loss"],
            "outside_cores_before": outside, "machine_busy_cores": cpu["machine_busy_cores"], "message": job.message}


SANDBOX_COMMANDS = (  # what a package job's sandbox start is made of, each command timed alone in the sandbox
    ("bwrap + setpriv + /bin/true", ["/bin/true"]),
    ("a fresh Python (-c pass)", [sys.executable, "-c", "pass"]),
    ("Python importing torch", [sys.executable, "-c", "import torch"]),
    ("Python importing Margin's package runtime", [sys.executable, "-c", "import margin.worker.package_runtime"]),
    ("… and making a first optimizer (torch.optim imports torch._dynamo)",
     [sys.executable, "-c", "import margin.worker.package_runtime, torch; "
                            "torch.optim.Adam(torch.nn.Linear(1, 1).parameters())"]))


def sandboxed_seconds(workdir: Path, limits: Limits, argv: list[str]) -> float:
    """Seconds from starting ``argv`` in Margin's own sandbox (:class:`~margin.worker.sandbox.Sandbox`: a job's
    namespaces, read-only binds, user, environment and limits) to its exit."""
    dirs = SandboxDirs.create(workdir / "sandbox-probe", "probe")
    try:
        t0 = time.perf_counter()
        code = Sandbox(dirs, limits, "probe").start(argv, dirs.root / "log", ()).wait()
        elapsed = time.perf_counter() - t0
        if code:
            raise RuntimeError(f"{argv} exited {code} in the sandbox: {(dirs.root / 'log').read_text()}")
        return elapsed
    finally:
        dirs.remove()


def plain_seconds(limits: Limits, argv: list[str]) -> float:
    """Seconds to run ``argv`` as a plain child process, with the sandbox's PYTHONPATH and thread counts."""
    threads = str(limits.threads)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(code_root()),
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True)
    return time.perf_counter() - t0


def sandbox_start_seconds(workdir: Path, repeats: int) -> dict:
    """Median seconds of each command above in the sandbox and outside it, alternating: how much of a package
    job's start is bwrap, how much a fresh Python and its imports, before the job's own inputs and model."""
    limits = Limits.from_config(config.torch_threads(), config.SANDBOX_MAX_SECONDS.get_float())  # as a job's
    outside = machine_load(0.5)
    out, every = {}, {}
    for label, argv in SANDBOX_COMMANDS:
        times: dict[str, list[float]] = {"sandbox": [], "plain": []}
        for _ in range(repeats):
            times["sandbox"].append(sandboxed_seconds(workdir, limits, argv))
            times["plain"].append(plain_seconds(limits, argv))
        out[label] = {where: statistics.median(values) for where, values in times.items()}
        every[label] = times
    return {"repeats": repeats, "seconds": out, "every_run": every, "outside_cores_before": outside}


def alternating(repeats: int) -> list[str]:
    """builtin, package, package, builtin, ...: pairs in alternating order, so drift affects both kinds alike."""
    return [kind for i in range(repeats) for kind in (KINDS if i % 2 == 0 else KINDS[::-1])]


def package_phase(client: Client, stack: Stack, args: argparse.Namespace, console: Console) -> dict:
    """The same CNN trained as the built-in family and as a package that builds it, on one worker."""
    dataset, package = upload_package_inputs(client)
    specs = same_model_specs(dataset, package, args.package_epochs)
    warmup = [same_model_run(client, stack, kind, specs[kind]) for _ in range(args.package_warmup) for kind in KINDS]
    runs = []
    for kind in alternating(args.package_repeats):
        runs.append(run := same_model_run(client, stack, kind, specs[kind]))
        console.print(f"  package: {kind}: start → loop {run['start_overhead_s']:.2f} s, loop "
                      f"{run['loop_step_ms']:.2f} ms/step (steps {run['compute_step_ms']:.2f}), end "
                      f"{run['end_overhead_s']:.2f} s, wall {run['wall_s']:.2f} s, {run['cost_micros']} micros")
    medians = {kind: {key: statistics.median(r[key] for r in runs if r["kind"] == kind) for key in PACKAGE_MEASURES}
               for kind in KINDS}
    starts = sandbox_start_seconds(stack.workdir, 3)
    parameters = sum(p.numel() for p in build_model({"family": "cnn", **PACKAGE_ARCH}).parameters())
    return {"spec": f"cnn {PACKAGE_ARCH['channels']} ({parameters} parameters), {args.package_epochs} epochs, "
                    f"batch 64, lr 0.01, seed 0, fp32, world_size 1, digits as a registry dataset-npz",
            "package_source": PACKAGE_SOURCE.decode(), "parameters": parameters,
            "order": alternating(args.package_repeats), "warmup_runs": warmup, "runs": runs, "median": medians,
            "ratio_package_over_builtin": {key: medians["package"][key] / medians["builtin"][key]
                                           for key in PACKAGE_MEASURES if medians["builtin"][key]},
            "currency": runs[0]["currency"], "sandbox_start_s": starts,
            "same_val_loss_in_every_run": len({round(r["val_loss"], 6) for r in runs}) == 1}


# -- report ----------------------------------------------------------------------------------------
def money(micros: float, currency: str = "USD") -> str:
    return f"{micros / 1e6:.6f} {currency}"


PACKAGE_ROWS = (  # (label, key, format, where the figure comes from)
    ("job start → first training step [s]", "start_overhead_s", "{:.2f}",
     "start_time → the before-training event (WatchJob)"),
    ("training loop per step [ms]", "loop_step_ms", "{:.2f}", "loop start → last epoch's end event, / steps"),
    ("  of which in the step [ms]", "compute_step_ms", "{:.2f}", "efficiency.t_distributed_s / steps"),
    ("  around the step [ms]", "around_step_ms", "{:.2f}", "the two above: hooks, pipe, eval, checkpoints"),
    ("last epoch's end → job end [s]", "end_overhead_s", "{:.2f}", "evaluation, export, registration"),
    ("whole job [s]", "wall_s", "{:.2f}", "start_time → end_time"),
    ("outside the loop, worker's record [s]", "throughput_overhead_s", "{:.2f}",
     "training_throughput.overhead_seconds"),
    ("cost [micros]", "cost_micros", "{:.0f}", "job cost.total"),
    ("val accuracy", "val_accuracy", "{:.3f}", "job metrics"))


def report_package(part: dict, console: Console) -> None:
    """The built-in vs package table: medians per kind and their ratio."""
    runs = len(part["runs"]) // 2
    t = Table(title=f"Same model as a built-in family and as a package (sandbox): {part['spec']}; medians of {runs} "
                    f"runs each, alternating",
              caption="loop start = the attempt's before-training heartbeat (data and model ready); loop end = the "
                      "last epoch's end heartbeat (after its evaluation and checkpoint); both stamped by the worker")
    for col, justify in (("measure", "left"), ("built-in", "right"), ("package", "right"),
                         ("package / built-in", "right"), ("from", "left")):
        t.add_column(col, justify=justify)
    builtin, package, ratio = part["median"]["builtin"], part["median"]["package"], part["ratio_package_over_builtin"]
    for label, key, fmt, source in PACKAGE_ROWS:
        t.add_row(label, fmt.format(builtin[key]), fmt.format(package[key]),
                  f"{ratio[key]:.2f}×" if key in ratio else "-", source)
    console.print(t)
    console.print(f"  order {' '.join(part['order'])} after {len(part['warmup_runs'])} warm-up jobs (left out); "
                  f"same val_loss in every run: {part['same_val_loss_in_every_run']}")
    console.print("  machine busy cores just before each run (load from outside) / during it: "
                  + ", ".join(f"{r['outside_cores_before']:.2f} / {r['machine_busy_cores']:.2f}" for r in part["runs"]))
    starts = part["sandbox_start_s"]
    console.print(f"  what a sandbox's start is made of, seconds in Margin's sandbox / as a plain process (median of "
                  f"{starts['repeats']}): " + "; ".join(f"{label} {value['sandbox']:.2f} / {value['plain']:.2f}"
                                                       for label, value in starts["seconds"].items()))


def report(result: dict, console: Console) -> None:
    for name, earlier in result.get("carried_over", {}).items():
        console.print(f"[dim]{name}: not run now; kept from the run of {earlier['date']}[/]")
    idle = result.get("idle")
    if idle:
        t = Table(title=f"Idle worker: submit → RUNNING, {idle['jobs']} jobs one at a time ({idle['spec']})",
                  caption="call → RUNNING = job start_time (set by the worker in SQL) − client's SubmitJob call "
                          "start; seen = RUNNING event received on WatchJob")
        for col in ("measure", "p50 ms", "p90 ms", "p99 ms", "max ms"):
            t.add_column(col, justify="right")
        for label, key in (("SubmitJob call → RUNNING (start_time)", "call_to_running_ms"),
                           ("create_time → start_time (server)", "create_to_running_ms"),
                           ("SubmitJob call → RUNNING seen on WatchJob", "call_to_running_seen_ms"),
                           ("SubmitJob RPC (client)", "submit_rpc_ms")):
            d = idle[key]
            t.add_row(label, f"{d['p50']:.1f}", f"{d['p90']:.1f}", f"{d['p99']:.1f}", f"{d['max']:.1f}")
        console.print(t)
        if idle["warmup_jobs"]:
            cold = idle["warmup_jobs"][0]
            console.print(f"  left out: the first job on the fresh worker (its pool process connects to SQL and "
                          f"Redis): SubmitJob call → RUNNING {cold['call_to_running_ms']:.1f} ms. Job run time "
                          f"p50 {idle['job_run_s']['p50'] * 1000:.0f} ms, of which training loop "
                          f"{idle['job_train_loop_s']['p50'] * 1000:.0f} ms")
    for burst in result.get("burst", {}).get("runs", []):
        c = burst["checks"]
        t = Table(title=f"Burst: {burst['jobs']} jobs from {burst['threads']} threads, {burst['workers']} worker "
                        f"process(es) × concurrency 1 ({burst['spec']})")
        for col in ("measure", "p50", "p90", "p99", "max"):
            t.add_column(col, justify="right")
        for label, key, unit, scale in (("create_time → start_time (incl. queueing)", "create_to_running_s", "s", 1),
                                        ("dispatch latency (worker free → RUNNING)", "dispatch_latency_s", "ms", 1000),
                                        ("SubmitJob RPC under the burst", "submit_rpc_ms", "ms", 1),
                                        ("job run time (start → end)", "job_run_s", "s", 1),
                                        ("  of which in the training loop", "job_train_loop_s", "s", 1),
                                        ("  of which around it (data, checkpoint, register)", "job_outside_loop_s",
                                         "s", 1)):
            d = burst[key]
            t.add_row(f"{label} [{unit}]", *(f"{d[q] * scale:.2f}" for q in ("p50", "p90", "p99", "max")))
        console.print(t)
        console.print(f"  submitted {c['submitted']} in {burst['submit_wall_s']:.2f} s "
                      f"({burst['submit_rate_per_s']:.0f}/s); all ended after {burst['wall_s']:.1f} s → "
                      f"{burst['jobs_per_s']:.2f} jobs/s; per worker {burst['jobs_per_worker']}")
        console.print(f"  states {c['states']}; attempts≠1: {c['attempts_not_1']}; distinct result versions "
                      f"{c['distinct_result_versions']}; registry versions {c['registry_versions']} "
                      f"({c['registry_versions_of_burst_jobs']} distinct burst jobs); ledger entries "
                      f"{c['ledger_entries']} over {c['ledger_jobs']} jobs, sum {c['ledger_micros']} = job costs "
                      f"{c['job_cost_micros']}: {c['ledger_micros'] == c['job_cost_micros']}; tasks received "
                      f"{c['tasks_received']} (twice: {c['tasks_received_more_than_once']}); attempt rows "
                      f"{c['attempt_rows']}")
        cpu = burst["cpu"]
        console.print(f"  CPU over the burst: benchmark {cpu['benchmark_cores']:.2f} cores, whole machine "
                      f"{cpu['machine_busy_cores']:.2f} of {cpu['machine_cores']:.0f} (outside the benchmark "
                      f"{cpu['outside_cores']:.2f})")
    ddp = result.get("ddp")
    if ddp:
        t = Table(title=f"DDP on CPU: {ddp['spec']}; medians of {ddp['by_world_size']['1']['runs']} runs each "
                        "(A-B-B-A)",
                  caption="stored η = the job's distributed_efficiency (T_single from the launcher's single-process "
                          "calibration, in training-step time); measured η = T(world 1) / T(world 2) from the two runs")
        for col in ("world_size", "wall s", "train loop s", "outside loop s", "stored η", "stored scaling", "cost",
                    "device-h", "val acc"):
            t.add_column(col, justify="right")
        for ws, s in ddp["by_world_size"].items():
            t.add_row(ws, f"{s['wall_s']:.2f}", f"{s['train_s']:.2f}", f"{s['outside_loop_s']:.2f}",
                      f"{s['distributed_efficiency']:.2f}",
                      f"{s['scaling_efficiency']:.2f}", money(s["cost_micros"], s["currency"]),
                      f"{s['device_hours']:.6f}", f"{s['val_accuracy']:.3f}")
        console.print(t)
        stored = ", ".join(f"{r['distributed_efficiency']:.2f}" for r in ddp["runs"] if r["world_size"] == 2)
        console.print(f"  measured η (train loop) = {ddp['eta_train_measured']:.2f}, η (job wall) = "
                      f"{ddp['eta_wall_measured']:.2f}; cost world 2 / world 1 = {ddp['cost_ratio_2_over_1']:.2f}×; "
                      f"stored η per world-2 run: {stored}")
        two = ddp["by_world_size"]["2"]
        console.print(f"  world 2: the worker is busy {two['end_to_worker_free_s']:.2f} s after the job's end_time "
                      f"(rank processes exiting; not billed)")
    if result.get("package"):
        report_package(result["package"], console)
    for goal in result["goals"]:
        mark = "[green]met[/]" if goal["met"] else "[red]missed[/]"
        console.print(f"{mark}  {goal['name']}: {goal['goal']} - measured {goal['value']}")


def goals(result: dict) -> list[dict]:
    out = []
    if "idle" in result:
        v = result["idle"]["call_to_running_ms"]["p50"]
        out.append({"name": "idle submit→RUNNING p50", "goal": f"<= {GOAL_IDLE_P50_MS:.0f} ms",
                    "value": f"{v:.1f} ms", "met": v <= GOAL_IDLE_P50_MS})
    for b in result.get("burst", {}).get("runs", []):
        w = f"burst ({b['workers']} worker{'s' if b['workers'] > 1 else ''})"
        v = b["create_to_running_s"]["p99"]
        out.append({"name": f"{w} submit→dispatch p99 (start_time - create_time, incl. queueing)",
                    "goal": f"<= {GOAL_BURST_P99_S:.0f} s", "value": f"{v:.2f} s", "met": v <= GOAL_BURST_P99_S})
        d = b["dispatch_latency_s"]["p99"]
        out.append({"name": f"{w} dispatch latency p99 (worker free → RUNNING, queueing excluded)",
                    "goal": f"<= {GOAL_BURST_P99_S:.0f} s", "value": f"{d * 1000:.0f} ms",
                    "met": d <= GOAL_BURST_P99_S})
        dup = b["checks"]["duplicates"]
        out.append({"name": f"{w} duplicates (second attempts, versions, ledger entries, deliveries)",
                    "goal": f"== {GOAL_DUPLICATES} and all {b['jobs']} SUCCEEDED", "value": str(dup),
                    "met": dup == GOAL_DUPLICATES and b["checks"]["ok"]})
    return out


def run(args: argparse.Namespace, console: Console) -> dict:
    admin_key = secrets.token_urlsafe(32)
    workdir = Path(tempfile.mkdtemp(prefix="margin-training-bench-"))
    stack: Stack | None = None
    client: Client | None = None
    result: dict = {}
    try:
        t0 = time.monotonic()
        stack = Stack(workdir, admin_key, args.lease_seconds)
        stack.add_worker()
        console.print(f"stack up in {time.monotonic() - t0:.1f} s (redis, budget, registry, training, 1 worker)")
        client = Client(stack, tenant_key(stack.budget, admin_key, "training bench"))
        for name in args.phases:
            console.print(f"[bold]{name}[/]")
            result[name] = PHASES[name](client, stack, args, console)
            stack.check_alive()
    except Exception:
        if stack:
            for process in stack.started:
                console.print(f"--- {process.spec.name} log tail ---\n{process.log_tail(30)}")
        raise
    finally:
        if client:
            client.close()
        if stack:
            stack.stop()
        if args.keep:
            console.print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    out = {
        "machine": {"node": platform.node(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "grpcio": grpc.__version__, "torch": torch.__version__},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {"phases": args.phases, "idle_jobs": args.idle_jobs, "idle_warmup": args.idle_warmup,
                     "settle_s": args.settle, "burst_jobs": args.burst_jobs, "burst_threads": args.burst_threads,
                     "burst_workers": args.burst_workers, "burst_hidden": args.burst_hidden,
                     "ddp_epochs": args.ddp_epochs, "ddp_repeats": args.ddp_repeats,
                     "package_epochs": args.package_epochs, "package_repeats": args.package_repeats,
                     "package_warmup": args.package_warmup,
                     "lease_seconds": args.lease_seconds,
                     "stack": "redis-server + margin.budget + margin.registry + margin.training (real processes, "
                              "one SQLite database) + Celery workers (worker_spec: --concurrency 1 each)"},
        **carried_over(args.out, args.phases),
        **result,
    }
    out["goals"] = goals(out)
    return out


PHASES: dict[str, Callable] = {"idle": idle_phase, "burst": burst_phase, "ddp": ddp_phase, "package": package_phase}


def carried_over(path: Path, phases: list[str]) -> dict:
    """The sections of the phases this run leaves out, kept from the results file it replaces, with the date,
    machine and settings of the run that measured each (``carried_over``): running one part does not erase the
    others."""
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    earlier = previous.get("carried_over", {})
    kept = {name: previous[name] for name in PHASES if name not in phases and name in previous}
    if not kept:
        return {}
    measured_by = {key: previous.get(key) for key in ("date", "machine", "settings")}
    return {**kept, "carried_over": {name: earlier.get(name) or measured_by for name in kept}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", nargs="+", choices=("idle", "burst", "ddp", "package"),
                        default=["idle", "ddp", "package", "burst"],
                        help="run in this order (DDP and package before the burst: they then run with one worker); "
                             "the sections of phases left out are kept from the existing --out file")
    parser.add_argument("--idle-jobs", type=int, default=30)
    parser.add_argument("--idle-warmup", type=int, default=2, help="jobs run first and left out of the figures")
    parser.add_argument("--settle", type=float, default=0.25,
                        help="seconds between a job's end and the next submit, so the worker is idle again")
    parser.add_argument("--burst-jobs", type=int, default=200)
    parser.add_argument("--burst-threads", type=int, default=8)
    parser.add_argument("--burst-workers", type=int, nargs="+", default=[1, 2],
                        help="one burst per entry: worker processes (each --concurrency 1); later phases keep "
                             "the largest number")
    parser.add_argument("--burst-hidden", type=int, default=8, help="hidden size of the burst's MLPs")
    parser.add_argument("--burst-timeout", type=float, default=1800)
    parser.add_argument("--ddp-epochs", type=int, default=20)
    parser.add_argument("--ddp-repeats", type=int, default=2, help="A-B-B-A rounds (each: 2 runs per world size)")
    parser.add_argument("--package-epochs", type=int, default=10, help="epochs of each built-in and package job")
    parser.add_argument("--package-repeats", type=int, default=3, help="jobs of each kind, in alternating pairs")
    parser.add_argument("--package-warmup", type=int, default=1,
                        help="jobs of each kind run first and left out of the figures")
    parser.add_argument("--lease-seconds", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/training.json"))
    args = parser.parse_args()
    if min(args.idle_jobs, args.burst_jobs, args.burst_threads, *args.burst_workers, args.ddp_epochs,
           args.package_epochs, args.package_repeats) < 1:
        parser.error("counts must be >= 1")

    run_and_write(run, report, args)


if __name__ == "__main__":
    main()
