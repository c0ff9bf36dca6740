"""DistributedDataParallel: the worker launches ``world_size`` rank processes (gloo on CPU, nccl on GPU).

Before the ranks start, the launcher times training steps of the same job in one process, which gives
T_single for η = T_single / T_distributed, both counted in training-step time (evaluation, checkpoints and
process start-up are left out of both). Rank 0 carries the attempt (lease, cost, checkpoints, events, registration);
the other ranks train and follow its decisions. Ranks die with the launcher (PDEATHSIG), so a killed worker
leaves no orphans, and a rank that fails takes the others down with it.

Run as ``python -m margin.worker.ddp`` by the launcher only.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from margin.cluster.processes import free_port, set_parent_death_signal
from margin.common import config
from margin.common.jobs import Lease, LeaseLost
from margin.modelzoo.spec import TrainSpec
from margin.worker import context
from margin.worker.attempt import Attempt
from margin.worker.context import WorkerContext
from margin.worker.loop import NoHooks, Trainer

log = logging.getLogger(__name__)

CALIBRATION_STEPS = 20
CALIBRATION_SECONDS = 0.5
CALIBRATION_MAX_STEPS = 500


def single_process_throughput(spec: TrainSpec, ctx: WorkerContext, lease: Lease) -> float:
    """Training-step throughput (samples/s) of the same model, data and batch size in one process with every
    thread the job may use."""
    from margin.worker.runner import build_trainer, registry_for

    torch.set_num_threads(config.torch_threads())
    registry = registry_for(ctx, lease)
    try:
        trainer = build_trainer(spec, registry)
    finally:
        registry.close()
    return step_throughput(trainer)


def step_throughput(trainer: Trainer) -> float:
    """Samples/s of ``trainer``'s training steps: 3 warm-up steps, then at least 20 steps and half a second."""
    batch_size = trainer.spec.batch_size
    order = torch.randperm(trainer.rows)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in batches[:3]:
        trainer.step(idx)
    trainer.step_seconds, trainer.samples_trained, i = 0.0, 0, 0
    while i < CALIBRATION_MAX_STEPS and (i < CALIBRATION_STEPS or trainer.step_seconds < CALIBRATION_SECONDS):
        trainer.step(batches[(3 + i) % len(batches)])
        i += 1
    return trainer.samples_trained / trainer.step_seconds


def launch(ctx: WorkerContext, lease: Lease, spec: TrainSpec, started: float) -> None:
    single = single_process_throughput(spec, ctx, lease)
    port = free_port()
    plan = {"job_id": lease.job.id, "fence": lease.fence, "owner": lease.owner, "prior_micros": lease.prior_micros,
            "started": started, "single_samples_per_s": single}
    logs = ctx.checkpoints.root / f"{lease.job.id}.a{lease.fence}"
    procs = []
    for rank in range(spec.world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(spec.world_size), "LOCAL_RANK": str(rank), "MARGIN_DDP_PLAN": json.dumps(plan)}
        out = open(f"{logs}.rank{rank}.log", "ab")
        procs.append((subprocess.Popen([sys.executable, "-m", "margin.worker.ddp"], env=env, stdout=out,
                                       stderr=subprocess.STDOUT, preexec_fn=set_parent_death_signal), out))
    failed = wait_all([p for p, _ in procs])
    for _, out in procs:
        out.close()
    if failed is not None:
        tail = Path(f"{logs}.rank{failed}.log").read_text(errors="replace").splitlines()[-8:]
        raise RuntimeError(f"DDP rank {failed} failed:\n" + "\n".join(tail))


def wait_all(procs: list[subprocess.Popen]) -> int | None:
    """Wait for every rank; when one fails, stop the rest. Returns the first failed rank, or None."""
    while True:
        codes = [p.poll() for p in procs]
        bad = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if bad:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            return bad[0]
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.1)


def rank_main() -> None:
    from margin.worker.runner import build_trainer, registry_for, resume_position

    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(levelname)s %(message)s")
    plan = json.loads(os.environ["MARGIN_DDP_PLAN"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ctx = context.from_env()
    job = ctx.store.get(None, plan["job_id"])
    lease = Lease(job, plan["fence"], plan["owner"], plan["prior_micros"])
    spec = TrainSpec.from_dict(job.spec)
    torch.set_num_threads(max(1, config.torch_threads() // world))
    dist.init_process_group("nccl" if spec.on_gpu else "gloo", rank=rank, world_size=world)
    if spec.on_gpu:
        torch.cuda.set_device(rank)
    registry = registry_for(ctx, lease)
    try:
        trainer = build_trainer(spec, registry, rank, world)
        start = resume_position(ctx, lease, trainer)
        hooks = Attempt(ctx, lease, spec, registry, plan["started"], plan["single_samples_per_s"]) if rank == 0 \
            else NoHooks()
        trainer.run(hooks, start)
    except LeaseLost as err:
        log.warning("%s", err)
    finally:
        registry.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    rank_main()
