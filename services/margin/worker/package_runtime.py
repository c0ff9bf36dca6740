"""Runs INSIDE the sandbox (:mod:`margin.worker.sandbox`): Margin's training loop around a tenant's model package.

    python -m margin.worker.package_runtime            (the launcher: rank 0, or the DDP ranks' parent)

Reads ``/job/in/plan.json`` (written by the worker), imports the package's entry module from ``/job/in/package``,
calls ``build_model(**config)``, and trains it with the same :class:`~margin.worker.loop.Trainer` as a built-in
job. Every hook (before training, after each step, at each epoch's end, when stopped, when done) is a request to
the worker over the pipe, and the worker's answer decides whether to go on — so cancel, the budget and the cost
per step are the worker's, never the package's. At the end it writes ``weights.safetensors`` and the servable
forms (``model.ts`` TorchScript, ``model.onnx`` where the model exports) to ``/job/out`` for the worker to
register. An exception anywhere ends the run with an ``error`` message naming it.

The package contract: ``build_model(**config) -> torch.nn.Module``; optional ``loss(outputs, batch)`` (a scalar
tensor; default cross-entropy against ``batch["y"]``), ``metrics(outputs, batch)`` (a dict of numbers, reported as
``val_<name>``), ``example_inputs(batch_size)`` (a tensor or tuple of tensors, for export; default: validation
rows). ``batch`` maps the dataset's array names to tensors; the model is called with the arrays other than ``y``,
positionally in the dataset's order. float64 arrays are given as float32.
"""
from __future__ import annotations

import importlib
import io
import json
import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from margin.modelzoo.spec import TrainSpec, check_freeze
from margin.worker import data
from margin.worker.loop import Decision, Objective, Position, Trainer, autocast, device_for
from margin.worker.pipe import Channel

ROOT = Path("/job")
INPUTS, OUTPUT = ROOT / "in", ROOT / "out"
PLAN = INPUTS / "plan.json"
CHECKPOINT, WEIGHTS, TORCHSCRIPT, ONNX = "checkpoint.pt", "weights.safetensors", "model.ts", "model.onnx"
LABELS = "y"


class PackageError(RuntimeError):
    """The package broke its contract (what it returned is not what Margin needs)."""


# -- data ------------------------------------------------------------------------------------------
def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()}


def split_arrays(arrays: dict[str, np.ndarray], fraction: float, seed: int) -> tuple[dict, dict]:
    rows = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(rows)
    n_val = min(rows - 1, max(1, round(rows * fraction)))
    val, train = order[:n_val], order[n_val:]
    return ({k: v[train] for k, v in arrays.items()}, {k: v[val] for k, v in arrays.items()})


def to_tensors(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


# -- the package -----------------------------------------------------------------------------------
def import_package(entry: str):
    sys.path.insert(0, str(INPUTS / "package"))
    return importlib.import_module(entry)


def build(module, config: dict) -> nn.Module:
    model = module.build_model(**config)
    if not isinstance(model, nn.Module):
        raise PackageError(f"build_model returned {type(model).__name__}, not a torch.nn.Module")
    return model


def freeze(model: nn.Module, prefixes: list[str]) -> None:
    """The built-in jobs' checks (every prefix matches, something stays trainable) and freezing."""
    check_freeze(tuple(prefixes), [n for n, _ in model.named_parameters()])
    data.freeze(model, tuple(prefixes))


def objective_of(module, inputs: list[str]) -> Objective:
    return Objective(tuple(inputs), loss=getattr(module, "loss", None), metrics=getattr(module, "metrics", None))


# -- hooks: every decision is the worker's -----------------------------------------------------------
def _pos(pos: Position) -> dict:
    return {"epoch": pos.epoch, "batch": pos.batch, "step": pos.step}


def _decision(reply: dict) -> Decision:
    return Decision(int(reply.get("code", 0)), str(reply.get("message", "")))


class PipeHooks:
    """The loop's hooks as requests to the worker (rank 0 only)."""

    def __init__(self, channel: Channel, exporter: Exporter):
        self.channel, self.exporter = channel, exporter

    def before_training(self, pos):
        return _decision(self.channel.request({"op": "before", "pos": _pos(pos)}))

    def after_step(self, pos, loss, steps_left):
        loss = loss if loss == loss and abs(loss) != float("inf") else None
        return _decision(self.channel.request({"op": "step", "pos": _pos(pos), "loss": loss,
                                               "steps_left": steps_left}))

    def end_of_epoch(self, pos, metrics, trainer):
        torch.save(trainer.state(pos), OUTPUT / CHECKPOINT)
        return _decision(self.channel.request({"op": "epoch", "pos": _pos(pos), "metrics": finite(metrics)}))

    def stopped(self, decision, pos, trainer):
        torch.save(trainer.state(pos), OUTPUT / CHECKPOINT)
        self.channel.request({"op": "stopped", "pos": _pos(pos), "code": decision.code,
                              "message": decision.message})

    def completed(self, trainer, metrics, train_seconds):
        self.channel.send({"op": "phase", "phase": "export"})
        exports = self.exporter.export(trainer.model)
        self.channel.request({"op": "completed", "metrics": finite(metrics), "train_seconds": train_seconds,
                              "samples_trained": trainer.samples_trained, "step_seconds": trainer.step_seconds,
                              "parameters": [n for n, p in trainer.model.named_parameters() if p.requires_grad]
                              or [n for n, _ in trainer.model.named_parameters()], **exports})


def finite(metrics: dict) -> dict[str, float]:
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}


# -- export ---------------------------------------------------------------------------------------
class Exporter:
    """Writes the trained weights (safetensors) and the servable forms, and describes their signature."""

    def __init__(self, module, inputs: list[str], val: dict[str, np.ndarray], batch_size: int):
        self.module, self.inputs, self.val, self.batch_size = module, inputs, val, batch_size

    def example(self) -> tuple[torch.Tensor, ...]:
        if hasattr(self.module, "example_inputs"):
            value = self.module.example_inputs(min(self.batch_size, 8))
            return tuple(value) if isinstance(value, (tuple, list)) else (value,)
        return tuple(torch.from_numpy(np.ascontiguousarray(self.val[n][:2])) for n in self.inputs)

    def export(self, model: nn.Module) -> dict:
        from safetensors.torch import save_file

        model = model.cpu().eval()
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, OUTPUT / WEIGHTS)
        example = self.example()
        with torch.no_grad():
            output = model(*example)
        if not isinstance(output, torch.Tensor):
            return {"weights": WEIGHTS, "signature": None,
                    "export_notes": ["not exported: forward returns more than one tensor"]}
        signature = {"inputs": [[n, str(t.dtype).removeprefix("torch."), [-1, *t.shape[1:]]]
                                for n, t in zip(self.inputs, example, strict=False)],
                     "output": [str(output.dtype).removeprefix("torch."), [-1, *output.shape[1:]]]}
        result: dict = {"weights": WEIGHTS, "signature": signature, "export_notes": []}
        for name, write in (("torchscript", self._torchscript), ("onnx", self._onnx)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    write(model, example)
                result[name] = {"torchscript": TORCHSCRIPT, "onnx": ONNX}[name]
            except Exception as err:  # a model that does not export is still a trained model
                result["export_notes"].append(f"{name} export failed: {type(err).__name__}: {err}"[:500])
        return result

    def _torchscript(self, model: nn.Module, example: tuple) -> None:
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(OUTPUT / TORCHSCRIPT))

    def _onnx(self, model: nn.Module, example: tuple) -> None:
        buffer = io.BytesIO()
        axes = {n: {0: "batch"} for n in self.inputs} | {"output": {0: "batch"}}
        with torch.no_grad():
            torch.onnx.export(model, example, buffer, dynamo=False, opset_version=17, input_names=self.inputs,
                              output_names=["output"], dynamic_axes=axes)
        (OUTPUT / ONNX).write_bytes(buffer.getvalue())


# -- ranks ----------------------------------------------------------------------------------------
def prepare(plan: dict, rank: int = 0, world_size: int = 1,
            phase=lambda name: None) -> tuple[Trainer, Exporter, Position]:
    """Import the package, build and (when fine-tuning) load the model, and make its trainer; ``phase(name)``
    tells the worker what is running (its messages name it)."""
    spec = TrainSpec.from_dict(plan["spec"])
    torch.manual_seed(spec.seed)
    phase(f"importing {plan['entry']}")
    module = import_package(plan["entry"])
    arrays = load_arrays(INPUTS / "data.npz")
    inputs = [n for n in arrays if n != LABELS]
    train, val = split_arrays(arrays, spec.validation_fraction, spec.seed)
    phase("build_model")
    model = build(module, spec.config)
    if (INPUTS / "base.safetensors").exists():
        data.load_fitting(model, INPUTS / "base.safetensors")
    freeze(model, list(spec.freeze_layers))
    device = device_for(spec, rank if spec.on_gpu else 0)
    trainer = Trainer(spec, model, (to_tensors(train, device), to_tensors(val, device)), device, rank, world_size,
                      objective=objective_of(module, inputs))
    pos = Position(0, 0, 0)
    if (INPUTS / CHECKPOINT).exists():
        pos = trainer.restore(torch.load(INPUTS / CHECKPOINT, map_location="cpu", weights_only=True))
    return trainer, Exporter(module, inputs, val, spec.batch_size), pos


def check_outputs(trainer: Trainer) -> None:
    """One forward pass and the loss on a few validation rows, so a package whose outputs do not fit its loss
    fails before any step is billed as training."""
    batch = {k: v[:2] for k, v in trainer.val_data.items()}
    trainer.model.eval()
    with torch.no_grad(), autocast(trainer.spec, trainer.device):
        outputs = trainer.objective.forward(trainer.model, batch)
        loss = trainer.objective.loss_of(outputs, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise PackageError(f"loss(outputs, batch) must return a scalar tensor, got {type(loss).__name__}"
                           + (f" of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))


def announcer(channel: Channel):
    return lambda name: channel.send({"op": "phase", "phase": name})


def run_single(plan: dict, channel: Channel) -> None:
    trainer, exporter, pos = prepare(plan, phase=announcer(channel))
    check_outputs(trainer)
    channel.send({"op": "ready", "batches_per_epoch": trainer.batches_per_epoch,
                  "parameters": trainer.parameter_count(), "single_samples_per_s": plan.get("single_samples_per_s")})
    trainer.run(PipeHooks(channel, exporter), pos)


def run_distributed(plan: dict, channel: Channel) -> None:
    """Time one-process steps (T_single for η), then start the ranks; rank 0 talks to the worker."""
    from margin.cluster.processes import free_port, set_parent_death_signal
    from margin.worker.ddp import step_throughput, wait_all

    trainer, _, _ = prepare(plan, phase=announcer(channel))
    check_outputs(trainer)
    plan = {**plan, "single_samples_per_s": step_throughput(trainer)}
    del trainer
    world = plan["spec"]["world_size"]
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(max(1, plan["threads"] // world))}
        fds = (channel.read_fd, channel.write_fd) if rank == 0 else ()
        log = open(OUTPUT / f"rank{rank}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "margin.worker.package_runtime", "--rank",
                                       json.dumps({**plan, "rank": rank})], env=env, pass_fds=fds, stdout=log,
                                      stderr=subprocess.STDOUT, preexec_fn=set_parent_death_signal))
        log.close()
    failed = wait_all(procs)
    if failed is not None:
        tail = (OUTPUT / f"rank{failed}.log").read_text(errors="replace").splitlines()[-6:]
        raise RuntimeError(f"DDP rank {failed} failed:\n" + "\n".join(tail))


def rank_main(plan: dict) -> None:
    import torch.distributed as dist

    from margin.worker.loop import NoHooks

    rank, world = plan["rank"], plan["spec"]["world_size"]
    torch.set_num_threads(max(1, plan["threads"] // world))
    dist.init_process_group("nccl" if plan["spec"]["device_class"] != "cpu" else "gloo", rank=rank,
                            world_size=world)
    channel = Channel(*plan["fds"]) if rank == 0 else None
    try:
        trainer, exporter, pos = prepare(plan, rank, world)
        if channel is not None:
            channel.send({"op": "ready", "batches_per_epoch": trainer.batches_per_epoch,
                          "parameters": trainer.parameter_count(),
                          "single_samples_per_s": plan["single_samples_per_s"]})
        trainer.run(PipeHooks(channel, exporter) if channel else NoHooks(), pos)
    except BaseException as err:
        if channel is not None:
            report(channel, err)
        raise
    finally:
        dist.destroy_process_group()


# -- the entry point ------------------------------------------------------------------------------
def describe(err: BaseException) -> str:
    """The error as the job's message: its type and text, and where in the package it happened."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith(str(INPUTS / "package"))]
    where = ""
    if frames:
        last = frames[-1]
        where = f" (at {Path(last.filename).relative_to(INPUTS / 'package')} line {last.lineno}, in {last.name})"
    text = str(err).strip() or type(err).__name__
    return f"{type(err).__name__}: {text}{where}"[:1500]


def report(channel: Channel, err: BaseException) -> None:
    try:
        channel.send({"op": "error", "message": describe(err)})
    except OSError:
        pass


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    plan = json.loads(PLAN.read_text())
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(json.loads(sys.argv[2]))
        return
    torch.set_num_threads(plan["threads"])
    channel = Channel(*plan["fds"])
    leader = os.getpid()
    try:
        if plan["spec"]["world_size"] > 1:
            run_distributed(plan, channel)
        else:
            run_single(plan, channel)
    except BaseException as err:  # whatever the package did ends the run with its name
        if os.getpid() != leader:  # a process the package forked: never speak for the run
            os._exit(1)
        report(channel, err)
    channel.close()


if __name__ == "__main__":
    main()
