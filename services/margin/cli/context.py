"""Where the CLI finds services and keys: flags, then environment, then the local cluster's state."""
from __future__ import annotations

import os

import typer

from margin.cluster import state
from margin.sdk import Connection, connect


def service_address(name: str, explicit: str | None = None) -> str:
    env = os.environ.get(f"MARGIN_{name.upper()}_ADDR")
    if explicit or env:
        return explicit or env
    services = state.read_state().get("services", {})
    if name not in services:
        raise typer.BadParameter(
            f"no address for the {name} service: run `margin up`, or set MARGIN_{name.upper()}_ADDR")
    return services[name]["address"]


def api_key(explicit: str | None = None) -> str:
    key = explicit or os.environ.get("MARGIN_API_KEY")
    if key:
        return key
    path = state.demo_key_path()
    if path.exists():
        return path.read_text().strip()
    raise typer.BadParameter("no API key: pass --api-key, set MARGIN_API_KEY, or run `margin up` for the demo key")


def connection(service: str, address: str | None = None, key: str | None = None) -> Connection:
    return connect(service_address(service, address), api_key(key))


def admin_connection(address: str | None = None, key: str | None = None) -> Connection:
    """The budget service with the operator's key: ``key`` when given, else $MARGIN_ADMIN_KEY, else the local
    cluster's."""
    return connect(service_address("budget", address), key or state.admin_key())
