"""Deployments: a registry version exported into Triton's model repository, loaded, and measured.

Deploy is idempotent (the same version and settings return the existing deployment) and leaves the
deployment READY or FAILED with the reason. A deployment lives on the Triton pool of its device class
(:mod:`margin.inference.pools`), loaded on every replica of the pool (:mod:`margin.inference.replicas`); when a
replica comes up (a restart, or a new one the autoscaler added), :meth:`DeploymentManager.reload` loads there the
pool's READY deployments it lacks, because Triton in explicit mode starts with nothing loaded. Undeploy removes the
model from the repository too, so a replica started with ``--load-model=*`` does not load it again.

A deployment may be *scaled to zero* (:meth:`DeploymentManager.scale_to_zero`): unloaded from every replica so it
costs nothing, its model kept in the repository; :meth:`DeploymentManager.wake` loads it again (a cold start) and
records how long that took. What decides it is :mod:`margin.inference.scaling`.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from margin.common import costs, modelpackage
from margin.common.errors import FailedPrecondition, InvalidArgument, MarginError, NotFound
from margin.common.names import validate_name
from margin.common.paging import decode_token, encode_token, page_size
from margin.common.tenancy import TenantRow, as_utc, utcnow
from margin.common.tensors import Signature
from margin.inference.pools import TritonPools
from margin.inference.probe import probe, zero_inputs
from margin.inference.replicas import TritonReplicas
from margin.inference.tables import DeploymentRow
from margin.inference.triton_client import TritonClient
from margin.inference.triton_export import BACKENDS, TritonOptions, export_version
from margin.sdk.registry_source import RegistrySource, VersionInfo

log = logging.getLogger(__name__)

READY, LOADING, FAILED, UNLOADED = "READY", "LOADING", "FAILED", "UNLOADED"
SCALED_TO_ZERO = "SCALED_TO_ZERO"
SERVABLE = (READY, LOADING, SCALED_TO_ZERO)  # what a Predict may reach (the last two after a cold start)


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 500


@dataclass(frozen=True)
class DeploySpec:
    model: str
    number: int = 0
    alias: str = ""
    device_class: str = "cpu"
    instances: int = 1
    batching: Batching = field(default_factory=Batching)
    min_replicas: int = 1
    max_replicas: int = 1
    scale_to_zero_after_s: int = 0  # 0: the platform's default (with min_replicas 0)


@dataclass(frozen=True)
class Deployment:
    name: str
    triton_name: str
    model: str
    version: int
    state: str
    device_class: str
    instances: int
    batching: Batching
    signature: Signature
    metrics: dict[str, float]
    price_micros_per_hour: int
    capacity_rps: float
    cost_per_million_micros: int
    latency_p50_ms: float
    min_replicas: int
    max_replicas: int
    created_at: datetime
    message: str
    tenant_id: int
    tenant: str = ""
    scale_to_zero_after_s: int = 0
    last_cold_start_at: datetime | None = None
    last_cold_start_ms: float = 0.0


def _record(row: DeploymentRow, tenant: str = "") -> Deployment:
    b = row.batching or {}
    return Deployment(
        name=row.name, triton_name=row.triton_name, model=row.model, version=row.version, state=row.state,
        device_class=row.device_class, instances=row.instances,
        batching=Batching(b.get("max_batch_size", 0), tuple(b.get("preferred_batch_sizes", ())),
                          b.get("max_queue_delay_us", 0)),
        signature=Signature.from_dict(row.signature), metrics=dict(row.metrics or {}),
        price_micros_per_hour=row.price_micros_per_hour, capacity_rps=row.capacity_rps,
        cost_per_million_micros=row.cost_per_million_micros, latency_p50_ms=row.latency_p50_ms,
        min_replicas=row.min_replicas, max_replicas=row.max_replicas, created_at=as_utc(row.created_at),
        message=row.message, tenant_id=row.tenant_id, tenant=tenant,
        scale_to_zero_after_s=row.scale_to_zero_after_s or 0, last_cold_start_at=as_utc(row.last_cold_start_at),
        last_cold_start_ms=row.last_cold_start_ms or 0.0)


def _with_tenant():
    """Deployments with their tenant's name."""
    return select(DeploymentRow, TenantRow.name).join(TenantRow, TenantRow.id == DeploymentRow.tenant_id)


def instance_kind_for(setting: str, device_class: str) -> str:
    """Triton's instance kind for a deployment: the configured kind, or with ``auto`` (a cluster with CPU and GPU
    pools) KIND_CPU on the ``cpu`` class and KIND_GPU on every other (GPU) class."""
    if setting == "auto":
        return "KIND_CPU" if device_class == "cpu" else "KIND_GPU"
    return setting


# An example signature for the refusals below: what `margin versions upload --signature FILE` reads from FILE.
_EXAMPLE_SIGNATURE = ('{"inputs": [{"name": "x", "dtype": "FP32", "shape": [-1, 4]}], '
                      '"outputs": [{"name": "y", "dtype": "FP32", "shape": [-1, 3]}]}')


def register_signature_hint(version: VersionInfo) -> str:
    """How to register a version with a signature: the CLI command, for the version's model and format."""
    return (f"register a signature: upload the version again with one, `margin versions upload {version.model} FILE "
            f"--format {version.format} --signature sig.json`, sig.json being {_EXAMPLE_SIGNATURE} "
            "(a first dimension of -1 is the batch dimension)")


def check_servable(version: VersionInfo, options: TritonOptions) -> None:
    """Raise :class:`FailedPrecondition` before anything is saved when ``version`` cannot be deployed with
    ``options``: a format the backend does not serve, no signature (Triton needs every tensor's name, dtype and
    shape), or a signature without a batch dimension while batching is asked for. The signature refusals say first
    how to register one, since that is what a newcomer's upload most often lacks. A model package is refused with
    :class:`InvalidArgument`: it is code, and what serves is the version a training job makes of it."""
    label = f"{version.model} v{version.number}"
    if version.format == modelpackage.FORMAT:
        raise modelpackage.package_refusal(label)
    servable = [fmt for fmt, backend in BACKENDS if backend == options.backend]
    if version.format not in servable:
        raise FailedPrecondition(f"{label} is {version.format}; deploy a {' or '.join(servable)} version "
                                 "(export it first)")
    signature = version.signature
    if not signature.inputs or not signature.outputs:
        lacking = "outputs" if signature.inputs else "inputs"
        has = "no signature" if signature.empty else f"a signature without {lacking}"
        raise FailedPrecondition(f"{label} has {has}, and serving needs its inputs' and outputs' names, dtypes and "
                                 f"shapes; {register_signature_hint(version)}")
    if options.max_batch_size and not signature.batched:
        raise FailedPrecondition(
            f"{label}'s signature has no batch dimension ({signature.describe()}); "
            f"{register_signature_hint(version)}; or deploy with max_batch_size 0 to serve the full shapes unbatched")


class DeploymentManager:
    def __init__(self, sessions: sessionmaker, pools: TritonPools, repository: Path, registry: RegistrySource,
                 catalog: costs.PriceCatalog, instance_kind: str = "KIND_CPU", calibrate_seconds: float = 0.3,
                 reload_concurrency: int = 8):
        """``reload_concurrency``: how many deployments :meth:`reload` loads at once."""
        self._sessions = sessions
        self._reload_concurrency = max(1, reload_concurrency)
        self.pools = pools
        self.repository = Path(repository)
        self.repository.mkdir(parents=True, exist_ok=True)
        self._registry = registry
        self._catalog = catalog
        self._instance_kind = instance_kind
        self._calibrate_seconds = calibrate_seconds
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # the fleet observer's hooks: read a pool's Triton statistics before an unload (Triton forgets an unloaded
        # model's counters); deployments changed (the autoscaler's view)
        self.before_unload: Callable[[Deployment], None] = lambda deployment: None
        self.changed: Callable[[], None] = lambda: None
        self.loaded: Callable[[Deployment], None] = lambda deployment: None  # deployed or loaded from zero: in use

    # -- deploy / undeploy -------------------------------------------------------------------------
    def deploy(self, tenant_id: int, api_key: str, spec: DeploySpec) -> Deployment:
        """Everything about the request is checked before anything is saved, so a bad request leaves no
        deployment behind; a failure after that (download, export, load) leaves it FAILED with the reason."""
        self._check_spec(spec)
        settings, options = self._settings(spec), self._options(spec)
        triton = self.pools.for_class(spec.device_class)
        version = self._registry.version(api_key, spec.model, spec.number, spec.alias)
        check_servable(version, options)
        name = f"{version.model}-v{version.number}"
        triton_name = f"t{tenant_id}--{name}"
        with self._lock(triton_name):
            existing = self._row(tenant_id, name, missing_ok=True)
            if existing and existing.state == READY and self._same(existing, settings) \
                    and triton.model_ready(triton_name):
                return existing
            self._save(tenant_id, name, triton_name, version, settings, LOADING, "")
            exported = False
            try:
                self._export(api_key, version, triton_name, options, self.repository_for(spec.device_class))
                exported = True
                triton.load(triton_name)
                probe(triton, triton_name, version.signature, f"{version.model} v{version.number}")
                capacity, p50 = self._calibrate(triton.replica(), triton_name, version.signature)
            except Exception as err:
                if exported:  # what failed to load, or loaded but failed its probe, is served nowhere
                    self._discard(triton, triton_name, spec.device_class)
                self._save(tenant_id, name, triton_name, version, settings, FAILED, str(err)[:900])
                raise
            if existing:
                self._leave_previous_pool(existing, triton)
            price = self._catalog.device(spec.device_class).micros_per_hour  # per replica
            cpm = costs.cost_per_million_micros(price, capacity) if capacity else 0
            deployed = self._save(tenant_id, name, triton_name, version, settings, READY, "",
                                  capacity_rps=capacity, cost_per_million_micros=cpm, latency_p50_ms=p50)
        self.loaded(deployed)
        self.changed()
        return deployed

    def undeploy(self, tenant_id: int, name: str) -> Deployment:
        current = self._row(tenant_id, name)
        with self._lock(current.triton_name):
            if current.state != UNLOADED and self.pools.serves(current.device_class):  # else no pool has it now
                if current.state != SCALED_TO_ZERO:
                    self.before_unload(current)
                    self.pools.for_class(current.device_class).unload(current.triton_name)
                self._remove_from_repository(current)
            with self._sessions.begin() as s:
                s.get(DeploymentRow, self._row_id(tenant_id, name)).state = UNLOADED
        self.changed()
        return self._row(tenant_id, name)

    def scale_to_zero(self, tenant_id: int, name: str, reason: str) -> Deployment | None:
        """Unload a READY deployment from every replica of its pool, keeping its model in the repository (a cold
        start only loads it); its state becomes SCALED_TO_ZERO with ``reason``. None when it was not READY (a
        deploy, undeploy or cold start got there first)."""
        current = self._row(tenant_id, name, missing_ok=True)
        if current is None or current.state != READY:
            return None
        with self._lock(current.triton_name):
            current = self._row(tenant_id, name)
            if current.state != READY:
                return None
            self.before_unload(current)
            self.pools.for_class(current.device_class).unload(current.triton_name)
            with self._sessions.begin() as s:
                row = s.get(DeploymentRow, self._row_id(tenant_id, name))
                row.state, row.message = SCALED_TO_ZERO, f"scaled to zero: {reason}"[:1000]
        log.info("%s scaled to zero: %s", current.triton_name, reason)
        self.changed()
        return self._row(tenant_id, name)

    def wake(self, tenant_id: int, name: str) -> Deployment:
        """A cold start: load a SCALED_TO_ZERO deployment on every replica of its pool and record how long it took.
        A deployment already READY is returned as it is. A load that fails leaves it SCALED_TO_ZERO (a later
        request tries again) and raises."""
        current = self._row(tenant_id, name)
        with self._lock(current.triton_name):
            current = self._row(tenant_id, name)
            if current.state == READY:
                return current
            if current.state not in SERVABLE:
                raise FailedPrecondition(f"deployment {name!r} is {current.state}: deploy it again")
            row_id = self._row_id(tenant_id, name)
            with self._sessions.begin() as s:
                s.get(DeploymentRow, row_id).state = LOADING
            self.changed()
            started = time.perf_counter()
            try:
                self.pools.for_class(current.device_class).load(current.triton_name)
            except Exception as err:
                with self._sessions.begin() as s:
                    row = s.get(DeploymentRow, row_id)
                    row.state, row.message = SCALED_TO_ZERO, f"cold start failed: {err}"[:1000]
                raise
            took_ms = (time.perf_counter() - started) * 1000
            with self._sessions.begin() as s:
                row = s.get(DeploymentRow, row_id)
                row.state, row.message = READY, ""
                row.last_cold_start_at, row.last_cold_start_ms = utcnow(), took_ms
        log.info("%s loaded from zero in %.0f ms", current.triton_name, took_ms)
        woken = self._row(tenant_id, name)
        self.loaded(woken)
        self.changed()
        return woken

    def reload(self, classes: Iterable[str] | None = None, on: TritonClient | None = None) -> int:
        """Load every READY deployment on its pool, or only those of device ``classes`` (the classes of a pool whose
        replica came up), on every replica or only ``on`` (the replica that came up), skipping a replica where it
        is ready already (a replica started with ``--load-model=*``). Up to ``reload_concurrency`` loads run at
        once, so a restarted replica has its deployments back in about the time of the slowest load, not of all
        of them in a row. Returns how many it loaded somewhere."""
        query = select(DeploymentRow.triton_name).where(DeploymentRow.state.in_([READY, SCALED_TO_ZERO]))
        if classes is not None:
            query = query.where(DeploymentRow.device_class.in_(list(classes)))
        with self._sessions() as s:
            names = list(s.scalars(query.order_by(DeploymentRow.id)).all())
        if not names:
            return 0
        with ThreadPoolExecutor(min(self._reload_concurrency, len(names)), thread_name_prefix="reload") as pool:
            return sum(pool.map(lambda name: self._reload_one(name, on), names))

    def _reload_one(self, triton_name: str, on: TritonClient | None) -> bool:
        """Load one deployment where it is missing (see :meth:`reload`); under its lock, its state read again there,
        so one scaled to zero, redeployed or undeployed meanwhile is not loaded back. True when it was loaded."""
        with self._lock(triton_name):
            with self._sessions() as s:
                row = s.execute(select(DeploymentRow.device_class, DeploymentRow.state)
                                .where(DeploymentRow.triton_name == triton_name)).first()
            if row is None:
                return False
            try:
                target = on or self.pools.for_class(row.device_class)
                if row.state == SCALED_TO_ZERO:  # a replica started with --load-model=* loads it from the repository
                    if on is not None and target.model_ready(triton_name):
                        target.unload(triton_name)
                    return False
                if row.state != READY or target.model_ready(triton_name):
                    return False
                target.load(triton_name)
                return True
            except Exception:  # one deployment that cannot be loaded does not keep the others from it
                log.exception("could not %s %s on %s", "unload scaled-to-zero" if row.state == SCALED_TO_ZERO
                              else "load", triton_name, (on.url if on else row.device_class))
                return False

    # -- reads -------------------------------------------------------------------------------------
    def get(self, tenant_id: int, name: str) -> Deployment:
        return self._row(tenant_id, name)

    def fleet(self) -> list[Deployment]:
        """Every tenant's deployments that are loaded or may be (READY, LOADING, SCALED_TO_ZERO), with their
        tenants' names: what the fleet observer reports."""
        return self._records(_with_tenant().where(DeploymentRow.state.in_(SERVABLE)).order_by(DeploymentRow.id))

    def list(self, tenant_id: int, model: str = "", size: int = 0, token: str = "") -> tuple[list[Deployment], str]:
        limit, after = page_size(size), decode_token(token)
        query = _with_tenant().where(DeploymentRow.tenant_id == tenant_id, DeploymentRow.id > after)
        if model:
            query = query.where(DeploymentRow.model == model)
        with self._sessions() as s:
            rows = s.execute(query.order_by(DeploymentRow.id).limit(limit + 1)).all()
            return [_record(r, t) for r, t in rows[:limit]], (encode_token(rows[limit - 1][0].id)
                                                              if len(rows) > limit else "")

    def servable_for_model(self, tenant_id: int, model: str) -> list[Deployment]:
        """The model's deployments a Predict may reach: READY, and LOADING or SCALED_TO_ZERO (after a cold start)."""
        return self._records(_with_tenant().where(DeploymentRow.tenant_id == tenant_id, DeploymentRow.model == model,
                                                  DeploymentRow.state.in_(SERVABLE)))

    def _records(self, query) -> list[Deployment]:
        with self._sessions() as s:
            return [_record(row, tenant) for row, tenant in s.execute(query).all()]

    # -- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _check_spec(spec: DeploySpec) -> None:
        validate_name(spec.model, "model name")
        if spec.instances < 1 or spec.instances > 64:
            raise InvalidArgument("instances must be between 1 and 64")
        if spec.min_replicas < 0 or spec.max_replicas < spec.min_replicas:
            raise InvalidArgument("replicas: need 0 <= min_replicas <= max_replicas")
        if spec.batching.max_batch_size < 0 or spec.batching.max_queue_delay_us < 0:
            raise InvalidArgument("batching: max_batch_size and max_queue_delay_microseconds must be >= 0")
        if not 0 <= spec.scale_to_zero_after_s <= 30 * 86_400:
            raise InvalidArgument("scale_to_zero_after_seconds must be between 0 (the platform's default) and 30 days")
        if spec.max_replicas > 1000:
            raise InvalidArgument("max_replicas must be at most 1000")

    def _settings(self, spec: DeploySpec) -> dict:
        try:
            self._catalog.device(spec.device_class)
        except costs.UnknownDeviceClass as err:
            raise InvalidArgument(str(err)) from None
        return {"device_class": spec.device_class, "instances": spec.instances,
                "batching": dataclasses.asdict(spec.batching), "min_replicas": spec.min_replicas,
                "max_replicas": spec.max_replicas, "scale_to_zero_after_s": spec.scale_to_zero_after_s}

    @staticmethod
    def _same(existing: Deployment, settings: dict) -> bool:
        return (existing.device_class, existing.instances, dataclasses.asdict(existing.batching),
                existing.min_replicas, existing.max_replicas, existing.scale_to_zero_after_s) == (
            settings["device_class"], settings["instances"], settings["batching"], settings["min_replicas"],
            settings["max_replicas"], settings["scale_to_zero_after_s"])

    def _options(self, spec: DeploySpec) -> TritonOptions:
        """Triton's settings for the deployment (validated: raises InvalidArgument)."""
        b = spec.batching
        return TritonOptions(backend="python", max_batch_size=b.max_batch_size,
                             preferred_batch_sizes=tuple(b.preferred_batch_sizes),
                             max_queue_delay_microseconds=b.max_queue_delay_us, instance_count=spec.instances,
                             instance_kind=instance_kind_for(self._instance_kind, spec.device_class))

    def repository_for(self, device_class: str) -> Path:
        """Where a deployment's model goes: the repository itself when one Triton serves every class, else the
        directory of its class (``<repository>/<device class>``), which is that pool's model repository — so a
        pool's new replica (``--load-model=*``) loads its own class's models, never another pool's."""
        if self.pools.classes is None:
            return self.repository
        path = self.repository / device_class
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _export(self, api_key: str, version: VersionInfo, triton_name: str, options: TritonOptions,
                repository: Path) -> None:
        with tempfile.TemporaryDirectory(dir=repository, prefix=".download-") as tmp:
            artifact = Path(tmp) / "artifact"  # export_version names it as its backend wants
            self._registry.download(api_key, version.model, version.number, artifact)
            export_version(version, artifact, repository, triton_name, options)

    def _remove_from_repository(self, deployment: Deployment) -> None:
        """Delete an unloaded deployment's model from its pool's repository, so that a replica started with
        ``--load-model=*`` does not load it again."""
        shutil.rmtree(self.repository_for(deployment.device_class) / deployment.triton_name, ignore_errors=True)

    def _discard(self, triton: TritonReplicas, triton_name: str, device_class: str) -> None:
        """After a deploy failed once its model was exported: unload it from the pool (where it loaded) and delete it
        from the repository, so that no replica serves it or loads it at start."""
        try:
            triton.unload(triton_name)
        except MarginError as err:
            log.warning("could not unload %s after its deploy failed: %s", triton_name, err)
        shutil.rmtree(self.repository_for(device_class) / triton_name, ignore_errors=True)

    def _leave_previous_pool(self, previous: Deployment, triton: TritonReplicas) -> None:
        """A redeploy on a device class served by another pool unloads the deployment from the pool it was on."""
        if previous.state == UNLOADED or not self.pools.serves(previous.device_class):
            return
        old = self.pools.for_class(previous.device_class)
        if old is not triton:
            try:
                if previous.state != SCALED_TO_ZERO:
                    self.before_unload(previous)
                old.unload(previous.triton_name)
                self._remove_from_repository(previous)
            except MarginError as err:
                log.warning("could not unload %s from its previous pool (%s): %s", previous.triton_name,
                            previous.device_class, err)

    def _calibrate(self, triton: TritonClient, triton_name: str, signature: Signature) -> tuple[float, float]:
        """Measure requests/s and p50 latency at batch 1 with 4 clients for a short while."""
        if self._calibrate_seconds <= 0:
            return 0.0, 0.0
        inputs = zero_inputs(signature)
        outputs = [t.name for t in signature.outputs]
        triton.infer(triton_name, inputs, outputs)  # warm-up
        latencies: list[float] = []
        deadline = time.monotonic() + self._calibrate_seconds

        def client() -> None:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                triton.infer(triton_name, inputs, outputs)
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            for f in [pool.submit(client) for _ in range(4)]:
                f.result()
        elapsed = time.perf_counter() - start
        latencies.sort()
        return len(latencies) / elapsed, latencies[len(latencies) // 2] * 1000

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _row_id(self, tenant_id: int, name: str) -> int:
        with self._sessions() as s:
            row_id = s.scalar(select(DeploymentRow.id).where(DeploymentRow.tenant_id == tenant_id,
                                                             DeploymentRow.name == name))
        if row_id is None:
            raise NotFound(f"deployment {name!r} not found")
        return row_id

    def _row(self, tenant_id: int, name: str, missing_ok: bool = False) -> Deployment | None:
        found = self._records(_with_tenant().where(DeploymentRow.tenant_id == tenant_id, DeploymentRow.name == name))
        if not found:
            if missing_ok:
                return None
            raise NotFound(f"deployment {name!r} not found")
        return found[0]

    def _save(self, tenant_id: int, name: str, triton_name: str, version: VersionInfo, settings: dict, state: str,
              message: str, **measured: float) -> Deployment:
        price = self._catalog.device(settings["device_class"]).micros_per_hour
        with self._sessions.begin() as s:
            row = s.scalar(select(DeploymentRow).where(DeploymentRow.triton_name == triton_name))
            if row is None:
                row = DeploymentRow(tenant_id=tenant_id, name=name, triton_name=triton_name, model=version.model,
                                    version=version.number)
                s.add(row)
            row.state, row.message = state, message
            row.signature, row.metrics = version.signature.to_dict(), version.metrics
            row.price_micros_per_hour = price
            for key, value in {**settings, **measured}.items():
                setattr(row, key, value)
            s.flush()
            return _record(row, s.scalar(select(TenantRow.name).where(TenantRow.id == tenant_id)) or "")
