"""The fuzz campaign: every RPC of every margin.v1 service and of the other contracts Margin serves (the Open
Inference Protocol's ``inference.GRPCInferenceService`` on the gateway) — enumerated from the generated descriptors,
so a new RPC is covered without changes here — called with random valid-typed messages and with garbage bytes, as
the tenant ``acme``, as the admin and with no key, each call under a deadline; the status codes are tallied per service.

A call *fails the campaign* when it answers INTERNAL or UNKNOWN (Margin's own code broke, or grpc could not decode
the request) or, for a unary response, runs past its deadline (a hang). A streaming response may run past its
deadline: watchers stream until the job ends.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import margin.v1
from google.protobuf import descriptor as pb_descriptor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fuzz.strategies import MessageStrategies

UNARY_DEADLINE_S = 60.0   # generous: the machine is shared; a call this slow is a hang
STREAM_DEADLINE_S = 3.0   # watchers stream until their job ends: they are cut here
FAILING = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
KEYS = ("tenant", "admin", "none")


def examples_per_rpc(default: int) -> int:
    """``MARGIN_FUZZ_EXAMPLES`` (``make fuzz`` raises it), else ``default``."""
    return int(os.environ.get("MARGIN_FUZZ_EXAMPLES") or default)


@dataclass(frozen=True)
class Rpc:
    service: str                     # e.g. margin.v1.Budgets
    name: str                        # e.g. RecordSpend
    input: pb_descriptor.Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    def __str__(self) -> str:
        return f"{self.service.removeprefix('margin.v1.')}.{self.name}"


# Contracts Margin serves that are not its own: the Open Inference Protocol (KServe v2 gRPC) on the gateway.
OTHER_CONTRACTS = ("tritonclient.grpc.service_pb2",)


def rpcs() -> list[Rpc]:
    """Every method of every service in the generated margin.v1 modules and in :data:`OTHER_CONTRACTS`."""
    found = []
    modules = [f"margin.v1.{m.name}" for m in pkgutil.iter_modules(margin.v1.__path__) if m.name.endswith("_pb2")]
    for module in sorted(modules) + list(OTHER_CONTRACTS):
        descriptor = importlib.import_module(module).DESCRIPTOR
        for service in descriptor.services_by_name.values():
            found += [Rpc(service.full_name, m.name, m.input_type, m.client_streaming, m.server_streaming)
                      for m in service.methods]
    return sorted(found, key=str)


@dataclass(frozen=True)
class Case:
    key: str               # which credential: tenant, admin, none
    messages: tuple[bytes, ...]
    garbage: bool
    shown: str             # what was sent, for a report

    def __repr__(self) -> str:
        return f"Case(key={self.key}, {'garbage' if self.garbage else 'message'}: {self.shown[:600]})"


def cases(rpc: Rpc, messages: MessageStrategies) -> st.SearchStrategy[Case]:
    count = st.integers(1, 3) if rpc.client_streaming else st.just(1)
    valid = count.flatmap(lambda n: st.lists(messages.of(rpc.input), min_size=n, max_size=n)).map(
        lambda msgs: (tuple(m.SerializeToString() for m in msgs), False, " | ".join(str(m) for m in msgs)))
    junk = count.flatmap(lambda n: st.lists(st.binary(min_size=1, max_size=96), min_size=n, max_size=n)).map(
        lambda blobs: (tuple(blobs), True, " | ".join(b.hex() for b in blobs)))
    keys = st.sampled_from(("tenant",) * 4 + ("admin",) * 2 + ("none",))
    return st.builds(lambda key, sent: Case(key, *sent), keys, st.one_of(valid, valid, junk))


@dataclass
class Tally:
    """Status codes per service and method, and the calls that failed the campaign."""
    codes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[str] = field(default_factory=list)

    def add(self, rpc: Rpc, case: Case, code: grpc.StatusCode, details: str) -> None:
        self.codes[rpc.service.removeprefix("margin.v1.")][code.name] += 1
        hang = code == grpc.StatusCode.DEADLINE_EXCEEDED and not rpc.server_streaming
        if code in FAILING or hang:
            self.failures.append(f"{rpc}: {code.name} {details!r} for {case!r}")

    def total(self, service: str | None = None) -> int:
        return sum(sum(c.values()) for s, c in self.codes.items() if service in (None, s))


class Caller:
    """Sends a :class:`Case` to an RPC over a channel per server, with identity serializers (bytes as they are)."""

    def __init__(self, addresses: dict[str, str], credentials: dict[str, str | None]):
        self._channels = {service: grpc.insecure_channel(address) for service, address in addresses.items()}
        self._metadata = {k: ((("authorization", f"Bearer {v}"),) if v else ()) for k, v in credentials.items()}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def call(self, rpc: Rpc, case: Case) -> tuple[grpc.StatusCode, str]:
        code, details, _ = self.call_collecting(rpc, case.key, case.messages)
        return code, details

    def call_collecting(self, rpc: Rpc, key: str, messages: tuple[bytes, ...]) \
            -> tuple[grpc.StatusCode, str, list[bytes]]:
        """The call's status, details and the serialized responses it got (a stream's, before it ended)."""
        channel = self._channels[rpc.service]
        kind = ("stream" if rpc.client_streaming else "unary") + "_" + ("stream" if rpc.server_streaming else "unary")
        method = getattr(channel, kind)(rpc.path)  # no serializers: the messages go as the bytes given
        request = iter(messages) if rpc.client_streaming else messages[0]
        timeout = STREAM_DEADLINE_S if rpc.server_streaming else UNARY_DEADLINE_S
        replies: list[bytes] = []
        try:
            response = method(request, timeout=timeout, metadata=self._metadata[key])
            if rpc.server_streaming:
                replies.extend(response)
            else:
                replies.append(response)
        except grpc.RpcError as err:
            return err.code(), err.details() or "", replies
        return grpc.StatusCode.OK, "", replies


def fuzz_rpc(caller: Caller, rpc: Rpc, messages: MessageStrategies, examples: int, tally: Tally) -> None:
    """``examples`` seeded random cases (the same ones every run) against ``rpc``, tallied; nothing is raised here,
    so a campaign sees every failure."""

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases(rpc, messages))
    def run(case: Case) -> None:
        tally.add(rpc, case, *caller.call(rpc, case))

    run()


def fuzz_mixed(caller: Caller, selected: list[Rpc], messages: MessageStrategies, examples: int, tally: Tally) -> None:
    """``examples`` seeded random calls, each to a random RPC of ``selected``: state one RPC leaves (a ledger entry,
    a budget, a deployment) meets the others in every order, not only in the order of :func:`campaign`."""

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(call=st.sampled_from(selected).flatmap(lambda rpc: cases(rpc, messages).map(lambda case: (rpc, case))))
    def run(call: tuple[Rpc, Case]) -> None:
        rpc, case = call
        tally.add(rpc, case, *caller.call(rpc, case))

    run()


def campaign(caller: Caller, messages: MessageStrategies, examples: int, selected: list[Rpc] | None = None) \
        -> Iterator[tuple[str, Tally]]:
    """Fuzz each RPC in turn, then all of them mixed (as many calls as two RPCs get), yielding each part's tally."""
    selected = selected or rpcs()
    for rpc in selected:
        tally = Tally()
        fuzz_rpc(caller, rpc, messages, examples, tally)
        yield str(rpc), tally
    tally = Tally()
    fuzz_mixed(caller, selected, messages, 2 * examples, tally)
    yield "every RPC, mixed", tally
