"""Registry streaming benchmark: upload and download a large artifact through the real services.

Starts ``margin.budget`` and ``margin.registry`` as subprocesses on a fresh SQLite database in a temp
dir, streams a file of random bytes up (``RegistryClient.upload_file``) and down (``download_to``),
samples the registry's VmRSS while doing so, and compares with a plain ``shutil.copyfile`` on the
same disk. MB = 10^6 bytes throughout. The file is a zip of random bytes uploaded as a ``dataset-npz``: the format
whose check reads only the zip's directory, so the figures are the streaming's (an ONNX upload is parsed
whole by onnx.checker, a TorchScript one has its directory read).

    PYTHONPATH=services python bench/registry_bench.py --size-mb 200 --repeats 3
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import statistics
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from harness import tenant_key
from margin.cluster.processes import ManagedProcess, standalone_service_spec
from margin.sdk.channel import Connection, connect
from margin.sdk.registry import CHUNK, RegistryClient
from margin.v1 import common_pb2, registry_pb2
from rich.console import Console
from rich.table import Table

MB = 1_000_000
BLOCK = 8 << 20
GOAL_MBPS = 100.0
GOAL_RSS_GROWTH_MB = 100.0
MODEL = "bench-model"


def start_service(name: str, module: str, workdir: Path, admin_key: str, max_upload: int) -> ManagedProcess:
    """Start one Margin service as a real process and wait until its health check says SERVING."""
    service = ManagedProcess(standalone_service_spec(name, module, workdir, admin_key,
                                                     MARGIN_MAX_UPLOAD_BYTES=str(max_upload)), workdir)
    service.start()
    service.wait_healthy(30.0)
    return service


def read_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB  # kB (KiB) -> MB
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextmanager
def sample_rss(pid: int, interval: float = 0.02):
    """Yield a dict whose 'peak' is the highest VmRSS (MB) seen while the block ran."""
    result = {"peak": read_rss_mb(pid)}
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            result["peak"] = max(result["peak"], read_rss_mb(pid))
            done.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak"] = max(result["peak"], read_rss_mb(pid))


def write_random_file(path: Path, size_bytes: int) -> None:
    """A zip (stored, not compressed) holding ``size_bytes`` random bytes: what a dataset-npz upload must be."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive, \
            archive.open("payload.npy", "w", force_zip64=True) as f:
        left = size_bytes
        while left > 0:
            block = os.urandom(min(BLOCK, left))
            f.write(block)
            left -= len(block)


def upload_meta() -> registry_pb2.UploadMetadata:
    return registry_pb2.UploadMetadata(model=MODEL, format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ,
                                       description="registry benchmark payload")


def timed(fn, *args):
    """Call ``fn(*args)``; return (seconds, result)."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def measure(client: RegistryClient, src: Path, workdir: Path, pid: int, repeats: int, chunk_bytes: int) -> dict:
    """Warm up, then upload/download ``repeats`` times, tracking MB/s and the server's peak RSS."""
    size = src.stat().st_size
    small = workdir / "warmup.bin"
    write_random_file(small, 1 << 20)
    warm = client.upload_file(small, upload_meta())
    client.download_to(common_pb2.VersionRef(model=MODEL, number=warm.number), workdir / "warmup.out", chunk_bytes)
    baseline = read_rss_mb(pid)

    runs, peak, dst = [], baseline, workdir / "download.bin"
    for i in range(repeats):
        with sample_rss(pid) as up_rss:
            up_s, version = timed(client.upload_file, src, upload_meta())
        ref = common_pb2.VersionRef(model=MODEL, number=version.number)
        with sample_rss(pid) as down_rss:
            down_s, _ = timed(client.download_to, ref, dst, chunk_bytes)  # raises if the sha256 differs
        if dst.stat().st_size != size:
            raise RuntimeError(f"downloaded {dst.stat().st_size} bytes, expected {size}")
        dst.unlink()
        peak = max(peak, up_rss["peak"], down_rss["peak"])
        runs.append({"repeat": i + 1, "upload_s": up_s, "upload_mbps": size / MB / up_s,
                     "download_s": down_s, "download_mbps": size / MB / down_s,
                     "upload_peak_rss_mb": up_rss["peak"], "download_peak_rss_mb": down_rss["peak"]})
    return {"runs": runs, "rss_mb": {"baseline": baseline, "peak": peak, "growth": peak - baseline}}


def measure_copy(src: Path, workdir: Path, repeats: int) -> list[float]:
    size, out, dst = src.stat().st_size, [], workdir / "copy.bin"
    for _ in range(repeats):
        seconds, _ = timed(shutil.copyfile, src, dst)
        out.append(size / MB / seconds)
        dst.unlink()
    return out


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "best": max(values), "all": values}


def report(result: dict, console: Console) -> None:
    up, down, copy, rss = result["upload_mbps"], result["download_mbps"], result["copy_mbps"], result["rss_mb"]
    goals = {g["name"]: g for g in result["goals"]}
    table = Table(title=f"Registry streaming: {result['size_mb']} MB x {result['repeats']} repeats, "
                        f"download chunk {result['chunk_kb']} KiB",
                  caption="MB = 10^6 bytes; MB/s goals are on the median; vs copy = median / copyfile median")
    for col in ("measure", "median", "best", "vs copy", "goal", "result"):
        table.add_column(col, justify="left" if col in ("measure", "result") else "right")

    def verdict(name: str) -> str:
        return "[green]PASS[/]" if goals[name]["met"] else "[red]MISS[/]"

    for key, stats in (("upload", up), ("download", down)):
        table.add_row(f"gRPC {key} MB/s", f"{stats['median']:.1f}", f"{stats['best']:.1f}",
                      f"{stats['median'] / copy['median']:.2f}x", f">= {GOAL_MBPS:.0f}", verdict(key))
    table.add_row("copyfile MB/s", f"{copy['median']:.1f}", f"{copy['best']:.1f}", "1.00x", "", "")
    table.add_row("server RSS base MB", f"{rss['baseline']:.1f}", "", "", "", "")
    table.add_row("server RSS peak MB", f"{rss['peak']:.1f}", "", "", "", "")
    table.add_row("server RSS growth MB", f"{rss['growth']:.1f}", "", "", f"< {GOAL_RSS_GROWTH_MB:.0f}",
                  verdict("rss_growth"))
    console.print(table)


def run(args: argparse.Namespace) -> dict:
    size = args.size_mb * MB
    chunk_bytes = args.chunk_kb * 1024
    admin_key = secrets.token_urlsafe(32)
    workdir = Path(tempfile.mkdtemp(prefix="margin-registry-bench-"))
    services: list[ManagedProcess] = []
    conn: Connection | None = None
    try:
        # Budget first: both create the schema on start, and SQLite DDL from two processes at once can race.
        for name, module in (("budget", "margin.budget"), ("registry", "margin.registry")):
            services.append(start_service(name, module, workdir, admin_key, max_upload=2 * size + (64 << 20)))
        budget, registry = services
        conn = connect(registry.spec.address, tenant_key(budget, admin_key, "registry bench"))
        client = RegistryClient(conn)
        client.create_model(MODEL, description="registry benchmark")

        src = workdir / "payload.bin"
        write_random_file(src, size)
        measured = measure(client, src, workdir, registry.proc.pid, args.repeats, chunk_bytes)
        copy = measure_copy(src, workdir, args.repeats)
    finally:
        if conn:
            conn.close()
        for service in reversed(services):
            service.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    runs = measured["runs"]
    up = summarize([r["upload_mbps"] for r in runs])
    down = summarize([r["download_mbps"] for r in runs])
    rss = measured["rss_mb"]
    return {
        "machine": {"node": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "size_mb": args.size_mb, "chunk_kb": args.chunk_kb, "upload_chunk_kb": CHUNK // 1024,
        "repeats": args.repeats, "mb": "10^6 bytes",
        "runs": runs, "upload_mbps": up, "download_mbps": down, "rss_mb": rss,
        "copy_mbps": summarize(copy),
        "upload_vs_copy": up["median"] / statistics.median(copy),
        "download_vs_copy": down["median"] / statistics.median(copy),
        "goals": [
            {"name": "upload", "goal": f">= {GOAL_MBPS} MB/s median", "value": up["median"],
             "met": up["median"] >= GOAL_MBPS},
            {"name": "download", "goal": f">= {GOAL_MBPS} MB/s median", "value": down["median"],
             "met": down["median"] >= GOAL_MBPS},
            {"name": "rss_growth", "goal": f"< {GOAL_RSS_GROWTH_MB} MB", "value": rss["growth"],
             "met": rss["growth"] < GOAL_RSS_GROWTH_MB},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200, help="artifact size in MB (10^6 bytes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-kb", type=int, default=1024,
                        help="download chunk size in KiB (server allows at most 4096); uploads use the SDK's "
                             "fixed 1 MiB chunks")
    parser.add_argument("--out", type=Path, default=Path("bench/results/registry.json"))
    args = parser.parse_args()
    if args.size_mb < 1 or args.repeats < 1 or not 1 <= args.chunk_kb <= 4096:
        parser.error("--size-mb and --repeats must be >= 1, --chunk-kb between 1 and 4096")

    result = run(args)
    report(result, Console())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
