"""Channels with the caller's API key attached to every call."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from margin.common.server import MAX_MESSAGE_BYTES


@dataclass
class Connection:
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]

    def close(self) -> None:
        self.channel.close()


def connect(address: str, api_key: str | None) -> Connection:
    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    return Connection(channel, metadata)
