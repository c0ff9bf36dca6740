"""Configuration from environment variables, with documented defaults.

Every setting a service reads is declared here once as a :class:`Setting`, so ``margin config``
(and the README) can list them all. A required setting that is missing fails fast at start.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path


class ConfigError(RuntimeError):
    """A setting is missing or malformed; raised at start so the process exits with a clear message."""


@dataclass(frozen=True)
class Setting:
    env: str
    default: str | None
    doc: str

    def raw(self) -> str | None:
        value = os.environ.get(self.env)
        return value if value not in (None, "") else self.default

    def get(self) -> str:
        value = self.raw()
        if value is None:
            raise ConfigError(f"{self.env} is required: {self.doc}")
        return value

    def get_int(self) -> int:
        value = self.get()
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{self.env}={value!r} is not an integer: {self.doc}") from None

    def get_float(self) -> float:
        value = self.get()
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{self.env}={value!r} is not a number: {self.doc}") from None


MARGIN_HOME = Setting("MARGIN_HOME", str(Path.home() / ".margin"),
                      "Directory of the local cluster: state file, SQLite database, artifacts, logs.")
DATABASE_URL = Setting("DATABASE_URL", None,
                       "SQLAlchemy URL of the metadata database; default sqlite:///$MARGIN_HOME/margin.db. "
                       "Use postgresql+psycopg://... in a cluster.")
ARTIFACT_DIR = Setting("MARGIN_ARTIFACT_DIR", None,
                       "Directory of the artifact store; default $MARGIN_HOME/artifacts.")
GRPC_PORT = Setting("MARGIN_GRPC_PORT", "50051", "Port the service's gRPC server binds (0 = any free port).")
GRPC_HOST = Setting("MARGIN_GRPC_HOST", "[::]", "Address the gRPC server binds.")
GRPC_WORKERS = Setting("MARGIN_GRPC_WORKERS", "16", "Threads serving gRPC calls.")
METRICS_PORT = Setting("MARGIN_METRICS_PORT", "9090",
                       "Port of the Prometheus /metrics endpoint (0 = any free port, -1 = off).")
GRACE_SECONDS = Setting("MARGIN_GRACE_SECONDS", "20",
                        "On SIGTERM, seconds in-flight calls may take to finish; keep it below the pod's "
                        "terminationGracePeriodSeconds.")
LOG_LEVEL = Setting("MARGIN_LOG_LEVEL", "INFO", "Log level.")
LOG_FORMAT = Setting("MARGIN_LOG_FORMAT", "auto",
                     "'json' (one object per line), 'text', or 'auto' (text on a terminal, else json).")
ADMIN_KEY = Setting("MARGIN_ADMIN_KEY", None,
                    "The operator's key for tenant administration (CreateTenant, CreateApiKey). Required by "
                    "the budget service; at least 24 characters.")
MAX_UPLOAD_BYTES = Setting("MARGIN_MAX_UPLOAD_BYTES", str(4 << 30), "Largest artifact the registry accepts.")
AUTH_CACHE_SECONDS = Setting("MARGIN_AUTH_CACHE_SECONDS", "5",
                             "How long a service trusts an API key it verified before looking it up again: a "
                             "revoked key, or a disabled tenant's, is refused on every service within this bound.")
PRICE_CATALOG = Setting("MARGIN_PRICE_CATALOG", None,
                        "YAML file merged over the default price catalog (device $/hour, watts, $/kWh).")

REDIS_URL = Setting("MARGIN_REDIS_URL", "redis://127.0.0.1:6379/0", "Redis for rate limits, quotas and the broker.")
TRITON_URL = Setting("MARGIN_TRITON_URL", "127.0.0.1:8001",
                     "Triton's gRPC address (the inference service): host:port, or a pool's replicas as "
                     "dns:///host:port (every address of the name) or ipv4:a:p,b:q.")
REGISTRY_ADDR = Setting("MARGIN_REGISTRY_ADDR", "127.0.0.1:50051", "The registry's gRPC address, for other services.")
MODEL_REPOSITORY = Setting("MARGIN_MODEL_REPOSITORY", None,
                           "Triton's model repository directory; default $MARGIN_HOME/model-repository.")
TRITON_INSTANCE_KIND = Setting("MARGIN_TRITON_INSTANCE_KIND", "KIND_CPU",
                               "KIND_CPU or KIND_GPU for deployed models, or auto (KIND_CPU on the cpu class, "
                               "KIND_GPU on the others: a cluster with GPU serving pools).")
RATE_LIMIT_RPS = Setting("MARGIN_RATE_LIMIT_RPS", "1000", "Default per-tenant Predict rate (requests/s).")
RATE_LIMIT_BURST = Setting("MARGIN_RATE_LIMIT_BURST", "2000", "Default per-tenant burst (requests).")
TRAINING_ADDR = Setting("MARGIN_TRAINING_ADDR", "127.0.0.1:50052", "The training service's gRPC address (CLI).")
CHECKPOINT_DIR = Setting("MARGIN_CHECKPOINT_DIR", None,
                         "Where workers keep job checkpoints (a PVC or bucket mount in a cluster); "
                         "default $MARGIN_HOME/checkpoints.")
MAX_MODEL_PARAMETERS = Setting("MARGIN_MAX_MODEL_PARAMETERS", "50000000",
                               "Largest model (trainable parameters, counted from its architecture spec) a training "
                               "job, a distillation student or a compression source may have.")
MAX_LAYER_WIDTH = Setting("MARGIN_MAX_LAYER_WIDTH", "8192",
                          "Largest size of one layer in an architecture spec: input features (input_dim, "
                          "image_size²), hidden units, channels and classes.")
MAX_LAYERS = Setting("MARGIN_MAX_LAYERS", "64", "Most hidden layers (mlp hidden, cnn channels) an architecture has.")
MAX_WORLD_SIZE = Setting("MARGIN_MAX_WORLD_SIZE", "8", "Largest world_size (DDP processes) a training job may ask for.")
JOB_LEASE_SECONDS = Setting("MARGIN_JOB_LEASE_SECONDS", "30",
                            "A running job's lease; a worker renews it every second, and a job whose lease "
                            "lapsed (its whole worker died) is queued again.")
JOB_MAX_ATTEMPTS = Setting("MARGIN_JOB_MAX_ATTEMPTS", "3",
                           "Attempts a job gets before it ends FAILED (a poison job does not loop).")
VISIBILITY_TIMEOUT = Setting("MARGIN_VISIBILITY_TIMEOUT", "7200",
                             "Seconds Redis keeps an unacknowledged task before redelivering it; keep it longer "
                             "than the longest checkpoint interval (one epoch).")
TORCH_THREADS = Setting("MARGIN_TORCH_THREADS", "0",
                        "CPU threads a training process uses (0 = every core). With several workers on one node, "
                        "give each cores / workers so they do not oversubscribe the CPU (and bill waiting time).")
HELD_OUT_SENTENCES = Setting("MARGIN_HELD_OUT_SENTENCES",
                             str(Path(__file__).resolve().parents[3] / "tests" / "data" / "sentences.txt"),
                             "Text file, one sentence a line: the built-in evaluation dataset 'margin:sentences' "
                             "on which compressed sentence encoders (minilm) are scored by cosine similarity.")
WORKER_QUEUES = Setting("MARGIN_WORKER_QUEUES", "train.cpu",
                        "Comma-separated Celery queues a worker consumes: one per device class "
                        "(train.cpu, train.nvidia-a100, ...).")
TRITON_METRICS_URL = Setting("MARGIN_TRITON_METRICS_URL", "",
                             "Triton's Prometheus endpoint (http://host:8002/metrics): the autoscaler's demand "
                             "signal; empty = plan from measured capacity only.")
AUTOSCALER_TARGET = Setting("MARGIN_AUTOSCALER_TARGET", "report-only",
                            "What the autoscaler acts on: report-only (compute and report the plan; the local "
                            "mode), hpa (spec.maxReplicas), keda (ScaledObject spec.maxReplicaCount) or deployment "
                            "(replicas).")
AUTOSCALER_NAMESPACE = Setting("MARGIN_AUTOSCALER_NAMESPACE", "margin",
                               "Kubernetes namespace of the serving objects the autoscaler manages.")
AUTOSCALER_INTERVAL_SECONDS = Setting("MARGIN_AUTOSCALER_INTERVAL_SECONDS", "15",
                                      "Seconds between the autoscaler's ticks (0 = only on GetScalingPlan).")
TRITON_URLS = Setting("MARGIN_TRITON_URLS", "",
                      "JSON object: device class -> the gRPC address of the Triton pool serving it "
                      "(a cluster with several serving pools); empty = MARGIN_TRITON_URL serves every class.")
AUTOSCALER_TARGETS = Setting("MARGIN_AUTOSCALER_TARGETS", "",
                             "JSON object: device class -> the name of the HPA / ScaledObject / Deployment of the "
                             "Triton pool serving it; the autoscaler sets each pool's ceiling to the sum of the "
                             "replicas chosen for the deployments it serves.")
BUDGETS_FILE = Setting("MARGIN_BUDGETS_FILE", None,
                       "YAML list of tenants and their budgets (Helm values `tenants`), applied when the budget "
                       "service starts: each tenant is created if missing and its budget set.")
BUDGET_ALERT_INTERVAL_SECONDS = Setting("MARGIN_BUDGET_ALERT_INTERVAL_SECONDS", "5",
                                       "How often the budget service checks every budgeted tenant's spend for "
                                       "crossed alert thresholds.")
BUDGET_ADDR = Setting("MARGIN_BUDGET_ADDR", "127.0.0.1:50055",
                      "The budget service's gRPC address: where the inference gateway and the workers report the "
                      "fleet they see, and the gateway reads each tenant's serving budget.")
FLEET_INTERVAL_SECONDS = Setting("MARGIN_FLEET_INTERVAL_SECONDS", "15",
                                 "The metering interval: every this many seconds (aligned to the clock) each pool's "
                                 "live replica-seconds × price is billed and allocated.")
IDLE_POLICY = Setting("MARGIN_IDLE_POLICY", "usage",
                      "Who pays for idle replica time (the budget service): usage (split the whole bill by Triton "
                      "compute time; an interval without any by reserved replicas), reservation (by reserved "
                      "replicas) or platform (tenants pay their usage share, the idle rest is the platform's).")
BURN_WINDOW_SECONDS = Setting("MARGIN_BURN_WINDOW_SECONDS", "300",
                              "How much of the recent past the serving burn rate (projections, the autoscaler) is "
                              "read over.")
TRITON_DEVICE_CLASS = Setting("MARGIN_TRITON_DEVICE_CLASS", "cpu",
                              "The device class (price) of the replicas of MARGIN_TRITON_URL's pool, when it serves "
                              "every class (the local Triton runs on this machine's CPU).")
SCALE_TO_ZERO_AFTER_SECONDS = Setting("MARGIN_SCALE_TO_ZERO_AFTER_SECONDS", "900",
                                      "A deployment with min_replicas 0 idle this long is unloaded (its own "
                                      "scale_to_zero_after_seconds wins).")
COLD_START_TIMEOUT_SECONDS = Setting("MARGIN_COLD_START_TIMEOUT_SECONDS", "30",
                                     "How long a Predict waits for a scaled-to-zero deployment to load before it "
                                     "answers UNAVAILABLE with a retry hint (the load goes on).")
RELOAD_CONCURRENCY = Setting("MARGIN_RELOAD_CONCURRENCY", "8",
                             "How many deployments the gateway loads at once on a Triton replica that came back "
                             "(a restart, or a new replica): its deployments are back in about the time of the "
                             "slowest load, not of all of them one after another. At least 1.")
COALESCE_IN_FLIGHT = Setting("MARGIN_COALESCE_IN_FLIGHT", "1",
                             "How many calls the gateway has on their way to Triton per deployment, per model "
                             "instance and replica, before further requests wait to share one upstream batch (their "
                             "rows concatenated, the outputs split back per request). A lone request never waits. "
                             "At least 1.")
LEDGER_ID_KEY = Setting("MARGIN_LEDGER_ID_KEY", None,
                        "Secret (at least 24 characters) keying the ids of the ledger entries Margin's services and "
                        "workers write (an HMAC-SHA256 of what each entry is for): a retry writes the same id and "
                        "bills once, and no one without the key can compute an id before it is written. Every "
                        "process of one deployment must share it; default: derived from MARGIN_ADMIN_KEY, which "
                        "they all hold (changing either changes the ids of entries not written yet, never the "
                        "ledger's).")
WEBHOOK_ALLOW = Setting("MARGIN_WEBHOOK_ALLOW", "",
                        "Comma-separated hosts and CIDRs budget webhooks may reach although they are not public. "
                        "By default a webhook is refused when its host is a cluster-internal name (localhost, a "
                        "name without a dot, *.svc, *.cluster.local, *.internal, *.local, *.localdomain) or "
                        "resolves, when it is sent, to a loopback, private (RFC 1918, ULA), link-local (cloud "
                        "metadata 169.254.169.254), CGNAT, multicast, reserved or unspecified address. A host "
                        "(hooks.corp.example, or *.corp.example for its subdomains) is allowed whatever it "
                        "resolves to; a CIDR (10.20.0.0/16, 127.0.0.1/32) allows the addresses in it.")
TRITON_CONTROL_KEY = Setting("MARGIN_TRITON_CONTROL_KEY", None,
                             "The key Triton requires for model control (load, unload, the repository index) and "
                             "its server settings (tritonserver --grpc-restricted-protocol and "
                             "--http-restricted-api): only the inference gateway holds it and sends it. Unset: the "
                             "gateway sends none (a Triton started without the restriction). The local cluster "
                             "generates one each time it starts; the chart keeps one in a Secret.")

MAX_PACKAGE_BYTES = Setting("MARGIN_MAX_PACKAGE_BYTES", str(1 << 20),
                            "Largest model package (one .py file, or a .zip of .py files, counted uncompressed) "
                            "the registry accepts.")
SANDBOX = Setting("MARGIN_SANDBOX", "bubblewrap",
                  "How a worker runs a tenant's model package: 'bubblewrap' (bwrap: its own mount, PID, IPC, UTS "
                  "and network namespaces, a cleared environment, rlimits). There is no unsandboxed mode.")
SANDBOX_MEMORY_MB = Setting("MARGIN_SANDBOX_MEMORY_MB", "6144",
                            "Address space each process of a sandboxed package job may map (RLIMIT_AS), in MiB.")
SANDBOX_PROCESSES = Setting("MARGIN_SANDBOX_PROCESSES", "512",
                            "Processes and threads a sandboxed package job may run at once (RLIMIT_NPROC, "
                            "counted for the sandbox's own user id).")
SANDBOX_FILE_MB = Setting("MARGIN_SANDBOX_FILE_MB", "2048",
                          "Largest file a sandboxed package job may write in its private directory "
                          "(RLIMIT_FSIZE), in MiB.")
SANDBOX_MAX_SECONDS = Setting("MARGIN_SANDBOX_MAX_SECONDS", "21600",
                              "Wall-clock cap on one attempt of a package job (a job's own max_seconds may only "
                              "lower it); past it the sandbox is killed and the job FAILS.")
SANDBOX_SILENCE_SECONDS = Setting("MARGIN_SANDBOX_SILENCE_SECONDS", "600",
                                  "Longest a package's code may run without returning to Margin's loop (one "
                                  "build_model, one step, one export) before the sandbox is killed.")
SANDBOX_DIR = Setting("MARGIN_SANDBOX_DIR", None,
                      "Where a worker makes each sandboxed package job's private directories (default: "
                      "$MARGIN_HOME/sandbox); removed when the attempt ends.")
SANDBOX_UID_BASE = Setting("MARGIN_SANDBOX_UID_BASE", "200000",
                           "A worker running as root runs each sandbox under its own user id from this base "
                           "(one per job, so process limits and file permissions separate jobs).")

ALL_SETTINGS = [MARGIN_HOME, DATABASE_URL, ARTIFACT_DIR, GRPC_HOST, GRPC_PORT, GRPC_WORKERS, METRICS_PORT,
                GRACE_SECONDS, LOG_LEVEL, LOG_FORMAT, ADMIN_KEY, MAX_UPLOAD_BYTES, AUTH_CACHE_SECONDS,
                PRICE_CATALOG, REDIS_URL, TRITON_URL, REGISTRY_ADDR, MODEL_REPOSITORY, TRITON_INSTANCE_KIND,
                RATE_LIMIT_RPS, RATE_LIMIT_BURST, TRAINING_ADDR, CHECKPOINT_DIR, MAX_MODEL_PARAMETERS,
                MAX_LAYER_WIDTH, MAX_LAYERS, MAX_WORLD_SIZE, JOB_LEASE_SECONDS,
                JOB_MAX_ATTEMPTS, VISIBILITY_TIMEOUT, TORCH_THREADS, WORKER_QUEUES, HELD_OUT_SENTENCES,
                BUDGET_ALERT_INTERVAL_SECONDS, TRITON_METRICS_URL, AUTOSCALER_TARGET, AUTOSCALER_NAMESPACE,
                AUTOSCALER_INTERVAL_SECONDS, TRITON_URLS, AUTOSCALER_TARGETS, BUDGETS_FILE, BUDGET_ADDR,
                FLEET_INTERVAL_SECONDS, IDLE_POLICY, BURN_WINDOW_SECONDS, TRITON_DEVICE_CLASS,
                SCALE_TO_ZERO_AFTER_SECONDS, COLD_START_TIMEOUT_SECONDS, LEDGER_ID_KEY, WEBHOOK_ALLOW,
                TRITON_CONTROL_KEY, RELOAD_CONCURRENCY, COALESCE_IN_FLIGHT, MAX_PACKAGE_BYTES, SANDBOX,
                SANDBOX_MEMORY_MB, SANDBOX_PROCESSES, SANDBOX_FILE_MB, SANDBOX_MAX_SECONDS,
                SANDBOX_SILENCE_SECONDS, SANDBOX_UID_BASE, SANDBOX_DIR]


def margin_home() -> Path:
    return Path(MARGIN_HOME.get()).expanduser()


def database_url() -> str:
    return DATABASE_URL.raw() or f"sqlite:///{margin_home() / 'margin.db'}"


def artifact_dir() -> Path:
    raw = ARTIFACT_DIR.raw()
    return Path(raw).expanduser() if raw else margin_home() / "artifacts"


def checkpoint_dir() -> Path:
    raw = CHECKPOINT_DIR.raw()
    return Path(raw).expanduser() if raw else margin_home() / "checkpoints"


def sandbox_dir() -> Path:
    raw = SANDBOX_DIR.raw()
    return Path(raw).expanduser() if raw else margin_home() / "sandbox"


def torch_threads() -> int:
    """Threads for one training process: MARGIN_TORCH_THREADS, or every core when it is 0."""
    return TORCH_THREADS.get_int() or os.cpu_count() or 1


def held_out_sentences() -> Path:
    return Path(HELD_OUT_SENTENCES.get()).expanduser()


def admin_key() -> str:
    key = ADMIN_KEY.get()
    if len(key) < 24:
        raise ConfigError("MARGIN_ADMIN_KEY must be at least 24 characters")
    return key


def ledger_id_key(admin_key: str | None = None) -> bytes | None:
    """The key of the ledger's entry ids (:data:`LEDGER_ID_KEY`): its own setting, else derived from the admin key
    (``admin_key``, else MARGIN_ADMIN_KEY); None when there is neither (ids are then keyed per process)."""
    own = LEDGER_ID_KEY.raw()
    if own:
        if len(own) < 24:
            raise ConfigError(f"{LEDGER_ID_KEY.env} must be at least 24 characters")
        return own.encode()
    admin = admin_key or ADMIN_KEY.raw()
    if not admin:
        return None
    return hmac.new(admin.encode(), b"margin ledger entry ids", hashlib.sha256).digest()
