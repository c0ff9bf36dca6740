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
        """Validate ``spec`` and pin what it names in the registry (base and dataset versions, as the caller
        sees them: another tenant's version is NOT_FOUND). Returns the spec and the dataset's row count. A registry
        dataset with a manifest is checked against the architecture here, before anything is queued or billed."""
        if spec.base:
            base = self.registry.version(caller.api_key, spec.base.model, spec.base.number, spec.base.alias)
            if base.format != "safetensors" or not base.architecture.get("family"):
                raise InvalidArgument(f"base version {base.model} v{base.number} is {base.format}; fine-tuning "
                                      "needs a safetensors version with an architecture")
            family = base.architecture["family"]
            if spec.family and spec.family != family:
                raise InvalidArgument(f"spec.family {spec.family!r} differs from the base version's {family!r}")
            arch = {k: v for k, v in base.architecture.items() if k != "family"}
            arch.update({k: v for k, v in spec.architecture.items() if k == "num_classes"})
            spec = replace(spec, family=family, architecture=arch, base=BaseRef(base.model, base.number))
        data = None
        if spec.dataset_version:
            ref = spec.dataset_version
            data = self.registry.version(caller.api_key, ref.model, ref.number, ref.alias)
            if data.format != "dataset-npz":
                raise InvalidArgument(f"dataset {data.model} v{data.number} is {data.format}, not dataset-npz")
            spec = replace(spec, dataset_version=BaseRef(data.model, data.number))
        spec = specs.validate(spec, max_world_size=self.max_world_size, device_classes=self.catalog.device_classes)
        if data is None:
            return spec, BUILTIN_SHAPES[spec.dataset].rows
        return spec, dataset_rows(spec, data)

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
