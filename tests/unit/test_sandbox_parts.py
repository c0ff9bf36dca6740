"""The worker's side of the sandbox, piece by piece: the pipe's framing against a hostile writer, reading what the
sandbox left (never through a link or a FIFO, never beyond a cap), the bwrap command line (what is shared and what
is not), and the runtime's error messages. The whole path runs for real in tests/integration/test_package_sandbox.py.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from margin.common.tensors import TensorSpec
from margin.worker import package_job
from margin.worker.package_job import SandboxFailure, exported_signature, open_output, with_limit_hint
from margin.worker.package_runtime import describe
from margin.worker.pipe import MAX_LINE, Channel, ProtocolError
from margin.worker.sandbox import SYSTEM_LINKS, Limits, Sandbox, SandboxDirs, code_root, python_dirs

LIMITS = Limits(memory_mb=512, processes=64, file_mb=16, threads=1)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    channel = Channel(r, w)
    yield channel, w
    channel.close()


def test_messages_cross_the_pipe_one_json_object_per_line(pipe):
    channel, _ = pipe
    channel.send({"op": "step", "loss": 0.5})
    channel.send({"op": "epoch"})
    assert channel.receive(1) == {"op": "step", "loss": 0.5}
    assert channel.receive(1) == {"op": "epoch"}
    assert channel.receive(0.01) is None and not channel.closed


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"no_op": 1}\n', b'{"op": 3}\n', b"\xff\xfe\n"])
def test_anything_but_a_message_object_is_a_protocol_error(pipe, line):
    channel, w = pipe
    os.write(w, line)
    with pytest.raises(ProtocolError):
        channel.receive(1)


def test_a_line_longer_than_the_cap_is_a_protocol_error_before_it_is_all_read():
    r, w = os.pipe()
    channel = Channel(r, w)
    chunk = b"x" * 65536
    written = 0
    os.set_blocking(w, False)
    with pytest.raises(ProtocolError, match="longer than"):
        while True:
            try:
                written += os.write(w, chunk)
            except BlockingIOError:
                pass
            channel.receive(0.01)
    assert written <= MAX_LINE + 2 * len(chunk) + 65536 * 16
    channel.close()


def test_a_closed_pipe_reads_as_none_and_closed():
    r, w = os.pipe()
    os.close(w)
    channel = Channel(r, r)
    assert channel.receive(1) is None and channel.closed
    os.close(r)


@pytest.fixture
def dirs(tmp_path) -> SandboxDirs:
    return SandboxDirs.create(tmp_path, "job-1.a1")


def test_outputs_are_read_only_as_regular_files_within_their_cap(dirs, tmp_path):
    (dirs.output / "weights.safetensors").write_bytes(b"w" * 10)
    with open_output(dirs, "weights.safetensors", 10) as f:
        assert f.read() == b"w" * 10
    assert open_output(dirs, "model.onnx", 10) is None
    with pytest.raises(SandboxFailure, match="regular file of at most 9 bytes"):
        open_output(dirs, "weights.safetensors", 9)
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    os.symlink(secret, dirs.output / "model.ts")
    with pytest.raises(SandboxFailure, match=r"model\.ts as something other than a regular file"):
        open_output(dirs, "model.ts", 1 << 20)
    os.mkfifo(dirs.output / "model.onnx")
    with pytest.raises(SandboxFailure, match=r"model\.onnx as something other than a regular file"):
        open_output(dirs, "model.onnx", 1 << 20)  # a FIFO would block a plain open: O_NONBLOCK, then refused


def test_the_runtimes_description_of_the_model_becomes_a_triton_ready_signature():
    sig = exported_signature({"inputs": [["images", "float32", [-1, 3, 32, 32]], ["mask", "int64", [-1, 4]]],
                              "output": ["float32", [-1, 10]]})
    assert sig.inputs == (TensorSpec("images", "FP32", (-1, 3, 32, 32)), TensorSpec("mask", "INT64", (-1, 4)))
    assert sig.outputs == (TensorSpec("output__0", "FP32", (-1, 10)),)
    assert exported_signature(None).empty


@pytest.mark.parametrize(("message", "limit"), [
    ("MemoryError: MemoryError", "memory"), ("BlockingIOError: [Errno 11] Resource temporarily unavailable",
                                             "processes"),
    ("OSError: [Errno 27] File too large", "file size")])
def test_a_failure_that_hit_a_limit_names_the_limit(message, limit):
    assert f"hit the sandbox's {limit} limit: 512 MiB" in with_limit_hint(message, LIMITS)
    assert with_limit_hint("ValueError: bad", LIMITS) == "ValueError: bad"


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_the_sandbox_shares_no_network_no_environment_and_only_read_only_code(dirs, monkeypatch):
    monkeypatch.setenv("MARGIN_ADMIN_KEY", "admin-secret")
    sandbox = Sandbox(dirs, LIMITS, "job-1.a1")
    argv = sandbox.command(["python", "-m", "margin.worker.package_runtime"])
    for flag in ("--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--clearenv",
                 "--die-with-parent", "--new-session"):
        assert flag in argv
    assert "admin-secret" not in " ".join(argv) and "MARGIN_ADMIN_KEY" not in argv
    writable = [argv[i + 1:i + 3] for i, a in enumerate(argv) if a == "--bind"]
    assert writable == [[str(dirs.output), "/job/out"]]
    read_only = {argv[i + 2] for i, a in enumerate(argv) if a in ("--ro-bind", "--ro-bind-try")}
    assert str(code_root()) in read_only and "/job/in" in read_only
    allowed = {"/usr", "/etc/ld.so.cache", "/job/in", *SYSTEM_LINKS, *(str(d) for d in python_dirs())}
    assert read_only <= allowed, read_only - allowed  # the system, Python and Margin's code; no worker data
    if os.geteuid() == 0:
        assert argv[argv.index("--") + 1] == "setpriv" and f"--reuid={sandbox.uid}" in argv
        assert sandbox.uid >= 200000 and os.stat(dirs.output).st_uid == sandbox.uid


def test_the_runtime_names_where_in_the_package_an_error_happened():
    source = "def build_model():\n    return {}['missing']\n"
    path = str(package_job.runtime.INPUTS / "package" / "model.py")
    namespace: dict = {}
    exec(compile(source, path, "exec"), namespace)  # a stand-in for the package's frame, compiled under its path
    with pytest.raises(KeyError) as info:
        namespace["build_model"]()
    assert describe(info.value) == "KeyError: 'missing' (at model.py line 2, in build_model)"
    assert json.dumps(describe(RuntimeError("x" * 5000)))  # bounded, JSON-able
    assert len(describe(RuntimeError("x" * 5000))) == 1500


NON_ROOT_LAUNCH = """
import sys
from pathlib import Path
sys.path.insert(0, {services!r})
from margin.worker.sandbox import Limits, Sandbox, SandboxDirs
dirs = SandboxDirs.create(Path({root!r}), "job-x.a1")
sandbox = Sandbox(dirs, Limits(512, 64, 16, 1), "job-x.a1")
assert not sandbox.as_root
probe = ("import os, resource, socket\\n"
         "print(os.getuid(), sorted(k for k in os.environ if k.startswith('MARGIN')), os.path.exists('/etc/passwd'))\\n"
         "try:\\n    socket.create_connection(('1.1.1.1', 443), timeout=2)\\nexcept OSError as err:\\n    print(err)\\n"
         "print(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20)")
sandbox.start(["/usr/bin/python3.11", "-c", probe], dirs.root / "log", pass_fds=())
print(sandbox.process.wait(), open(dirs.root / "log").read())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "setpriv"))
                    or not os.path.exists("/usr/bin/python3.11"),
                    reason="needs root (to become another user), bwrap, setpriv and the system python3.11")
def test_a_worker_that_is_not_root_sandboxes_with_an_unprivileged_user_namespace():
    """The non-root path, run for real: the launcher as uid 65534 (the system Python, which needs nothing but
    Margin's own code for this) starts a sandbox in which the probe has no network, no /etc/passwd, no MARGIN_*
    variables and the address-space limit."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as home:  # pytest's tmp_path is root's alone
        os.chmod(home, 0o777)
        script = NON_ROOT_LAUNCH.format(services=str(code_root()), root=home)
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "/usr/bin/python3.11", "-c", script],
                              env={"PATH": "/usr/bin:/bin", "HOME": home, "MARGIN_HOME": home,
                                   "MARGIN_ADMIN_KEY": "secret"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    code, uid, rest = done.stdout.split(" ", 2)
    assert (code, uid) == ("0", "65534") and "[] False" in rest, done.stdout
    assert "Network is unreachable" in rest and rest.strip().endswith("512"), done.stdout
