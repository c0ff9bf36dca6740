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


def call_metadata(api_key: str | None, on_behalf_of: str | None = None) -> tuple[tuple[str, str], ...]:
    """``authorization`` for ``api_key``; with the admin key, ``on_behalf_of`` names the tenant it acts for."""
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    return metadata + ((("x-margin-tenant", on_behalf_of),) if on_behalf_of else ())


def connect(address: str, api_key: str | None, on_behalf_of: str | None = None) -> Connection:
    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    return Connection(channel, call_metadata(api_key, on_behalf_of))
