"""A dataset's manifest, and whether a model (or a training architecture) can use the dataset, from it alone.

A ``dataset-npz`` version's signature is its manifest (:func:`margin.registry.npz_format.read_manifest`): its
``inputs`` are the arrays of the .npz in file order, less the labels ``y``, which are its one ``output`` when
present. Each spec's shape is the array's full shape, rows first, so the checks here compare only the trailing
dimensions. Services check a dataset this way at submit, before anything is queued or billed, instead of finding
out in a worker; a version uploaded before the registry read manifests has an empty one, and is refused with a
request to upload it again (:func:`check_inputs`) or left to the worker's checks (training).

Pure functions over :class:`~margin.common.tensors.Signature`: no gRPC, no files.
"""
from __future__ import annotations

from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature, TensorSpec

LABELS = "y"
FEATURES = "x"
INTEGER_DTYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8"})
NUMERIC_DTYPES = INTEGER_DTYPES | {"FP16", "BF16", "FP32", "FP64"}


def arrays(manifest: Signature) -> tuple[TensorSpec, ...]:
    """Every array of the dataset: its inputs, then its labels."""
    return (*manifest.inputs, *manifest.outputs)


def rows(manifest: Signature) -> int:
    """The dataset's row count (every array has the same first dimension); 0 for an empty manifest."""
    specs = arrays(manifest)
    return specs[0].shape[0] if specs else 0


def has_labels(manifest: Signature) -> bool:
    return any(s.name == LABELS for s in manifest.outputs)


def label_problem(spec: TensorSpec) -> str | None:
    """Why ``spec`` cannot be a dataset's labels (they must be 1-D integers, one per row), or None."""
    if len(spec.shape) != 1 or spec.dtype not in INTEGER_DTYPES:
        return f"labels `{LABELS}` must be 1-D integers, one per row; found {spec.describe()}"
    return None


def check_labels(manifest: Signature, *, what: str) -> None:
    """Raise InvalidArgument unless ``what`` (the dataset, as messages name it) has 1-D integer labels ``y``."""
    labels = next((s for s in manifest.outputs if s.name == LABELS), None)
    if labels is None:
        raise InvalidArgument(f"{what} has no labels `{LABELS}`; its arrays: {_listing(manifest)}")
    problem = label_problem(labels)
    if problem:
        raise InvalidArgument(f"{what}: {problem}")


def check_inputs(manifest: Signature, model: Signature, *, what: str) -> None:
    """Raise InvalidArgument unless every input of ``model`` is an array of the dataset ``what`` with the same
    dtype and the same shape after the rows (a model dimension of -1 matches any size)."""
    _require_manifest(manifest, what)
    for spec in model.inputs:
        found = _array(manifest, spec.name, what, f"the model's input {spec.name!r}")
        if found.dtype != spec.dtype or not _trailing_matches(spec.shape[1:], found.shape[1:]):
            raise InvalidArgument(f"{what}: array {spec.name!r} does not fit the model's input: expected "
                                  f"{spec.dtype}{list(spec.shape[1:])} per row (-1: any size), found "
                                  f"{found.dtype}{list(found.shape[1:])} per row")


def check_features(manifest: Signature, features: int, *, what: str) -> None:
    """Raise InvalidArgument unless the dataset ``what`` has numeric features ``x`` of shape (rows, ``features``),
    what a training architecture taking ``features`` inputs needs (the worker casts them to fp32)."""
    _require_manifest(manifest, what)
    x = _array(manifest, FEATURES, what, "the features")
    if len(x.shape) != 2 or x.dtype not in NUMERIC_DTYPES:
        raise InvalidArgument(f"{what}: features `{FEATURES}` must be a numeric (rows, features) array; found "
                              f"{x.describe()}")
    if x.shape[1] != features:
        raise InvalidArgument(f"{what}: `{FEATURES}` has {x.shape[1]} features but the architecture expects "
                              f"{features}")


def check_package_data(manifest: Signature, *, needs_labels: bool, what: str) -> None:
    """Raise InvalidArgument unless the dataset ``what`` can feed a model package: inputs (every array but ``y``,
    given to the model positionally in file order; the registry admits only numeric and boolean arrays) and, when
    the package brings no ``loss`` of its own (the default is cross-entropy), integer labels ``y``."""
    _require_manifest(manifest, what)
    if not manifest.inputs:
        raise InvalidArgument(f"{what} has no input arrays (every array but `{LABELS}` is an input)")
    if needs_labels:
        check_labels(manifest, what=f"{what} (the package defines no loss(outputs, batch), so it is trained with "
                                    f"cross-entropy against integer labels `{LABELS}`)")


def _require_manifest(manifest: Signature, what: str) -> None:
    if manifest.empty:
        raise InvalidArgument(f"{what} has no manifest (it was uploaded before the registry read datasets' "
                              "arrays); upload the dataset again")


def _array(manifest: Signature, name: str, what: str, role: str) -> TensorSpec:
    found = next((s for s in arrays(manifest) if s.name == name), None)
    if found is None:
        raise InvalidArgument(f"{what} has no array {name!r} ({role}); its arrays: {_listing(manifest)}")
    return found


def _trailing_matches(expected: tuple[int, ...], found: tuple[int, ...]) -> bool:
    return len(expected) == len(found) and all(e in (-1, f) for e, f in zip(expected, found, strict=True))


def _listing(manifest: Signature) -> str:
    return ", ".join(s.describe() for s in arrays(manifest)) or "none"
