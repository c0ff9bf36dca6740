"""Live job progress on Redis streams: workers append, watchers follow.

One stream per job (``margin:jobs:<id>:events``), capped in length and expiring a day after the job ends.
SQL stays the source of truth; the stream is how a watcher hears about a step within milliseconds.
A watcher reads the stream's last id *before* it reads the job from SQL, then follows from that id, so
no event published after its snapshot is missed (at worst one is seen twice).
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import redis

MAX_EVENTS = 2000
EXPIRE_AFTER_END_S = 86_400


def stream_key(job_id: str) -> str:
    return f"margin:jobs:{job_id}:events"


class JobEvents:
    def __init__(self, client: redis.Redis):
        self._redis = client

    @classmethod
    def from_url(cls, url: str) -> JobEvents:
        return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5))

    def publish(self, job_id: str, event: dict, terminal: bool = False) -> None:
        key = stream_key(job_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(key, {"e": json.dumps(event, separators=(",", ":"))}, maxlen=MAX_EVENTS, approximate=True)
        pipe.expire(key, EXPIRE_AFTER_END_S if terminal else 7 * EXPIRE_AFTER_END_S)
        pipe.execute()

    def last_id(self, job_id: str) -> str:
        """The id of the newest event ("0-0" when there is none yet): follow from here after a snapshot."""
        newest = self._redis.xrevrange(stream_key(job_id), count=1)
        return newest[0][0].decode() if newest else "0-0"

    def follow(self, job_id: str, after: str, block_ms: int = 1000) -> Iterator[tuple[str, dict]]:
        """Events after ``after``, waiting up to ``block_ms`` for the first; empty when none arrived."""
        reply = self._redis.xread({stream_key(job_id): after}, block=block_ms, count=100)
        for _, entries in reply or ():
            for event_id, fields in entries:
                yield event_id.decode(), json.loads(fields[b"e"])

    def close(self) -> None:
        self._redis.close()
