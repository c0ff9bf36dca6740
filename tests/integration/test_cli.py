"""Integration tests of the ``margin`` console script against a real local cluster.

One cluster for the module (real redis-server, tritonserver, budget, registry and inference services) in its
own temporary MARGIN_HOME; every command runs the installed console script in a subprocess, as a user would,
and the tests check exit codes and what is printed. The tests run in file order and build on each other."""
from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from margin.cluster import local, state

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MARGIN = REPO / ".venv" / "bin" / "margin"

_ISOLATED_ENV = ("MARGIN_HOME", "MARGIN_ADMIN_KEY", "MARGIN_API_KEY", "MARGIN_REGISTRY_ADDR", "MARGIN_BUDGET_ADDR",
                 "DATABASE_URL", "MARGIN_ARTIFACT_DIR", "MARGIN_GRPC_PORT", "MARGIN_METRICS_PORT")


@dataclass
class Result:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def __str__(self) -> str:
        return f"margin {' '.join(self.args)} -> exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


@dataclass
class CliCluster:
    home: Path
    work: Path
    env: dict[str, str]
    seen_pids: set[int] = field(default_factory=set)
    keys: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 60) -> Result:
        proc = subprocess.run([str(MARGIN), *args], env=self.env, cwd=self.work, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        return Result(args, proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str) -> Result:
        result = self.run(*args)
        assert result.code == 0, str(result)
        assert "Traceback" not in result.text, str(result)
        return result

    def fails(self, code: int, *args: str) -> Result:
        result = self.run(*args)
        assert result.code == code, str(result)
        assert "Traceback" not in result.text, str(result)
        return result

    def acme(self, *args: str) -> tuple[str, ...]:
        return (*args, "--api-key", self.keys["acme"])


def _all_pids(current: dict) -> set[int]:
    pids = {current.get("supervisor_pid"), *(s.get("pid") for s in current.get("services", {}).values())}
    return {p for p in pids if p}


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliCluster]:
    home = tmp_path_factory.mktemp("margin_home_cli")
    work = tmp_path_factory.mktemp("margin_cli_work")
    saved = {name: os.environ.get(name) for name in _ISOLATED_ENV}
    for name in _ISOLATED_ENV:
        os.environ.pop(name, None)
    os.environ["MARGIN_HOME"] = str(home)
    pythonpath = os.pathsep.join(p for p in (str(REPO / "services"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "MARGIN_HOME": str(home), "PYTHONPATH": pythonpath, "NO_COLOR": "1", "TERM": "dumb"}
    cluster = CliCluster(home, work, env)
    try:
        cluster.seen_pids |= _all_pids(local.up())
        yield cluster
    finally:
        try:
            local.down()
            pids = cluster.seen_pids | _all_pids(state.read_state())
            still_alive = sorted(p for p in pids if state.pid_alive(p))
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        assert not still_alive, f"processes of the local cluster still alive after down(): {still_alive}"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("artifacts")
    model_path, second_path = folder / "linear.pt", folder / "linear2.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated upstream; TorchScript is what the registry serves
        warnings.simplefilter("ignore", DeprecationWarning)
        for seed, path in ((0, model_path), (1, second_path)):
            torch.manual_seed(seed)
            torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(path))
    assert model_path.read_bytes() != second_path.read_bytes()
    sig_path = folder / "sig.json"
    sig_path.write_text(json.dumps({
        "inputs": [{"name": "input", "dtype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "logits__0", "dtype": "FP32", "shape": [-1, 2]}]}))
    return {"model": model_path, "second": second_path, "signature": sig_path}


def _one_error(result: Result, code_name: str) -> str:
    """The single error message a failed command printed (rich may soft-wrap it at the console width)."""
    text = result.out.strip()
    assert text.startswith(f"{code_name}: "), result
    assert "\n\n" not in text and "Error" not in text.split(":", 1)[0], result
    return " ".join(line.strip() for line in text.splitlines())


def _table_row(output: str, first_cell: str) -> str:
    """The line of a rich table whose first cell is ``first_cell``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃|").split("│")]
        if cells and cells[0] == first_cell:
            return line
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{output}")


# -- local cluster commands ---------------------------------------------------------------------------------
def test_status_shows_every_part(cli: CliCluster) -> None:
    current = state.read_state()
    out = cli.ok("status").out
    assert "Local cluster: ready" in out, out
    for name in ("redis", "triton", "budget", "registry", "inference"):
        row = _table_row(out, name)
        assert current["services"][name]["address"] in row, row
        assert str(current["services"][name]["pid"]) in row, row


def test_up_again_is_idempotent(cli: CliCluster) -> None:
    before = state.read_state()
    out = cli.ok("up").out
    assert "registry" in out and "Local cluster: ready" in out, out
    assert str(state.demo_key_path()) in out
    after = state.read_state()
    assert after["supervisor_pid"] == before["supervisor_pid"]
    assert {n: s["address"] for n, s in after["services"].items()} == \
           {n: s["address"] for n, s in before["services"].items()}


def test_config_lists_the_settings(cli: CliCluster) -> None:
    out = cli.ok("config").out
    for variable in ("MARGIN_ADMIN_KEY", "DATABASE_URL", "MARGIN_HOME", "MARGIN_GRPC_PORT"):
        assert variable in out, out


# -- tenants and models -------------------------------------------------------------------------------------------
def test_create_tenant_prints_a_working_key(cli: CliCluster) -> None:
    result = cli.ok("admin", "create-tenant", "acme")
    lines = [line for line in result.out.splitlines() if line.strip()]
    key = lines[-1].strip()
    assert key.startswith("mk_"), result
    assert "acme" in result.out
    cli.keys["acme"] = key
    # the key is accepted (an empty list, not UNAUTHENTICATED)
    out = cli.ok(*cli.acme("models", "list")).out
    assert "Models" in out

    # a second tenant of the same name is refused with one readable line
    again = cli.fails(1, "admin", "create-tenant", "acme")
    assert "acme" in _one_error(again, "ALREADY_EXISTS")


def test_bad_api_key_is_refused(cli: CliCluster) -> None:
    result = cli.fails(1, "models", "list", "--api-key", "mk_not-a-real-key")
    _one_error(result, "UNAUTHENTICATED")


def test_create_and_list_models_with_labels(cli: CliCluster) -> None:
    created = cli.ok(*cli.acme("models", "create", "m1", "--label", "team=x"))
    assert "m1" in created.out and "team=x" in created.out, created
    listed = cli.ok(*cli.acme("models", "list")).out
    row = _table_row(listed, "m1")
    assert "team=x" in row, listed
    # label selector filters
    assert "m1" in cli.ok(*cli.acme("models", "list", "--label", "team=x")).out
    assert "m1" not in cli.ok(*cli.acme("models", "list", "--label", "team=y")).out
    # creating it twice is an error, not a second model
    dup = cli.fails(1, *cli.acme("models", "create", "m1"))
    assert "m1" in _one_error(dup, "ALREADY_EXISTS")


def test_demo_tenant_does_not_see_acme_models(cli: CliCluster) -> None:
    listed = cli.ok("models", "list").out  # default key: the demo tenant's
    assert "m1" not in listed and "team=x" not in listed, listed
    shown = cli.fails(1, "models", "show", "m1")
    assert "'m1'" in _one_error(shown, "NOT_FOUND")


# -- versions, aliases, lineage ----------------------------------------------------------------------------------
def test_upload_with_alias_and_download_by_alias(cli: CliCluster, artifacts: dict[str, Path]) -> None:
    up = cli.ok(*cli.acme("versions", "upload", "m1", str(artifacts["model"]), "--format", "torchscript",
                          "--signature", str(artifacts["signature"]), "--metric", "acc=0.9",
                          "--alias", "production"))
    row = _table_row(up.out, "1")
    assert "torchscript" in row and "production" in row and "acc=0.9" in row, up

    out_file = cli.work / "out.pt"
    down = cli.ok(*cli.acme("versions", "download", "m1@production", str(out_file)))
    assert "verified" in down.out, down
    assert out_file.read_bytes() == artifacts["model"].read_bytes()
    assert not Path(f"{out_file}.part").exists()

    listed = cli.ok(*cli.acme("versions", "list", "m1")).out
    row = _table_row(listed, "1")
    assert "production" in row and "torchscript" in row, listed

    shown = cli.ok(*cli.acme("models", "show", "m1")).out
    assert "production→v1" in shown, shown


def test_second_version_with_parent_and_lineage(cli: CliCluster, artifacts: dict[str, Path]) -> None:
    up = cli.ok(*cli.acme("versions", "upload", "m1", str(artifacts["second"]), "--format", "torchscript",
                          "--signature", str(artifacts["signature"]), "--parent", "m1:1", "--metric", "acc=0.95"))
    row = _table_row(up.out, "2")
    assert "v1" in row, up  # parent column: same model -> "v1"

    lineage = cli.ok(*cli.acme("lineage", "m1:2")).out
    assert "Lineage of m1:2" in lineage, lineage
    first, second = _table_row(lineage, "m1:2"), _table_row(lineage, "m1:1")
    assert "acc=0.95" in first and "acc=0.9" in second, lineage
    assert lineage.index("m1:2 ") < lineage.index("m1:1 "), "the chain starts at the version asked for"

    # the latest version is what a bare model name downloads
    out_file = cli.work / "latest.pt"
    cli.ok(*cli.acme("versions", "download", "m1", str(out_file)))
    assert out_file.read_bytes() == artifacts["second"].read_bytes()


def test_alias_set_and_delete(cli: CliCluster, artifacts: dict[str, Path]) -> None:
    moved = cli.ok(*cli.acme("alias", "set", "m1", "production", "2"))
    assert "m1@production → v2" in moved.out, moved
    out_file = cli.work / "prod.pt"
    cli.ok(*cli.acme("versions", "download", "m1@production", str(out_file)))
    assert out_file.read_bytes() == artifacts["second"].read_bytes()
    listed = cli.ok(*cli.acme("versions", "list", "m1")).out
    assert "production" in _table_row(listed, "2") and "production" not in _table_row(listed, "1"), listed

    removed = cli.ok(*cli.acme("alias", "delete", "m1", "production"))
    assert "removed m1@production" in removed.out, removed
    listed = cli.ok(*cli.acme("versions", "list", "m1")).out
    assert "production" not in listed, listed
    gone = cli.fails(1, *cli.acme("versions", "download", "m1@production", str(cli.work / "gone.pt")))
    assert "production" in _one_error(gone, "NOT_FOUND")
    assert not (cli.work / "gone.pt").exists()


def test_deploy_predict_from_npy_and_undeploy(cli: CliCluster, artifacts: dict[str, Path]) -> None:
    import numpy as np
    torch = pytest.importorskip("torch")
    cli.ok(*cli.acme("versions", "upload", "m1", str(artifacts["model"]), "--format", "torchscript",
                     "--signature", str(artifacts["signature"])))
    deployed = cli.ok(*cli.acme("deploy", "m1:3", "--max-batch-size", "8")).out
    row = _table_row(deployed, "m1-v3")
    assert "READY" in row and "$0.17" in row and "req/s" in row, deployed
    assert "m1-v3" in cli.ok(*cli.acme("deployments")).out

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(cli.work / "x.npy", x)
    out = cli.ok(*cli.acme("predict", "m1:3", str(cli.work / "x.npy"))).out
    assert "served by m1:3 (m1-v3)" in out and "cost" in out, out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = torch.jit.load(str(artifacts["model"]))(torch.from_numpy(x)).detach().numpy()
    assert f"{expected[0, 0]:.4f}"[:5] in out, (expected, out)

    np.save(cli.work / "bad.npy", np.zeros((2, 5), np.float32))
    bad = cli.fails(1, *cli.acme("predict", "m1:3", str(cli.work / "bad.npy")))
    assert "input: FP32[-1, 4]" in _one_error(bad, "INVALID_ARGUMENT")
    np.save(cli.work / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled = cli.run(*cli.acme("predict", "m1:3", str(cli.work / "obj.npy")))
    assert pickled.code == 1 and "Traceback" not in pickled.text and "pickle" in pickled.text.lower(), pickled

    gone = cli.ok(*cli.acme("undeploy", "m1-v3")).out
    assert "UNLOADED" in _table_row(gone, "m1-v3"), gone


def test_budget_set_show_and_spend_by_deployment(cli: CliCluster) -> None:
    out = cli.ok(*cli.acme("budget", "set", "--total", "2", "--period", "daily", "--serving", "0.5",
                           "--alert", "0.5", "--alert", "0.9")).out
    assert "budget for acme: $2.00 daily, alerts at 50%, 90%" in out, out
    assert "$0.50" in _table_row(out, "serving") and "$2.00" in _table_row(out, "total"), out
    deadline = time.monotonic() + 10  # the gateway writes its meter to the ledger every second
    while "m1-v3" not in (spent := cli.ok(*cli.acme("spend")).out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "By deployment" in spent and "serving" in _table_row(spent, "m1-v3"), spent
    assert "acme" in cli.ok(*cli.acme("budget", "show")).out
    assert "weekly" in cli.fails(2, *cli.acme("budget", "set", "--total", "2", "--period", "weekly")).text
    assert "fractions" in _one_error(cli.fails(1, *cli.acme("budget", "set", "--total", "2", "--alert", "0")),
                                     "INVALID_ARGUMENT")


def test_report_fleet_and_margin_with_the_local_clusters_keys(cli: CliCluster) -> None:
    fleet = cli.ok("report", "fleet")  # no key given: the local cluster's admin key, from MARGIN_HOME
    text = " ".join(fleet.out.split())
    assert "(replica-seconds × price) = tenants $" in text and "— equal to the micro" in text, fleet
    refused = cli.fails(1, *cli.acme("report", "fleet"))
    assert "admin key" in _one_error(refused, "PERMISSION_DENIED")
    margin = cli.ok(*cli.acme("report", "margin"))
    assert "Revenue and gross margin" in margin.out, margin
    assert "no price list is set" in " ".join(margin.out.split()), margin


# -- a newcomer's own model: upload, signature dtypes, predict ----------------------------------------------------
def _save_torchscript(module, path: Path) -> Path:
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():  # torch.jit is deprecated upstream; TorchScript is what the registry serves
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def _write_signature(path: Path, inputs: list[tuple[str, str, list[int]]],
                     outputs: list[tuple[str, str, list[int]]]) -> Path:
    def specs(items):
        return [{"name": name, "dtype": dtype, "shape": shape} for name, dtype, shape in items]
    path.write_text(json.dumps({"inputs": specs(inputs), "outputs": specs(outputs)}))
    return path


def test_upload_to_a_missing_model_is_refused_before_streaming_or_creates_it(cli: CliCluster,
                                                                             artifacts: dict[str, Path]) -> None:
    upload = ("versions", "upload", "door-new", str(artifacts["model"]), "--format", "torchscript",
              "--signature", str(artifacts["signature"]))
    refused = cli.fails(1, *upload)
    message = _one_error(refused, "NOT_FOUND")
    assert "'door-new'" in message and "margin models create door-new" in message and "--create" in message, message
    assert "uploading" not in refused.text, refused  # refused before the progress bar: no byte was streamed
    assert "door-new" not in cli.ok("models", "list").out

    created = cli.ok(*upload, "--create")
    assert "torchscript" in _table_row(created.out, "1"), created
    assert "door-new" in cli.ok("models", "list").out
    again = cli.ok(*upload, "--create")  # the model exists now: --create just uploads
    assert "torchscript" in _table_row(again.out, "2"), again


def test_signature_dtypes_may_use_numpy_names(cli: CliCluster, artifacts: dict[str, Path]) -> None:
    from margin.cli.context import connection
    from margin.common import protoconv
    from margin.common.tensors import Signature
    from margin.sdk import RegistryClient
    from margin.v1 import common_pb2, registry_pb2

    helped = " ".join(cli.ok("versions", "upload", "--help").out.split())
    assert "float32" in helped and "INT64" in helped, helped
    numpy_spelled = _write_signature(cli.work / "numpy_sig.json", [("input", "float32", [-1, 4])],
                                     [("logits__0", "float32", [-1, 2])])
    cli.ok("models", "create", "door-dtypes")
    cli.ok("versions", "upload", "door-dtypes", str(artifacts["model"]), "--format", "torchscript",
           "--signature", str(numpy_spelled))
    conn = connection("registry")
    try:
        version = RegistryClient(conn).stub.GetVersion(registry_pb2.GetVersionRequest(
            version=common_pb2.VersionRef(model="door-dtypes", number=1)), metadata=conn.metadata)
    finally:
        conn.close()
    expected = Signature.from_dict(json.loads(artifacts["signature"].read_text()))  # the same, spelt FP32
    assert protoconv.signature_from_proto(version.signature) == expected


def test_predict_needs_no_input_name_for_a_single_input_model(cli: CliCluster) -> None:
    import numpy as np
    torch = pytest.importorskip("torch")

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.linear(features)

    class Pair(torch.nn.Module):
        def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            return left + right

    one = _save_torchscript(Features(), cli.work / "features.pt")
    two = _save_torchscript(Pair(), cli.work / "pair.pt")
    cli.ok("versions", "upload", "door-one", str(one), "--format", "torchscript", "--create", "--signature",
           str(_write_signature(cli.work / "one.json", [("features", "FP32", [-1, 4])],
                                [("logits__0", "FP32", [-1, 2])])))
    cli.ok("versions", "upload", "door-two", str(two), "--format", "torchscript", "--create", "--signature",
           str(_write_signature(cli.work / "two.json", [("left", "FP32", [-1, 4]), ("right", "FP32", [-1, 4])],
                                [("sum__0", "FP32", [-1, 4])])))
    for model in ("door-one", "door-two"):
        assert "READY" in _table_row(cli.ok("deploy", f"{model}:1", "--max-batch-size", "8").out, f"{model}-v1")

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(cli.work / "features.npy", x)
    out = cli.ok("predict", "door-one:1", str(cli.work / "features.npy")).out  # no --input: its only input
    assert "served by door-one:1" in out, out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = torch.jit.load(str(one))(torch.from_numpy(x)).detach().numpy()
    assert f"{expected[0, 0]:.4f}"[:5] in out, (expected, out)

    ambiguous = cli.fails(2, "predict", "door-two:1", str(cli.work / "features.npy"))
    text = " ".join(ambiguous.text.split())
    assert "2 inputs (left, right)" in text and "--input" in text, ambiguous
    for model in ("door-one", "door-two"):
        assert "UNLOADED" in _table_row(cli.ok("undeploy", f"{model}-v1").out, f"{model}-v1")


# -- errors -------------------------------------------------------------------------------------------------------
def test_download_of_a_missing_version_is_one_readable_line(cli: CliCluster) -> None:
    target = cli.work / "x"
    result = cli.fails(1, *cli.acme("versions", "download", "m1:99", str(target)))
    assert "m1" in _one_error(result, "NOT_FOUND")
    assert not target.exists() and not Path(f"{target}.part").exists()


def test_invalid_model_name_is_refused(cli: CliCluster) -> None:
    result = cli.fails(1, *cli.acme("models", "create", "../x"))
    assert "'../x' is not allowed" in _one_error(result, "INVALID_ARGUMENT")
    assert "../x" not in cli.ok(*cli.acme("models", "list")).out


def test_bad_ref_syntax_is_a_usage_error(cli: CliCluster) -> None:
    for args in (("versions", "download", "m1:abc", str(cli.work / "y")), ("lineage", "m1:abc")):
        result = cli.fails(2, *cli.acme(*args))
        assert "m1:abc" in result.text and "MODEL:NUMBER" in result.text, result
        assert not (cli.work / "y").exists()


@pytest.mark.parametrize("case", [
    pytest.param(("models", "create", "m2", "--label", "team"), id="label-without-equals"),
    pytest.param(("versions", "upload", "m1", "{model}", "--format", "torchscript", "--metric", "acc"),
                 id="metric-without-equals"),
    pytest.param(("versions", "upload", "m1", "{model}", "--format", "torchscript", "--metric", "acc=high"),
                 id="metric-not-a-number"),
    pytest.param(("versions", "upload", "m1", "{model}", "--format", "torchscript", "--signature", "{bad_sig}"),
                 id="invalid-signature-file"),
    pytest.param(("versions", "download", "m1:1", "{missing_dir}/out.pt"), id="download-into-missing-dir"),
])
def test_malformed_local_input_is_reported_without_traceback(cli: CliCluster, artifacts: dict[str, Path],
                                                            case: tuple[str, ...]) -> None:
    bad_sig = cli.work / "bad_sig.json"
    bad_sig.write_text(json.dumps({"inputs": [{"name": "input", "dtype": "FP99", "shape": [-1, 4]}]}))
    args = [a.format(model=artifacts["model"], bad_sig=bad_sig, missing_dir=cli.work / "no" / "such")
            for a in case]
    before = cli.ok(*cli.acme("versions", "list", "m1")).out
    result = cli.run(*cli.acme(*args))
    assert result.code in (1, 2), str(result)
    assert "Traceback" not in result.text, str(result)
    assert len(result.text.strip().splitlines()) <= 6, str(result)
    # and nothing was created by the refused command
    assert cli.ok(*cli.acme("versions", "list", "m1")).out.count("torchscript") == before.count("torchscript")
