"""The local cluster's state file ($MARGIN_HOME/state.json): addresses, pids, keys' locations."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from margin.common import config


def home() -> Path:
    path = config.margin_home()
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_path() -> Path:
    return home() / "state.json"


def read_state() -> dict:
    try:
        return json.loads(state_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_state(state: dict) -> None:
    tmp = state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_path())


def write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def admin_key() -> str:
    """The local cluster's admin key: $MARGIN_ADMIN_KEY, else $MARGIN_HOME/admin.key (made on first use)."""
    if config.ADMIN_KEY.raw():
        return config.admin_key()
    path = home() / "admin.key"
    if not path.exists():
        write_secret(path, "mka_" + secrets.token_urlsafe(32))
    return path.read_text().strip()


def demo_key_path() -> Path:
    return home() / "demo.key"


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
