"""A job's state (:data:`margin.common.jobs.STATES`) <-> margin.v1's ``JobState``: shared by every job service's
conversions (training, compression), so that neither reaches into the other's. Kept apart from
:mod:`margin.common.protoconv`, which SDK clients import, because :mod:`margin.common.jobs` brings SQLAlchemy."""
from __future__ import annotations

from margin.common.jobs import STATES
from margin.v1 import common_pb2

STATE_TO_PROTO = {name: common_pb2.JobState.Value(f"JOB_STATE_{name}") for name in STATES}
STATE_FROM_PROTO = {v: k for k, v in STATE_TO_PROTO.items()}
