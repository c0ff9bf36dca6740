"""The training control plane, free of gRPC: resolve and validate specs and estimate them; admission, queueing,
reading, cancelling and watching are the shared :class:`~margin.common.jobcontrol.JobControl`."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from margin.common import manifest
from margin.common.costs import PriceCatalog
from margin.common.dispatch import Dispatcher
from margin.common.errors import InvalidArgument
from margin.common.jobcontrol import Admission, Caller, JobControl, check_request
from margin.common.jobevents import JobEvents
from margin.common.jobs import Job, JobStore
from margin.modelzoo import sizes
from margin.modelzoo import spec as specs
from margin.modelzoo.datasets import BUILTIN_SHAPES
from margin.modelzoo.spec import BaseRef, TrainSpec
from margin.sdk.registry_source import RegistrySource, VersionInfo
from margin.training.estimate import Estimate, Estimator

log = logging.getLogger(__name__)
KIND = "training"


def dataset_rows(spec: TrainSpec, data: VersionInfo) -> int:
    """The row count of the registry dataset ``data``, after checking from its manifest that it has features ``x``
    the architecture takes and integer labels ``y``. A version uploaded before manifests has none: its rows are
    guessed from its size, and the worker checks its arrays when it loads them (``worker.data.check_fits``)."""
    features = sizes.sizes(spec.model_spec()).input_features
    if data.signature.empty:
        per_row = 4 * features + 8  # fp32 features + an int64 label
        return max(2, data.size_bytes // per_row)
    what = f"dataset {data.model} v{data.number}"
    manifest.check_features(data.signature, features, what=what)
    manifest.check_labels(data.signature, what=what)
    return manifest.rows(data.signature)


class TrainingCore:
    def __init__(self, store: JobStore, events: JobEvents, dispatcher: Dispatcher, registry: RegistrySource,
                 catalog: PriceCatalog, max_world_size: int, tenant_remaining: Callable[[str, str], int | None]):
        self.jobs = JobControl(KIND, store, events, dispatcher,  # get, list, cancel, watch, requeue
                               tenant_remaining=tenant_remaining)
        self.registry, self.catalog = registry, catalog
        self.estimator = Estimator(store, catalog)
        self.max_world_size = max_world_size

    # -- specs ------------------------------------------------------------------------------------
    def resolve(self, caller: Caller, spec: TrainSpec) -> tuple[TrainSpec, int]:
        """Validate ``spec`` and pin what it names in the registry (package, base and dataset versions, as the caller
        sees them: another tenant's version is NOT_FOUND). Returns the spec and the dataset's row count. A registry
        dataset with a manifest is checked against the architecture here, before anything is queued or billed."""
        package = None
        if spec.package:
            package = self._package(caller, spec.package)
            spec = replace(spec, package=BaseRef(package.model, package.number))
        base_parameters = None
        if spec.base:
            spec, base_parameters = self._base(caller, spec)
        if spec.package and package is None:
            package = self._package(caller, spec.package)
        data = None
        if spec.dataset_version:
            ref = spec.dataset_version
            data = self.registry.version(caller.api_key, ref.model, ref.number, ref.alias)
            if data.format != "dataset-npz":
                raise InvalidArgument(f"dataset {data.model} v{data.number} is {data.format}, not dataset-npz")
            spec = replace(spec, dataset_version=BaseRef(data.model, data.number))
        spec = specs.validate(spec, max_world_size=self.max_world_size, device_classes=self.catalog.device_classes)
        if base_parameters:
            specs.check_freeze(spec.freeze_layers, base_parameters)
        if package is not None:
            what = f"dataset {data.model} v{data.number}"
            needs_labels = "loss" not in package.architecture.get("defines", [])
            manifest.check_package_data(data.signature, needs_labels=needs_labels, what=what)
            return spec, manifest.rows(data.signature)
        if data is None:
            return spec, BUILTIN_SHAPES[spec.dataset].rows
        return spec, dataset_rows(spec, data)

    def _package(self, caller: Caller, ref: BaseRef) -> VersionInfo:
        version = self.registry.version(caller.api_key, ref.model, ref.number, ref.alias)
        if version.format != "model-package":
            raise InvalidArgument(f"spec.package: {version.model} v{version.number} is {version.format}, not a "
                                  "model package (upload code with `margin models upload-package`)")
        return version

    def _base(self, caller: Caller, spec: TrainSpec) -> tuple[TrainSpec, list[str] | None]:
        """Pin the base version to fine-tune from. A version trained from a package fine-tunes with that package
        (the job may name a later version of it) and, unless the job says otherwise, the same config; returns the
        spec and the base's parameter names (for a package: as recorded when it was trained)."""
        base = self.registry.version(caller.api_key, spec.base.model, spec.base.number, spec.base.alias)
        pinned = BaseRef(base.model, base.number)
        trained_from = base.architecture.get("package") if base.format == "safetensors" else None
        if isinstance(trained_from, dict):
            if spec.family:
                raise InvalidArgument(f"base version {base.model} v{base.number} was trained from package "
                                      f"{trained_from.get('model')!r}; fine-tune it with that package, not a family")
            if spec.package and spec.package.model != trained_from.get("model"):
                raise InvalidArgument(f"base version {base.model} v{base.number} was trained from package "
                                      f"{trained_from.get('model')!r}, not {spec.package.model!r}")
            package = spec.package or BaseRef(str(trained_from.get("model")), int(trained_from.get("number") or 0))
            config = spec.config or dict(base.architecture.get("config") or {})
            names = [str(n) for n in base.architecture.get("parameters") or []]
            return replace(spec, package=package, config=config, base=pinned), names or None
        if base.format != "safetensors" or not base.architecture.get("family"):
            raise InvalidArgument(f"base version {base.model} v{base.number} is {base.format}; fine-tuning "
                                  "needs a safetensors version trained by Margin (a built-in family, or a model "
                                  "package)")
        if spec.package:
            raise InvalidArgument(f"base version {base.model} v{base.number} is a built-in "
                                  f"{base.architecture['family']!r}; it cannot be fine-tuned with a package")
        family = base.architecture["family"]
        if spec.family and spec.family != family:
            raise InvalidArgument(f"spec.family {spec.family!r} differs from the base version's {family!r}")
        arch = {k: v for k, v in base.architecture.items() if k != "family"}
        arch.update({k: v for k, v in spec.architecture.items() if k == "num_classes"})
        return replace(spec, family=family, architecture=arch, base=pinned), None

    def estimate(self, caller: Caller, spec: TrainSpec) -> tuple[TrainSpec, Estimate]:
        spec, rows = self.resolve(caller, spec)
        return spec, self.estimator.estimate(spec, rows)

    # -- jobs -------------------------------------------------------------------------------------
    def submit(self, caller: Caller, spec: TrainSpec, budget_micros: int, idempotency_key: str = "") -> Job:
        check_request(budget_micros, idempotency_key)
        existing = self.jobs.existing(caller, idempotency_key)
        if existing is not None:
            return existing
        spec, estimate = self.estimate(caller, spec)
        return self.jobs.admit(caller, Admission(spec.to_dict(), spec.device_class, estimate.to_dict(),
                                                 spec.world_size, spec.epochs), budget_micros, idempotency_key)
