"""A Triton pool as a set of replicas: requests spread over the ready ones, models loaded on every one.

A Kubernetes Service in front of several Triton pods does not spread gRPC: the gateway's one HTTP/2 connection
lands on one pod, which then takes every request and every model load while the autoscaler pays for the others.
So a pool's address may name its replicas:

``host:port``
    one Triton (what a single local Triton, or a pool of one replica, uses); gRPC resolves the name itself.
``dns:///host:port``
    every address ``host`` resolves to, each on ``port``: a headless Service has one record per *ready* pod.
    The name is resolved again at most every ``refresh_s`` seconds (and whenever no replica answers), so replicas
    the autoscaler adds are found and those it removes are dropped.
``ipv4:a:p[,b:q...]`` / ``ipv6:[a]:p[,...]``
    a fixed list (gRPC's own syntax for it).

:class:`TritonReplicas` keeps one :class:`~margin.inference.triton_client.TritonClient` per replica. Inference goes
round-robin over the replicas that last answered; a replica that does not answer is set aside and the request
tried once more on the next. A load or unload goes to every replica, so whichever replica a request reaches has
the model. :meth:`TritonReplicas.probe` (the inference service's watcher calls it) re-resolves, asks each replica
whether it is ready, and has the replicas that came up since the last probe *prepared* in the background — the
deployments they lack loaded on them (a replica started with ``--load-model=*`` already has the repository's
models) — before they take requests again.

A Triton restart looks like one to callers: every failure it causes is :class:`Unavailable` with a retry hint
(:data:`RETRY_AFTER_S`) — connection refused or reset, a replica still being prepared, or one that says it has no
such model (:class:`~margin.inference.triton_client.ModelNotLoaded`; a replica that restarted between two probes
says that: the gateway then checks the deployment and, if it is READY, calls :meth:`TritonReplicas.lost_models`
so that the next probe prepares it again).
"""
from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from margin.common.config import ConfigError
from margin.common.errors import Unavailable
from margin.inference.triton_client import ModelNotLoaded, RawTensor, TritonClient

log = logging.getLogger(__name__)

REFRESH_S = 5.0
RETRY_AFTER_S = 1.0  # the retry hint of an UNAVAILABLE answer: a replica down, restarting or loading its deployments


@dataclass(frozen=True)
class PoolAddress:
    """A parsed pool address: ``single`` (one address, gRPC resolves it), ``dns`` (every address of ``host``) or
    ``static`` (a fixed list)."""

    text: str
    kind: str
    addresses: tuple[str, ...] = ()  # single / static: the replicas' host:port
    host: str = ""                   # dns
    port: int = 0                    # dns

    def resolve(self) -> list[str]:
        """The replicas' addresses now (``dns``: an empty list when the name does not resolve)."""
        if self.kind != "dns":
            return list(self.addresses)
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            log.warning("cannot resolve Triton pool %s: %s", self.text, err)
            return []
        found = {_join(info[4][0], self.port) for info in infos}
        return sorted(found)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(text: str, port: str) -> int:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"Triton pool address {text!r}: {port!r} is not a port (1-65535)")
    return int(port)


def _split_host_port(text: str, item: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"Triton pool address {text!r}: {item!r} needs host:port")
    return host, _port(text, port)


def parse_pool_address(text: str) -> PoolAddress:
    """``host:port``, ``dns:///host:port``, ``ipv4:a:p,b:q`` or ``ipv6:[a]:p,...``; anything else, or a part
    missing, is a :class:`ConfigError` that says which."""
    text = text.strip()
    if text.startswith("dns:"):
        rest = text[len("dns:"):]
        if not rest.startswith("///"):
            raise ConfigError(f"Triton pool address {text!r}: write dns:///host:port (a DNS server authority is "
                              "not supported; the pod's resolver is used)")
        host, port = _split_host_port(text, rest[3:])
        return PoolAddress(text, "dns", host=host, port=port)
    for scheme, version in (("ipv4:", 4), ("ipv6:", 6)):
        if text.startswith(scheme):
            items = [item.strip() for item in text[len(scheme):].split(",")]
            addresses = []
            for item in items:
                host, port = _split_host_port(text, item)
                bare = host[1:-1] if version == 6 and host.startswith("[") and host.endswith("]") else host
                try:
                    if ipaddress.ip_address(bare).version != version:
                        raise ValueError
                except ValueError:
                    raise ConfigError(f"Triton pool address {text!r}: {host!r} is not an IPv{version} address") \
                        from None
                addresses.append(_join(bare, port))
            if len(set(addresses)) != len(addresses):
                raise ConfigError(f"Triton pool address {text!r} lists a replica twice")
            return PoolAddress(text, "static", addresses=tuple(addresses))
    if "://" in text or text.count(",") or not text:
        raise ConfigError(f"Triton pool address {text!r}: use host:port, dns:///host:port or ipv4:a:p,b:q")
    _split_host_port(text, text)
    return PoolAddress(text, "single", addresses=(text,))


class TritonReplicas:
    """The replicas of one Triton pool, behind the interface of a single :class:`TritonClient` (load, unload,
    model_ready, infer, infer_async, server_ready), plus :meth:`probe` and :meth:`replica`."""

    def __init__(self, url: str, refresh_s: float = REFRESH_S, infer_timeout_s: float = 30.0,
                 resolve: Callable[[], list[str]] | None = None):
        self.url = url
        self.address = parse_pool_address(url)
        self._resolve = resolve or self.address.resolve
        self._refresh_s, self._infer_timeout_s = refresh_s, infer_timeout_s
        self._clients: dict[str, TritonClient] = {}
        self._live: tuple[TritonClient, ...] = ()  # answered the last probe or request, and prepared; address order
        self._answered = 0                         # replicas that answered the last probe
        self._preparing: set[str] = set()          # came up, being given their deployments: no requests yet
        self._interrupted: set[str] = set()        # of those, the ones a probe found down meanwhile: prepare again
        self._resolved_at = -float("inf")
        self._turn = itertools.count()
        self._lock = threading.Lock()

    # -- membership --------------------------------------------------------------------------------
    def members(self, force: bool = False) -> list[TritonClient]:
        """Every known replica, after resolving again when ``force`` or ``refresh_s`` has passed."""
        with self._lock:
            if force or time.monotonic() - self._resolved_at >= self._refresh_s:
                self._resolved_at = time.monotonic()
                addresses = self._resolve()
                for gone in set(self._clients) - set(addresses):
                    log.info("Triton pool %s: replica %s is gone", self.url, gone)
                    self._clients.pop(gone).close()
                for address in addresses:
                    if address not in self._clients:
                        self._clients[address] = TritonClient(address, self._infer_timeout_s)
                self._live = tuple(c for c in self._live if c.url in self._clients)
            return [self._clients[a] for a in sorted(self._clients)]

    def probe(self, prepare: Callable[[TritonClient], object] | None = None) -> list[TritonClient]:
        """Ask every replica whether it is ready (resolving again when ``refresh_s`` has passed, or at once when none
        is ready). A replica that was not ready (or not known, or had :meth:`lost_models`) at the last probe and is
        now is ``prepare``d — given the pool's deployments it lacks — on a background thread, so the probe returns at
        once (the watcher goes on reporting health and metering); it takes requests when that is done. Returns those
        replicas. A replica that no longer answers takes none until it is ready again and prepared again."""
        members = self.members(force=not self._live)
        ready = [c for c, ok in zip(members, _each(lambda c: c.server_ready(), members), strict=True) if ok]
        self._answered = len(ready)
        answering = {c.url for c in ready}
        with self._lock:  # those that went away stop taking requests now; those that came up, once prepared
            self._live = tuple(c for c in self._live if c.url in answering)
            self._interrupted |= self._preparing - answering
            came_up = [c for c in ready if c not in self._live and c.url not in self._preparing]
            self._preparing |= {c.url for c in came_up}
        for client in came_up:
            if prepare is None:
                self._prepared(client, True)
            else:  # a daemon thread per replica that came up: a stopping gateway does not wait for its loads
                threading.Thread(target=self._prepare, args=(client, prepare), name=f"triton-prepare-{client.url}",
                                 daemon=True).start()
        return came_up

    def _prepare(self, client: TritonClient, prepare: Callable[[TritonClient], object]) -> None:
        try:
            prepare(client)
        except Exception:  # the next probe finds it ready and not live: it is prepared again
            log.exception("Triton pool %s: preparing replica %s failed", self.url, client.url)
            self._prepared(client, False)
        else:
            self._prepared(client, True)

    def _prepared(self, client: TritonClient, ok: bool) -> None:
        """``client``'s preparation ended: it takes requests, unless it failed or the replica went down meanwhile
        (a probe found it not ready: it may have restarted and lost what it was given)."""
        with self._lock:
            self._preparing.discard(client.url)
            interrupted = client.url in self._interrupted
            self._interrupted.discard(client.url)
            if ok and not interrupted and self._clients.get(client.url) is client and client not in self._live:
                self._live = tuple(sorted((*self._live, client), key=lambda c: c.url))

    @property
    def preparing(self) -> bool:
        """Some replica came up and is being given its deployments (it takes no requests until it has them)."""
        return bool(self._preparing)

    def lost_models(self, client: TritonClient) -> None:
        """``client`` says it lacks a model it was given, one still deployed READY: it restarted between two probes
        (explicit model control starts empty) or something unloaded it. It takes no requests until the next probe
        has prepared it again."""
        with self._lock:
            if client in self._live:
                log.warning("Triton pool %s: replica %s lost its deployments (a restart?); it takes no requests "
                            "until they are loaded again", self.url, client.url)
                self._live = tuple(c for c in self._live if c is not client)

    @property
    def live(self) -> tuple[TritonClient, ...]:
        """The replicas taking requests: ready at the last probe (and prepared), less those that failed a request
        since."""
        return self._live

    @property
    def billable(self) -> int:
        """The replicas the platform pays for, as of the last probe: with ``dns:///`` every address the name
        resolves to (the pool's headless Service publishes starting pods too: the cloud bills a pod from its start);
        with a fixed address or list, those that answered (a local process that is down costs nothing)."""
        return len(self._clients) if self.address.kind == "dns" else self._answered

    def statistics(self, model: str) -> list:
        """Triton's own ``ModelStatistics`` of ``model`` on each replica taking requests (one with no such model
        loaded gives none)."""
        return [s for found in _each(lambda c: c.statistics(model), self._live) for s in found]

    def server_ready(self) -> bool:
        """At least one replica is ready now (asked, not the last probe's view)."""
        return any(_each(lambda c: c.server_ready(), self.members()))

    def replica(self) -> TritonClient:
        """One ready replica (to measure a single replica's capacity); :class:`Unavailable` when none is."""
        live = self._live or tuple(c for c in self.members() if c.server_ready())
        if not live:
            raise Unavailable(f"no replica of the Triton pool {self.url} is ready")
        return live[0]

    def _set_aside(self, client: TritonClient) -> None:
        with self._lock:
            if client in self._live:
                log.warning("Triton pool %s: replica %s did not answer; set aside until it is ready again",
                            self.url, client.url)
                self._live = tuple(c for c in self._live if c is not client)

    def _pick(self) -> list[TritonClient]:
        """The replicas to try for one request, in order: the next live one, then one more; with none live, every
        known replica (so a pool that is down answers UNAVAILABLE at once, as a single Triton does)."""
        live = self._live
        if not live:
            return self.members(force=time.monotonic() - self._resolved_at >= 1.0)[:2]
        first = next(self._turn) % len(live)
        return [live[first]] + ([live[(first + 1) % len(live)]] if len(live) > 1 else [])

    # -- control: every replica ------------------------------------------------------------------------
    def load(self, name: str, wait_s: float = 120.0) -> None:
        """Load ``name`` on every replica. A replica that does not answer is set aside (the watcher loads it there
        when it comes back); a replica that refuses the model fails the load; none answering is
        :class:`Unavailable`."""
        self._on_every_replica(lambda c: c.load(name, wait_s), f"load {name}")

    def unload(self, name: str) -> None:
        self._on_every_replica(lambda c: c.unload(name), f"unload {name}")

    def model_ready(self, name: str, timeout: float = 1.0) -> bool:
        """Ready on every live replica (and at least one)."""
        live = self._live or tuple(self.members())
        return bool(live) and all(_each(lambda c: c.model_ready(name, timeout), live))

    def _on_every_replica(self, action: Callable[[TritonClient], None], what: str) -> None:
        members = self.members(force=True)
        errors = _each(lambda c: _error_of(action, c), members)
        unreachable = [c for c, e in zip(members, errors, strict=True) if isinstance(e, Unavailable)]
        for client in unreachable:
            self._set_aside(client)
        refused = [e for e in errors if e is not None and not isinstance(e, Unavailable)]
        if refused:
            raise refused[0]
        if len(unreachable) == len(members):
            raise Unavailable(f"Triton pool {self.url}: no replica answered ({what})"
                              + (f": {errors[0]}" if errors else ": the name resolves to no replica"))
        if unreachable:
            log.warning("Triton pool %s: %s skipped %d unreachable replica(s): %s", self.url, what, len(unreachable),
                        ", ".join(c.url for c in unreachable))

    # -- inference -----------------------------------------------------------------------------------
    def infer(self, model: str, inputs: Sequence[RawTensor], outputs: Sequence[str]) -> list[RawTensor]:
        """One inference on the next replica (the one after it when it does not answer). Every failure a Triton
        restart causes is :class:`Unavailable` with a retry hint; :class:`ModelNotLoaded` (naming the replica) when a
        replica taking requests says it has no such model."""
        tried = self._pick()
        for i, client in enumerate(tried):
            try:
                return client.infer(model, inputs, outputs)
            except Unavailable as err:
                self._failed(client, err, last=i == len(tried) - 1)
        raise Unavailable(f"the Triton pool {self.url} has no replica", retry_after_s=RETRY_AFTER_S)

    async def infer_async(self, model: str, inputs: Sequence[RawTensor], outputs: Sequence[str]) -> list[RawTensor]:
        """:meth:`infer` on the caller's event loop."""
        tried = self._pick()
        for i, client in enumerate(tried):
            try:
                return await client.infer_async(model, inputs, outputs)
            except Unavailable as err:
                self._failed(client, err, last=i == len(tried) - 1)
        raise Unavailable(f"the Triton pool {self.url} has no replica", retry_after_s=RETRY_AFTER_S)

    def _failed(self, client: TritonClient, err: Unavailable, last: bool) -> None:
        """After ``client`` failed a request with ``err``: raise what the caller gets, or return to try the next
        replica (a replica that did not answer, when it was not the ``last`` to try)."""
        if isinstance(err, ModelNotLoaded):
            if client in self._live:  # given its deployments: the gateway checks whether the model is still one
                raise ModelNotLoaded(str(err), client, RETRY_AFTER_S) from None
            raise Unavailable(f"Triton pool {self.url}: replica {client.url} has restarted and is being given its "
                              "deployments again; retry", retry_after_s=RETRY_AFTER_S) from None
        self._set_aside(client)
        if last:
            raise Unavailable(str(err), retry_after_s=RETRY_AFTER_S) from None

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
            self._live = ()


def _error_of(action: Callable[[TritonClient], None], client: TritonClient) -> Exception | None:
    try:
        action(client)
    except Exception as err:  # collected, and re-raised by the caller
        return err
    return None


def _each(fn: Callable[[TritonClient], object], clients: Sequence[TritonClient]) -> list:
    """``fn`` on every client, at the same time when there are several (one slow replica does not hold the rest)."""
    if len(clients) <= 1:
        return [fn(c) for c in clients]
    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(fn, clients))
