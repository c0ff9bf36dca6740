"""The pipe between a worker and the sandbox that runs a tenant's model package: one JSON object per line.

The sandbox side is untrusted (the tenant's code shares its process and can write to the pipe), so the worker reads
with a line-length cap and a deadline, and treats anything that is not a JSON object as the sandbox misbehaving:
:class:`ProtocolError`. Nothing read here is ever unpickled or executed; files are exchanged through the sandbox's
directories, by name (:mod:`margin.worker.package_job`).
"""
from __future__ import annotations

import json
import os
import select
import time

MAX_LINE = 1 << 20


class ProtocolError(RuntimeError):
    """The other side sent something that is not a message, or too much of it."""


class Channel:
    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd
        self._buffer = b""
        self.closed = False

    def send(self, message: dict) -> None:
        data = json.dumps(message, allow_nan=False).encode() + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def receive(self, timeout: float | None = None) -> dict | None:
        """The next message; None when ``timeout`` seconds pass first or the other side closed the pipe
        (then :attr:`closed` is True)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError(f"a message longer than {MAX_LINE} bytes")
            if self.closed:
                return None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.read_fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                self.closed = True
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ProtocolError(f"not a JSON message: {line[:80]!r}") from None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise ProtocolError(f"not a message object: {line[:80]!r}")
        return message

    def request(self, message: dict) -> dict:
        """Send ``message`` and wait for the reply (the sandbox side: the worker always answers)."""
        self.send(message)
        reply = self.receive()
        if reply is None:
            raise ProtocolError("the worker closed the pipe")
        return reply

    def close(self) -> None:
        for fd in {self.read_fd, self.write_fd}:
            try:
                os.close(fd)
            except OSError:
                pass
