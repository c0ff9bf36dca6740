"""Pieces every benchmark shares: a tenant key through the real budget service, starting processes, and
measuring the CPU they use."""
from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from margin.cluster.processes import ManagedProcess, ProcessSpec
from margin.sdk.admin import create_tenant_key
from margin.sdk.channel import connect
from rich.console import Console


def tenant_key(budget: ManagedProcess, admin_key: str, description: str) -> str:
    """Create tenant 'bench' and an API key through Budgets (admin key); return the tenant's key."""
    conn = connect(budget.spec.address, admin_key)
    try:
        return create_tenant_key(conn, "bench", description)
    finally:
        conn.close()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def start(spec: ProcessSpec, logs: Path, started: list[ManagedProcess], timeout: float) -> ManagedProcess:
    """Start a process (its log in ``logs``), remember it (so the caller's finally stops it), wait until healthy."""
    process = ManagedProcess(spec, logs)
    started.append(process)
    process.start(die_with_parent=True)
    process.wait_healthy(timeout)
    return process


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (Triton's python-backend stubs, a Celery worker's pool and DDP ranks)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: list[int], reaped_children: bool = False) -> float:
    """utime + stime of the given processes (all their threads) — plus their reaped children's — in seconds."""
    fields_used = (11, 12, 13, 14) if reaped_children else (11, 12)  # stat(5) fields 14-17, counted after ")"
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in fields_used)
    return total / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK, sum(values[:8]) / CLK_TCK


def cpu_model() -> str:
    """The CPU's model name, for the machine line of a benchmark's results."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_and_write(run: Callable, report: Callable, args) -> None:
    """Run a benchmark, print its tables, and write its JSON to ``args.out``."""
    console = Console(width=None if sys.stdout.isatty() else 160)
    result = run(args, console)
    report(result, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
