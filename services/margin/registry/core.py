"""The registry core: models, versions, aliases, lineage. No gRPC here; errors are domain errors."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from margin.common import config, modelpackage
from margin.common.errors import AlreadyExists, InvalidArgument, NotFound
from margin.common.names import validate_alias, validate_labels, validate_name
from margin.common.paging import decode_token, encode_token, page_size
from margin.common.tenancy import as_utc
from margin.common.tensors import Signature
from margin.registry.artifacts import LocalArtifactStore, PendingUpload
from margin.registry.domain import (
    FORMATS,
    CostRecord,
    ModelRecord,
    UploadRequest,
    VersionRecord,
    VersionSelector,
)
from margin.registry.formats import describe_upload
from margin.registry.tables import AliasRow, LabelRow, ModelRow, VersionRow

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_CHAIN = 1000


@dataclass(frozen=True)
class RegistryLimits:
    max_upload_bytes: int = 4 << 30
    max_description: int = 1000
    max_package_bytes: int = field(default_factory=config.MAX_PACKAGE_BYTES.get_int)

    def max_bytes(self, fmt: str) -> int:
        """The largest upload of format ``fmt``: a model package (code) has its own, far smaller, cap."""
        if fmt == modelpackage.FORMAT:
            return min(self.max_package_bytes, self.max_upload_bytes)
        return self.max_upload_bytes

    def describe_max_bytes(self, fmt: str) -> str:
        """:meth:`max_bytes` for a refusal, naming the package cap's setting when that is the one."""
        cap = " (a model package's cap, MARGIN_MAX_PACKAGE_BYTES)" if fmt == modelpackage.FORMAT else ""
        return f"{self.max_bytes(fmt)} bytes{cap}"


class RegistryCore:
    def __init__(self, sessions: sessionmaker, store: LocalArtifactStore, limits: RegistryLimits | None = None):
        self._sessions = sessions
        self.store = store
        self.limits = limits or RegistryLimits()

    def recover(self, orphan_grace_seconds: float = 600.0) -> None:
        """At start: remove partial uploads of dead processes and artifacts no version refers to."""
        self.store.recover_dead_uploads()
        with self._sessions() as s:
            keys = s.scalars(select(VersionRow.artifact_key)).all()
        self.store.collect_garbage(keys, orphan_grace_seconds)

    # -- models ---------------------------------------------------------------------------------
    def create_model(self, tenant_id: int, name: str, description: str = "",
                     labels: dict[str, str] | None = None) -> ModelRecord:
        validate_name(name, "model name")
        labels = validate_labels(labels or {})
        self._check_description(description)
        with self._sessions.begin() as s:
            row = ModelRow(tenant_id=tenant_id, name=name, description=description)
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                raise AlreadyExists(f"model {name!r} already exists") from None
            s.add_all(LabelRow(model_id=row.id, key=k, value=v) for k, v in labels.items())
            s.flush()
            return self._model_record(s, row)

    def get_model(self, tenant_id: int, name: str) -> ModelRecord:
        with self._sessions() as s:
            return self._model_record(s, self._model_row(s, tenant_id, name))

    def list_models(self, tenant_id: int, size: int = 0, token: str = "",
                    label_selector: dict[str, str] | None = None) -> tuple[list[ModelRecord], str]:
        limit, after = page_size(size), decode_token(token)
        query = select(ModelRow).where(ModelRow.tenant_id == tenant_id, ModelRow.id > after)
        for key, value in (label_selector or {}).items():
            query = query.where(ModelRow.id.in_(
                select(LabelRow.model_id).where(LabelRow.key == key, LabelRow.value == value)))
        with self._sessions() as s:
            rows = s.scalars(query.order_by(ModelRow.id).limit(limit + 1)).all()
            records = [self._model_record(s, r) for r in rows[:limit]]
            return records, (encode_token(rows[limit - 1].id) if len(rows) > limit else "")

    # -- uploads --------------------------------------------------------------------------------
    def begin_upload(self, tenant_id: int, request: UploadRequest) -> Upload:
        """Validate the metadata and open a pending upload; nothing is visible until ``commit``."""
        if request.format not in FORMATS:
            raise InvalidArgument(f"format {request.format!r} is not one of {list(FORMATS)}")
        if not _SHA256.fullmatch(request.sha256 or ""):
            raise InvalidArgument("sha256 must be the artifact's 64-character lowercase hex digest")
        if request.size_bytes < 0:
            raise InvalidArgument("size_bytes must be >= 0")
        if request.size_bytes > self.limits.max_bytes(request.format):
            raise InvalidArgument(f"declared size {request.size_bytes} bytes exceeds the upload limit of "
                                  f"{self.limits.describe_max_bytes(request.format)}")
        if request.format == "safetensors" and not request.architecture:
            raise InvalidArgument("a safetensors version needs an architecture spec")
        for key, value in request.metrics.items():
            validate_name(key, "metric name")
            if not math.isfinite(value):
                raise InvalidArgument(f"metric {key!r} is not a finite number")
        self._check_description(request.description)
        with self._sessions() as s:
            model = self._model_row(s, tenant_id, request.model)
            parent_id = self._version_row(s, tenant_id, request.parent).id if request.parent else None
        return Upload(self, model.id, model.tenant_id, parent_id, request, self.store.start_upload())

    def _existing_for_key(self, upload: Upload) -> VersionRecord | None:
        """The version an earlier upload with the same idempotency key made in this model, if any."""
        key = upload.request.idempotency_key
        if not key:
            return None
        with self._sessions() as s:
            row = s.scalar(select(VersionRow).where(VersionRow.model_id == upload.model_id,
                                                    VersionRow.idempotency_key == key))
            return self._version_record(s, row) if row is not None else None

    def _commit_upload(self, upload: Upload) -> VersionRecord:
        existing = self._existing_for_key(upload)
        if existing is not None:
            upload.pending.discard()
            log.info("upload with idempotency key %r returns %s v%d", upload.request.idempotency_key,
                     existing.model, existing.number)
            return existing
        key = f"t{upload.tenant_id}/m{upload.model_id}/{uuid.uuid4().hex}.bin"
        self.store.publish(upload.pending, key)
        req = upload.request
        try:
            with self._sessions.begin() as s:
                # One statement takes the row/write lock, so concurrent uploads get distinct numbers.
                s.execute(update(ModelRow).where(ModelRow.id == upload.model_id)
                          .values(latest_version=ModelRow.latest_version + 1))
                number = s.scalar(select(ModelRow.latest_version).where(ModelRow.id == upload.model_id))
                row = VersionRow(
                    model_id=upload.model_id, number=number, format=req.format, sha256=req.sha256,
                    size_bytes=upload.pending.size, artifact_key=key, signature=req.signature.to_dict(),
                    architecture=req.architecture, parent_id=upload.parent_id, recipe=req.recipe,
                    metrics=dict(req.metrics), cost=dataclasses.asdict(req.cost) if req.cost else None,
                    description=req.description, idempotency_key=req.idempotency_key or None)
                s.add(row)
                s.flush()
                record = self._version_record(s, row)
        except IntegrityError:
            self.store.delete(key)
            existing = self._existing_for_key(upload)  # a concurrent upload with the same key won
            if existing is None:
                raise
            return existing
        except BaseException:
            self.store.delete(key)
            raise
        log.info("registered %s v%d (%s, %d bytes)", req.model, number, req.format, upload.pending.size)
        return record

    # -- versions -------------------------------------------------------------------------------
    def get_version(self, tenant_id: int, selector: VersionSelector) -> VersionRecord:
        with self._sessions() as s:
            return self._version_record(s, self._version_row(s, tenant_id, selector))

    def list_versions(self, tenant_id: int, model: str, size: int = 0,
                      token: str = "") -> tuple[list[VersionRecord], str]:
        limit, after = page_size(size), decode_token(token)
        with self._sessions() as s:
            m = self._model_row(s, tenant_id, model)
            rows = s.scalars(select(VersionRow).where(VersionRow.model_id == m.id, VersionRow.id > after)
                             .order_by(VersionRow.id).limit(limit + 1)).all()
            records = [self._version_record(s, r) for r in rows[:limit]]
            return records, (encode_token(rows[limit - 1].id) if len(rows) > limit else "")

    def open_version(self, tenant_id: int, selector: VersionSelector,
                     chunk_size: int) -> tuple[VersionRecord, Iterator[bytes]]:
        with self._sessions() as s:
            row = self._version_row(s, tenant_id, selector)
            record, key = self._version_record(s, row), row.artifact_key
        return record, self.store.read_chunks(key, chunk_size)

    def artifact_path(self, tenant_id: int, selector: VersionSelector):
        with self._sessions() as s:
            return self.store.path(self._version_row(s, tenant_id, selector).artifact_key)

    def attach_metrics(self, tenant_id: int, selector: VersionSelector,
                       metrics: dict[str, float]) -> VersionRecord:
        if not metrics:
            raise InvalidArgument("no metrics given")
        for key, value in metrics.items():
            validate_name(key, "metric name")
            if not math.isfinite(value):
                raise InvalidArgument(f"metric {key!r} is not a finite number")
        with self._sessions.begin() as s:
            row = self._version_row(s, tenant_id, selector, for_update=True)
            row.metrics = {**(row.metrics or {}), **metrics}
            s.flush()
            return self._version_record(s, row)

    # -- aliases --------------------------------------------------------------------------------
    def set_alias(self, tenant_id: int, model: str, alias: str, number: int) -> tuple[str, str, int]:
        validate_alias(alias)
        if number <= 0:
            raise InvalidArgument("number must be a version number (>= 1)")
        with self._sessions.begin() as s:
            version = self._version_row(s, tenant_id, VersionSelector(model, number=number))
            existing = s.get(AliasRow, (version.model_id, alias))
            if existing:
                existing.version_id = version.id
            else:
                s.add(AliasRow(model_id=version.model_id, alias=alias, version_id=version.id))
        return model, alias, number

    def delete_alias(self, tenant_id: int, model: str, alias: str) -> None:
        with self._sessions.begin() as s:
            m = self._model_row(s, tenant_id, model)
            row = s.get(AliasRow, (m.id, alias))
            if row is None:
                raise NotFound(f"model {model!r} has no alias {alias!r}")
            s.delete(row)

    # -- lineage --------------------------------------------------------------------------------
    def lineage(self, tenant_id: int, selector: VersionSelector) -> tuple[list[VersionRecord], int]:
        """The chain from the version back to its root, and the sum of their costs in micros."""
        chain: list[VersionRecord] = []
        with self._sessions() as s:
            row = self._version_row(s, tenant_id, selector)
            while row is not None and len(chain) < MAX_CHAIN:
                chain.append(self._version_record(s, row))
                row = s.get(VersionRow, row.parent_id) if row.parent_id else None
        return chain, sum(v.cost.total_micros for v in chain if v.cost)

    # -- helpers --------------------------------------------------------------------------------
    def _check_description(self, text: str) -> None:
        if len(text) > self.limits.max_description:
            raise InvalidArgument(f"description is longer than {self.limits.max_description} characters")

    @staticmethod
    def _model_row(s: Session, tenant_id: int, name: str) -> ModelRow:
        validate_name(name, "model name")
        row = s.scalar(select(ModelRow).where(ModelRow.tenant_id == tenant_id, ModelRow.name == name))
        if row is None:
            raise NotFound(f"model {name!r} not found")
        return row

    def _version_row(self, s: Session, tenant_id: int, sel: VersionSelector, for_update: bool = False) -> VersionRow:
        model = self._model_row(s, tenant_id, sel.model)
        query = select(VersionRow).where(VersionRow.model_id == model.id)
        if sel.number < 0:
            raise InvalidArgument("version number must be >= 1")
        if sel.number:
            query = query.where(VersionRow.number == sel.number)
        elif sel.alias:
            validate_alias(sel.alias)
            alias = s.get(AliasRow, (model.id, sel.alias))
            if alias is None:
                raise NotFound(f"model {sel.model!r} has no alias {sel.alias!r}")
            query = query.where(VersionRow.id == alias.version_id)
        else:
            query = query.order_by(VersionRow.number.desc()).limit(1)
        if for_update:
            query = query.with_for_update()
        row = s.scalar(query)
        if row is None:
            raise NotFound(f"{sel.describe()} not found" if sel.number else f"model {sel.model!r} has no versions")
        return row

    @staticmethod
    def _model_record(s: Session, row: ModelRow) -> ModelRecord:
        labels = {lr.key: lr.value for lr in s.scalars(select(LabelRow).where(LabelRow.model_id == row.id))}
        aliases = dict(s.execute(select(AliasRow.alias, VersionRow.number)
                                 .join(VersionRow, VersionRow.id == AliasRow.version_id)
                                 .where(AliasRow.model_id == row.id)).all())
        return ModelRecord(row.name, row.description, labels, as_utc(row.created_at), row.latest_version, aliases)

    @staticmethod
    def _version_record(s: Session, row: VersionRow) -> VersionRecord:
        model_name = s.scalar(select(ModelRow.name).where(ModelRow.id == row.model_id))
        parent = None
        if row.parent_id:
            p_number, p_model = s.execute(select(VersionRow.number, ModelRow.name)
                                          .join(ModelRow, ModelRow.id == VersionRow.model_id)
                                          .where(VersionRow.id == row.parent_id)).one()
            parent = VersionSelector(p_model, number=p_number)
        aliases = tuple(sorted(s.scalars(select(AliasRow.alias).where(AliasRow.version_id == row.id))))
        return VersionRecord(
            model=model_name, number=row.number, format=row.format, sha256=row.sha256, size_bytes=row.size_bytes,
            signature=Signature.from_dict(row.signature), architecture=row.architecture or {}, parent=parent,
            recipe=row.recipe or {}, metrics=dict(row.metrics or {}),
            cost=CostRecord(**row.cost) if row.cost else None, created_at=as_utc(row.created_at),
            aliases=aliases, description=row.description)


class Upload:
    """A pending version: ``write`` chunks, then ``commit``; leaving the ``with`` block without
    committing (an error, a cancelled stream) discards every byte."""

    def __init__(self, core: RegistryCore, model_id: int, tenant_id: int, parent_id: int | None,
                 request: UploadRequest, pending: PendingUpload):
        self._core = core
        self.model_id, self.tenant_id, self.parent_id = model_id, tenant_id, parent_id
        self.request = request
        self.pending = pending
        self._done = False

    def write(self, chunk: bytes) -> None:
        limits, fmt = self._core.limits, self.request.format
        if self.pending.size + len(chunk) > limits.max_bytes(fmt):
            raise InvalidArgument(f"upload exceeds the limit of {limits.describe_max_bytes(fmt)}")
        declared = self.request.size_bytes
        if declared and self.pending.size + len(chunk) > declared:
            raise InvalidArgument(f"upload is longer than the declared size_bytes={declared}")
        self.pending.write(chunk)

    def commit(self) -> VersionRecord:
        if self.pending.size == 0:
            raise InvalidArgument("empty upload: send the artifact's bytes in chunk messages after the metadata")
        if self.request.size_bytes and self.pending.size != self.request.size_bytes:
            raise InvalidArgument(f"received {self.pending.size} bytes but size_bytes declared "
                                  f"{self.request.size_bytes}")
        if self.pending.sha256 != self.request.sha256:
            raise InvalidArgument(f"sha256 mismatch: declared {self.request.sha256}, received bytes hash to "
                                  f"{self.pending.sha256}; nothing was stored")
        self.pending.close()
        described = describe_upload(self.pending.path, self.request.format, self.request.signature,
                                    self.request.architecture, self._core.limits.max_package_bytes)
        # e.g. an ONNX graph's signature when undeclared, a model package's architecture from its code
        self.request = dataclasses.replace(self.request, **described._asdict())
        record = self._core._commit_upload(self)
        self._done = True
        return record

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.pending.discard()
