"""A training job on a tenant's model package, from the worker's side: the sandbox is where the code runs, this
is where the job is run from.

The worker fetches the job's inputs on the tenant's behalf (the package, unpacked by
:func:`margin.common.modelpackage.unpack`; the dataset; base weights; the last checkpoint) into the sandbox's
read-only ``in`` directory, starts :mod:`margin.worker.package_runtime` in the sandbox, and answers its requests
with the same :class:`~margin.worker.attempt.Attempt` a built-in job uses: lease, cost per step, budget stops,
cancel, checkpoints, WatchJob events. While the code inside is silent (importing, building the model, a long step,
exporting) a watchdog keeps the lease and stops the sandbox at the job's time limit, its budget, a cancel, or too
long a silence. The end is a registered version (safetensors weights with the package reference and config as its
architecture, then its servable forms) or a clear FAILED message naming what the code hit; either way the job is
billed its attempt's device time, like any other.

Nothing the sandbox wrote is trusted: a file is read only if it is a regular file (never a symlink or a FIFO) no
larger than its cap; messages are JSON with a size cap (:mod:`margin.worker.pipe`); a checkpoint is copied, never
loaded, here.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from margin.common import config, protoconv
from margin.common.jobs import BUDGET_EXCEEDED, CANCELLED, FAILED, Lease
from margin.common.modelpackage import unpack
from margin.common.tensors import DTYPES, Signature, TensorSpec
from margin.modelzoo.spec import BaseRef, TrainSpec
from margin.sdk.channel import Connection
from margin.sdk.registry import RegistryClient
from margin.v1 import common_pb2, registry_pb2
from margin.worker import package_runtime as runtime
from margin.worker.attempt import Attempt
from margin.worker.context import WorkerContext
from margin.worker.loop import BUDGET, CANCEL, Decision, Position
from margin.worker.pipe import Channel, ProtocolError
from margin.worker.sandbox import Limits, Sandbox, SandboxDirs

log = logging.getLogger(__name__)

TIME_LIMIT = 3  # a decision code of the bridge's own: stop at the job's time limit (the job FAILS, with a checkpoint)
FROM_TORCH = {numpy: margin for margin, numpy in DTYPES.items()}
LIMIT_HINTS = (("MemoryError", "memory"), ("can't allocate memory", "memory"), ("Cannot allocate memory", "memory"),
               ("Resource temporarily unavailable", "processes"), ("File too large", "file size"),
               ("SIGXFSZ", "file size"), ("SIGXCPU", "CPU time"))


class SandboxFailure(RuntimeError):
    """The package's run ended without finishing: the message is the job's."""


# -- what the sandbox left in its directory -----------------------------------------------------------
def open_output(dirs: SandboxDirs, name: str, max_bytes: int):
    """Open the sandbox's output ``name`` for reading, or None when it is missing. Refuses anything but a regular
    file no larger than ``max_bytes`` (the sandbox could leave a symlink to a file it cannot see, for the worker to
    read on its behalf)."""
    try:
        fd = os.open(dirs.output / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SandboxFailure(f"the package left {name} as something other than a regular file "
                             f"({err.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        raise SandboxFailure(f"the package left {name} as something other than a regular file of at most "
                             f"{max_bytes} bytes")
    return os.fdopen(fd, "rb")


def stage(dirs: SandboxDirs, name: str) -> Path | None:
    """Copy the sandbox's output ``name`` to a worker-owned file beside the sandbox's directories."""
    source = open_output(dirs, name, config.MAX_UPLOAD_BYTES.get_int())
    if source is None:
        return None
    target = dirs.root / f"staged-{name}"
    with source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    return target


@dataclass
class RemoteTrainer:
    """The worker's view of the trainer running in the sandbox (what :class:`Attempt` reads of a trainer)."""
    dirs: SandboxDirs
    batches_per_epoch: int = 1
    samples_trained: int = 0
    step_seconds: float = 0.0
    parameters: int = 0
    result: dict = field(default_factory=dict)

    def parameter_count(self) -> int:
        return self.parameters

    def save_checkpoint(self, store, job_id: str, pos: Position) -> dict:
        source = open_output(self.dirs, runtime.CHECKPOINT, config.SANDBOX_FILE_MB.get_int() << 20)
        if source is None:
            raise SandboxFailure("the sandbox reported a checkpoint but wrote none")
        with source:
            return store.save_file(job_id, source, {"epoch": pos.epoch, "batch": pos.batch, "step": pos.step})


# -- registration of the result --------------------------------------------------------------------------
def exported_signature(described: dict | None) -> Signature:
    """The runtime's description of the model's inputs and output as a signature (output ``output__0``, as
    Triton's pytorch backend names a TorchScript model's first output)."""
    if not described:
        return Signature()
    def spec(name: str, dtype: str, shape: list) -> TensorSpec:
        return TensorSpec(str(name), FROM_TORCH.get(str(dtype), "FP32"), tuple(int(d) for d in shape))
    inputs = tuple(spec(*item) for item in described["inputs"])
    return Signature(inputs, (spec("output__0", *described["output"]),))


class PackageAttempt(Attempt):
    """An attempt at a package job: what differs from a built-in job is what is registered at the end."""

    def register(self, trainer: RemoteTrainer, metrics: dict[str, float], cost: dict) -> tuple:
        client = RegistryClient(self.registry)
        spec = self.spec
        client.ensure_model(spec.model, description=f"trained by job {self.job_id}")
        result = trainer.result
        signature = exported_signature(result.get("signature"))
        arch = {"package": {"model": spec.package.model, "number": spec.package.number}, "config": spec.config,
                "parameters": [str(n) for n in result.get("parameters", [])][:10_000]}
        parent = spec.base or spec.package
        weights = stage(trainer.dirs, runtime.WEIGHTS)
        if weights is None:
            raise SandboxFailure("the package's run ended without writing its weights")
        version = client.upload_file(weights, self._metadata(
            registry_pb2.ARTIFACT_FORMAT_SAFETENSORS, signature, metrics, cost, arch=arch, parent=parent,
            key=f"training-job:{self.job_id}",
            description=f"package {spec.package.model} v{spec.package.number} trained by job {self.job_id}"))
        exported, notes = [], list(result.get("export_notes", []))
        for fmt, enum, name in (("torchscript", registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, runtime.TORCHSCRIPT),
                                ("onnx", registry_pb2.ARTIFACT_FORMAT_ONNX, runtime.ONNX)):
            path = stage(trainer.dirs, name) if result.get(fmt) else None
            if path is None:
                continue
            served = client.upload_file(path, self._metadata(
                enum, signature if fmt == "torchscript" else Signature(), metrics, None, arch={},
                parent=BaseRef(version.model, version.number), key=f"training-job:{self.job_id}:{fmt}",
                description=f"{fmt} export of {version.model} v{version.number}", recipe_kind=f"export:{fmt}"))
            exported.append((fmt, served.number))
        message = f"registered {version.model} v{version.number}"
        if exported:
            message += "; servable: " + ", ".join(f"v{n} ({fmt})" for fmt, n in exported)
        if notes:
            message += "; " + "; ".join(notes)
        return message, {"model": version.model, "number": version.number, "exported": [n for _, n in exported]}

    def _metadata(self, fmt, signature: Signature, metrics: dict, cost: dict | None, *, arch: dict,
                  parent: BaseRef, key: str, description: str, recipe_kind: str = "training"):
        meta = registry_pb2.UploadMetadata(
            model=self.spec.model, format=fmt, signature=protoconv.signature_to_proto(signature),
            architecture=protoconv.struct(arch),
            recipe=protoconv.struct({"kind": recipe_kind, "job_id": self.job_id, "spec": self.spec.to_dict()}),
            metrics=metrics, idempotency_key=key, description=description,
            parent=common_pb2.VersionRef(model=parent.model, number=parent.number))
        if cost is not None:
            meta.cost.CopyFrom(protoconv.cost(cost, self.ctx.catalog.currency))
        return meta


# -- the job's inputs ------------------------------------------------------------------------------
def fetch_inputs(ctx: WorkerContext, lease: Lease, spec: TrainSpec, registry: Connection, dirs: SandboxDirs,
                 fds: tuple[int, int], threads: int) -> None:
    client = RegistryClient(registry)

    def download(ref: BaseRef, name: str) -> Path:
        path = dirs.inputs / name
        client.download_to(common_pb2.VersionRef(model=ref.model, number=ref.number, alias=ref.alias), path)
        return path

    package = download(spec.package, "package.bin")
    info = unpack(package.read_bytes(), dirs.inputs / "package", config.MAX_PACKAGE_BYTES.get_int())
    package.unlink()
    download(spec.dataset_version, "data.npz")
    if spec.base:
        download(spec.base, "base.safetensors")
    if lease.job.checkpoint and ctx.checkpoints.path(lease.job.id).exists():
        shutil.copyfile(ctx.checkpoints.path(lease.job.id), dirs.inputs / runtime.CHECKPOINT)
    plan = {"entry": info.entry.removesuffix(".py").replace("/", "."), "spec": spec.to_dict(), "threads": threads,
            "fds": list(fds)}
    (dirs.inputs / "plan.json").write_text(json.dumps(plan))
    for path in [dirs.inputs, *dirs.inputs.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


# -- the bridge ---------------------------------------------------------------------------------------
def _position(message: dict) -> Position:
    pos = message.get("pos") or {}
    try:
        return Position(int(pos["epoch"]), int(pos["batch"]), int(pos["step"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"a position that is not one: {pos!r}"[:200]) from None


def _metrics(message: dict) -> dict[str, float]:
    metrics = message.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ProtocolError("metrics that are not a mapping")
    return {str(k)[:64]: float(v) for k, v in list(metrics.items())[:64] if isinstance(v, (int, float))}


def with_limit_hint(message: str, limits: Limits) -> str:
    for needle, what in LIMIT_HINTS:
        if needle in message:
            return f"{message} [hit the sandbox's {what} limit: {limits.describe()}]"
    return message


class Bridge:
    """Answers the sandbox's requests with the attempt's decisions; watches it while it is silent."""

    def __init__(self, attempt: PackageAttempt, sandbox: Sandbox, channel: Channel, remote: RemoteTrainer,
                 max_seconds: float, silence_seconds: float, log_path: Path):
        self.attempt, self.sandbox, self.channel, self.remote = attempt, sandbox, channel, remote
        self.max_seconds, self.silence_seconds, self.log_path = max_seconds, silence_seconds, log_path
        self.pos, self.phase = Position(0, 0, 0), "starting Python"
        self.last_heard = time.monotonic()

    def run(self) -> None:
        heartbeat = self.attempt.ctx.heartbeat_seconds
        while True:
            message = self.channel.receive(timeout=heartbeat)
            if message is None:
                if self.channel.closed or self.sandbox.process.poll() is not None:
                    raise SandboxFailure(self.exit_message())
                if self.watch():
                    return
                continue
            self.last_heard = time.monotonic()
            if self.handle(message):
                return

    def elapsed(self) -> float:
        return time.time() - self.attempt.started

    def handle(self, message: dict) -> bool:
        """Act on one message; True when the run is over."""
        op, attempt = message["op"], self.attempt
        if op == "phase":
            self.phase = str(message.get("phase", ""))[:40]
        elif op == "ready":
            self.phase = "training"
            self.remote.batches_per_epoch = max(1, int(message.get("batches_per_epoch") or 1))
            self.remote.parameters = int(message.get("parameters") or 0)
            single = message.get("single_samples_per_s")
            attempt.single_samples_per_s = float(single) if isinstance(single, (int, float)) else None
        elif op == "before":
            self.reply(attempt.before_training(_position(message)))
        elif op == "step":
            self.pos = _position(message)
            loss = message.get("loss")
            self.reply(attempt.after_step(self.pos, float(loss) if isinstance(loss, (int, float)) else float("nan"),
                                          int(message.get("steps_left") or 0)))
        elif op == "epoch":
            self.pos = _position(message)
            self.reply(attempt.end_of_epoch(self.pos, _metrics(message), self.remote))
        elif op == "stopped":
            self.pos = _position(message)
            self.stopped(int(message.get("code") or 0), str(message.get("message", ""))[:500])
            self.farewell()
            return True
        elif op == "completed":
            self.phase = "registering"
            self.remote.samples_trained = int(message.get("samples_trained") or 0)
            self.remote.step_seconds = float(message.get("step_seconds") or 0.0)
            self.remote.result = message
            attempt.completed(self.remote, _metrics(message), float(message.get("train_seconds") or 0.0))
            self.farewell()
            return True
        elif op == "error":
            raise SandboxFailure(f"the package's code failed in {self.phase}: "
                                 f"{str(message.get('message', ''))[:1500]}")
        else:
            raise ProtocolError(f"unknown message {op[:40]!r}")
        return False

    def farewell(self) -> None:
        """Answer the sandbox's last request, so it exits by itself (it is stopped regardless)."""
        try:
            self.channel.send({"op": "done"})
        except OSError:
            pass

    def reply(self, decision: Decision) -> None:
        if not decision.stop and self.elapsed() > self.max_seconds:
            decision = Decision(TIME_LIMIT, f"stopped at the job's time limit of {self.max_seconds:.0f} s")
        self.channel.send({"code": decision.code, "message": decision.message, "op": "decision"})

    def stopped(self, code: int, message: str) -> None:
        record = self.remote.save_checkpoint(self.attempt.ctx.checkpoints, self.attempt.job_id, self.pos)
        if code == TIME_LIMIT:
            self.attempt.finish(FAILED, self.pos, f"{message}; checkpoint at epoch {self.pos.epoch}, step "
                                                  f"{self.pos.step}", checkpoint=record)
        else:
            self.attempt.stopped(Decision(code if code in (CANCEL, BUDGET) else CANCEL, message), self.pos,
                                 _Checkpointed(record))

    def watch(self) -> bool:
        """While the sandbox is silent: keep the lease, and stop it at a cancel or the job's budget (True: the run is
        over, ended as a built-in job's would be) or at its time or silence limit (:class:`SandboxFailure`)."""
        attempt, silent = self.attempt, time.monotonic() - self.last_heard
        if attempt.beat(self.pos, 0):
            self.sandbox.kill()
            attempt.finish(CANCELLED, self.pos, f"cancelled while the package's code ran ({self.phase}); "
                                                 f"the last checkpoint stands")
            return True
        where = f"in {self.phase}, without returning to Margin's loop for {silent:.0f} s"
        if self.elapsed() > self.max_seconds:
            raise SandboxFailure(f"the package's code ran past the job's time limit of {self.max_seconds:.0f} s "
                                 f"({where}): the sandbox was stopped")
        if silent > self.silence_seconds:
            raise SandboxFailure(f"the package's code ran {where} (the limit is {self.silence_seconds:.0f} s): "
                                 "the sandbox was stopped")
        budget = attempt.lease.job.budget_micros
        next_beat = attempt.micros(attempt.device_seconds(attempt.ctx.heartbeat_seconds * 2))
        if budget and next_beat > budget:
            self.sandbox.kill()
            attempt.finish(BUDGET_EXCEEDED, self.pos, f"stopped before the job's budget ran out while the package's "
                                                       f"code ran {where}: spent {attempt.spent_micros()} of "
                                                       f"{budget} micros; the last checkpoint stands")
            return True
        return False

    def exit_message(self) -> str:
        process = self.sandbox.process
        try:
            code = process.wait(timeout=5)
        except Exception:  # still running with its pipe closed: stop it
            self.sandbox.kill()
            code = process.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
        tail = self.log_path.read_text(errors="replace").splitlines()[-5:] if self.log_path.exists() else []
        text = " | ".join(line.strip()[:200] for line in tail if line.strip())
        return f"the package's sandbox {how} in {self.phase} without a result" + (f"; its output: {text}"
                                                                                  if text else "")


@dataclass
class _Checkpointed:
    """A trainer whose checkpoint is already saved (``Attempt.stopped`` saves through it)."""
    record: dict

    def save_checkpoint(self, store, job_id: str, pos: Position) -> dict:
        return self.record


RUNTIME = [sys.executable, "-m", "margin.worker.package_runtime"]


def run(ctx: WorkerContext, lease: Lease, spec: TrainSpec, registry: Connection, attempt: PackageAttempt) -> str:
    """One attempt at a package job; a failure of the package's run ends the job FAILED with what it hit."""
    name = f"{lease.job.id}.a{lease.fence}"
    dirs = SandboxDirs.create(config.sandbox_dir(), name)
    max_seconds = min(spec.max_seconds or float("inf"), config.SANDBOX_MAX_SECONDS.get_float())
    limits = Limits.from_config(config.torch_threads(), max_seconds)
    sandbox = Sandbox(dirs, limits, name, gpu=spec.on_gpu)
    (theirs_read, ours_write), (ours_read, theirs_write) = os.pipe(), os.pipe()
    channel = Channel(ours_read, ours_write)
    try:
        try:
            fetch_inputs(ctx, lease, spec, registry, dirs, (theirs_read, theirs_write), limits.threads)
            log_path = dirs.root / "sandbox.log"
            sandbox.start(RUNTIME, log_path, pass_fds=(theirs_read, theirs_write))
        finally:
            os.close(theirs_read)
            os.close(theirs_write)
        Bridge(attempt, sandbox, channel, RemoteTrainer(dirs), max_seconds,
               config.SANDBOX_SILENCE_SECONDS.get_float(), log_path).run()
        return "ran"
    except (SandboxFailure, ProtocolError) as err:
        sandbox.kill()
        text = str(err) if isinstance(err, SandboxFailure) else f"the package's sandbox broke the protocol: {err}"
        attempt.fail(with_limit_hint(text, limits))
        return f"failed: {text}"
    finally:
        sandbox.kill()
        channel.close()
        dirs.remove()
