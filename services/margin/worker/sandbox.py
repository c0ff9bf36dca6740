"""The sandbox a tenant's model package runs in: a ``bubblewrap`` (bwrap) container per job, started by the worker.

What the code inside gets, and nothing more:

* **Its own namespaces**: mount, PID, IPC, UTS and network (``--unshare-ipc --unshare-pid --unshare-net
  --unshare-uts``). The network namespace has only a loopback of its own: no route to Redis, the database, the
  registry, the Kubernetes API or the internet. The PID namespace shows only the sandbox's processes, so the
  worker's ``/proc/<pid>/environ`` is out of reach.
* **A filesystem of read-only binds**: ``/usr`` (and the ``/bin``, ``/lib*`` links), ``/etc/ld.so.cache``, the
  Python install and Margin's own code (the loop that runs around the tenant's model); a fresh ``/proc`` and
  ``/dev``. ``/job/in`` (read-only) holds the job's inputs (the package, the dataset, base weights, a checkpoint);
  ``/job/out`` is the only writable place. The worker's artifact store, checkpoints, other jobs' directories,
  ``/etc/passwd``, ``/root`` and ``/tmp`` do not exist in it.
* **A cleared environment** (``--clearenv``): HOME, TMPDIR, PYTHONPATH and thread counts only; no service
  credentials, no database or Redis URL.
* **Its own user**: a worker running as root starts bwrap as root (to set up the mounts) and ``setpriv`` then
  drops the job to a user id of its own (from ``MARGIN_SANDBOX_UID_BASE``) with no capabilities, so RLIMIT_NPROC
  counts only that job's processes and file permissions separate it from everything else. A worker that is not
  root uses an unprivileged user namespace instead (``--unshare-user``) and counts its process limit on top of
  the processes its user already runs.
* **Limits** (rlimits, inherited by every process inside): address space (RLIMIT_AS, per process), processes and
  threads (RLIMIT_NPROC), file size (RLIMIT_FSIZE), CPU time (RLIMIT_CPU), open files, no core dumps; the threads
  torch and OpenMP use (the worker's share of cores). Wall-clock, silence and budget
  limits are the worker's (:mod:`margin.worker.package_job`), which kills the sandbox: ``--die-with-parent`` and
  the PID namespace take every process inside down with it.

The worker and the code inside talk over two pipes (:mod:`margin.worker.pipe`).
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import margin
from margin.common import config

SANDBOX_ROOT = "/job"
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
UID_SPAN = 60_000


class SandboxUnavailable(RuntimeError):
    """bubblewrap (or setpriv) is not installed on this worker: no tenant code can run here."""


@dataclass(frozen=True)
class Limits:
    memory_mb: int
    processes: int
    file_mb: int
    threads: int
    cpu_seconds: int = 0   # CPU time per process (RLIMIT_CPU); 0: none beyond the worker's wall-clock limit
    open_files: int = 1024

    @classmethod
    def from_config(cls, threads: int, wall_seconds: float) -> Limits:
        """The configured limits; CPU time is capped at every core busy for the attempt's wall-clock limit (a
        backstop: the worker stops the sandbox at that limit itself)."""
        cpu = int(min(wall_seconds, 30 * 86_400) * (os.cpu_count() or 1)) + 60
        return cls(config.SANDBOX_MEMORY_MB.get_int(), config.SANDBOX_PROCESSES.get_int(),
                   config.SANDBOX_FILE_MB.get_int(), threads, cpu)

    def describe(self) -> str:
        return (f"{self.memory_mb} MiB of address space per process, {self.processes} processes/threads, "
                f"{self.file_mb} MiB per file" + (f", {self.cpu_seconds} CPU seconds" if self.cpu_seconds else ""))


@dataclass(frozen=True)
class SandboxDirs:
    root: Path     # on the worker: the job's sandbox directory (removed when the attempt ends)
    inputs: Path   # root/in  -> /job/in  (read-only inside)
    output: Path   # root/out -> /job/out (the only writable directory inside)

    @classmethod
    def create(cls, parent: Path, name: str) -> SandboxDirs:
        root = Path(parent) / name
        shutil.rmtree(root, ignore_errors=True)
        (root / "in").mkdir(parents=True)
        (root / "out" / "tmp").mkdir(parents=True)
        os.chmod(root, 0o755)
        return cls(root, root / "in", root / "out")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def sandbox_uid(name: str) -> int:
    """The user id a root worker runs the sandbox ``name`` as: one per job attempt, from the configured base."""
    return config.SANDBOX_UID_BASE.get_int() + zlib.crc32(name.encode()) % UID_SPAN


def code_root() -> Path:
    """The directory holding the ``margin`` package (bound read-only, and on PYTHONPATH, inside)."""
    return Path(margin.__file__).resolve().parent.parent


def python_dirs() -> list[Path]:
    """The Python install the sandbox runs: the interpreter's prefixes (a venv and its base) and Margin's code."""
    dirs = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
            code_root()}
    kept = sorted(d for d in dirs if not str(d).startswith("/usr/"))
    return [d for d in kept if not any(d != other and other in d.parents for other in kept)]


def _with_parents(path: Path, made: set[Path]) -> list[str]:
    """bwrap arguments making ``path``'s parents world-traversable directories (bwrap's default is 0700)."""
    args: list[str] = []
    for parent in reversed(path.parents):
        if str(parent) != "/" and parent not in made:
            made.add(parent)
            args += ["--perms", "0755", "--dir", str(parent)]
    return args


def filesystem_args(dirs: SandboxDirs, gpu: bool) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for link in SYSTEM_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    made: set[Path] = set()
    args += ["--perms", "0755", "--dir", "/etc", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for path in python_dirs():
        args += [*_with_parents(path, made), "--ro-bind", str(path), str(path)]
    args += ["--proc", "/proc", "--dev", "/dev"]
    if gpu:  # the GPU's device nodes (driver libraries are under the bound /usr)
        args += [a for dev in sorted(Path("/dev").glob("nvidia*")) for a in ("--dev-bind", str(dev), str(dev))]
    args += ["--perms", "0755", "--dir", SANDBOX_ROOT,
             "--ro-bind", str(dirs.inputs), f"{SANDBOX_ROOT}/in", "--bind", str(dirs.output), f"{SANDBOX_ROOT}/out"]
    return args


def environment_args(limits: Limits) -> list[str]:
    env = {"HOME": f"{SANDBOX_ROOT}/out", "TMPDIR": f"{SANDBOX_ROOT}/out/tmp", "PYTHONPATH": str(code_root()),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": str(limits.threads), "MKL_NUM_THREADS": str(limits.threads)}
    return ["--clearenv"] + [a for k, v in env.items() for a in ("--setenv", k, v)]


def _processes_of(uid: int) -> int:
    """Tasks (processes and threads) running as ``uid`` now: what RLIMIT_NPROC counts."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


class Sandbox:
    """One sandboxed process tree for one job attempt."""

    def __init__(self, dirs: SandboxDirs, limits: Limits, name: str, gpu: bool = False):
        for tool in ("bwrap",) + (("setpriv",) if os.geteuid() == 0 else ()):
            if shutil.which(tool) is None:
                raise SandboxUnavailable(f"{tool} is not installed on this worker (install bubblewrap and "
                                         "util-linux): it cannot run a model package")
        self.dirs, self.limits, self.name, self.gpu = dirs, limits, name, gpu
        self.as_root = os.geteuid() == 0
        self.uid = sandbox_uid(name) if self.as_root else os.getuid()
        self.process: subprocess.Popen | None = None
        if self.as_root:
            os.chown(dirs.output, self.uid, self.uid)
            os.chown(dirs.output / "tmp", self.uid, self.uid)

    def command(self, argv: list[str]) -> list[str]:
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                      "--hostname", "sandbox", "--die-with-parent", "--new-session"]
        if not self.as_root:
            namespaces.append("--unshare-user")
        drop = ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs"] if self.as_root else []
        return ["bwrap", *namespaces, *filesystem_args(self.dirs, self.gpu), *environment_args(self.limits),
                "--chdir", f"{SANDBOX_ROOT}/out", "--", *drop, *argv]

    def _limit(self) -> None:
        """Runs in the child before bwrap starts: the rlimits every process inside inherits."""
        mib = 1 << 20
        processes = self.limits.processes + (0 if self.as_root else _processes_of(self.uid))
        for which, value in ((resource.RLIMIT_AS, self.limits.memory_mb * mib),
                             (resource.RLIMIT_NPROC, processes),
                             (resource.RLIMIT_FSIZE, self.limits.file_mb * mib),
                             (resource.RLIMIT_NOFILE, self.limits.open_files),
                             (resource.RLIMIT_CORE, 0),
                             *(((resource.RLIMIT_CPU, self.limits.cpu_seconds),) if self.limits.cpu_seconds else ())):
            resource.setrlimit(which, (value, value))

    def start(self, argv: list[str], log: Path, pass_fds: tuple[int, ...]) -> subprocess.Popen:
        """Start ``argv`` inside the sandbox; its stdout and stderr go to ``log`` (on the worker's side)."""
        with open(log, "ab") as out:
            self.process = subprocess.Popen(self.command(argv), stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, pass_fds=pass_fds, close_fds=True,
                                            preexec_fn=self._limit, start_new_session=True)
        return self.process

    def kill(self) -> None:
        """Stop every process inside (killing bwrap ends its PID namespace)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
