"""The Python SDK: thin helpers over the generated stubs, used by the CLI, the demo, tests and benchmarks."""
from margin.sdk.channel import Connection, connect
from margin.sdk.registry import RegistryClient

__all__ = ["Connection", "RegistryClient", "connect"]
