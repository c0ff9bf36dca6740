"""What every ``margin`` command group shares: the console, common options, error printing, version refs."""
from __future__ import annotations

import json
import re
import sys
from functools import wraps
from pathlib import Path

import grpc
import typer
from rich.console import Console

from margin.common.errors import MarginError
from margin.sdk.registry import DownloadError
from margin.v1 import common_pb2

console = Console(width=None if sys.stdout.isatty() else 150)

RegistryOpt = typer.Option(None, "--registry", help="registry address (default: the local cluster's)")
KeyOpt = typer.Option(None, "--api-key", help="API key (default: $MARGIN_API_KEY, else the demo key)")
_REF = re.compile(r"^(?P<model>[^:@]+)(?::(?P<number>\d+)|@(?P<alias>.+))?$")


def grpc_errors(fn):
    """Print an error (from a service, or local: bad file, unwritable path) as one readable line and exit 1."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as err:
            console.print(f"[red]{err.code().name}[/]: {err.details()}")
        except MarginError as err:
            console.print(f"[red]{err.code_name}[/]: {err}")
        except (OSError, ValueError, DownloadError) as err:  # bad local files, unsupported arrays
            console.print(f"[red]error[/]: {err}")
        raise typer.Exit(1)
    return wrapper



def parse_ref(text: str) -> common_pb2.VersionRef:
    """``model``, ``model:3`` or ``model@production``."""
    match = _REF.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r}: use MODEL, MODEL:NUMBER or MODEL@ALIAS")
    return common_pb2.VersionRef(model=match["model"], number=int(match["number"] or 0), alias=match["alias"] or "")


def load_json(text: str, option: str) -> object:
    """JSON given inline, or read from a file named as ``@FILE``; a usage error naming the option otherwise."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as err:
            raise typer.BadParameter(f"cannot read {text[1:]!r}: {err.strerror or err}", param_hint=option) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"not JSON: {err}", param_hint=option) from None
