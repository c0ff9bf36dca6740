"""Triton serving pools: which Triton serves which device class.

By default one Triton (``MARGIN_TRITON_URL``) serves every device class. A cluster with a serving pool per device
class (a "cpu" pool, an "nvidia-l4" pool, each running its own Triton) sets ``MARGIN_TRITON_URLS`` to a JSON object
mapping each class to its pool's gRPC address; a deployment is then loaded, calibrated and served on the pool of its
device class, and a class that no pool serves cannot be deployed. Classes mapped to the same address share a pool.
An address may name a pool's several replicas (``dns:///<headless service>:8001``, ``ipv4:a:p,b:q``): see
:mod:`margin.inference.replicas`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from margin.common.config import TRITON_URLS, ConfigError
from margin.common.errors import FailedPrecondition
from margin.inference.replicas import TritonReplicas, parse_pool_address

log = logging.getLogger(__name__)


class UnservedDeviceClass(FailedPrecondition):
    """No Triton pool serves the device class (it is in the price catalog, but this cluster cannot run it)."""


@dataclass(frozen=True)
class Pool:
    client: TritonReplicas
    classes: frozenset[str] | None  # None: every device class
    device_class: str = "cpu"       # what its replicas are, so what they cost: the price of one replica

    @property
    def name(self) -> str:
        return ",".join(sorted(self.classes)) if self.classes is not None else "default"


class TritonPools:
    """The Triton pool of each device class: one pool for every class, or a mapping class -> pool."""

    def __init__(self, clients: TritonReplicas | Mapping[str, TritonReplicas], default_class: str = "cpu"):
        """``default_class``: the device class (price) of the one Triton serving every class. Classes sharing an
        address share a pool, priced as the first of them (one kind of replica)."""
        if isinstance(clients, TritonReplicas):
            self._default: TritonReplicas | None = clients
            self._by_class: dict[str, TritonReplicas] = {}
            self.pools: tuple[Pool, ...] = (Pool(clients, None, default_class),)
            return
        if not clients:
            raise ValueError("TritonPools needs at least one device class (or one client for every class)")
        self._default, self._by_class = None, dict(clients)
        grouped: dict[int, tuple[TritonReplicas, list[str]]] = {}
        for device_class, client in clients.items():
            grouped.setdefault(id(client), (client, []))[1].append(device_class)
        self.pools = tuple(Pool(client, frozenset(classes), classes[0]) for client, classes in grouped.values())

    @classmethod
    def connect(cls, urls: Mapping[str, str], default_url: str, known_classes: Iterable[str] | None = None,
                default_class: str = "cpu") -> TritonPools:
        """Clients for ``urls`` (device class -> address; one client per address), or for ``default_url`` serving
        every class (its replicas being ``default_class``) when ``urls`` is empty. With ``known_classes``, a class
        outside it is a :class:`ConfigError`."""
        if not urls:
            if known_classes is not None and default_class not in known_classes:
                raise ConfigError(f"the device class of MARGIN_TRITON_URL's replicas, {default_class!r}, is not in "
                                  f"the price catalog (known classes: {sorted(known_classes)})")
            return cls(TritonReplicas(default_url), default_class)
        unknown = sorted(set(urls) - set(known_classes)) if known_classes is not None else []
        if unknown:
            raise ConfigError(f"{TRITON_URLS.env} names device classes that are not in the price catalog: {unknown} "
                              f"(known classes: {sorted(known_classes)})")
        by_url: dict[str, TritonReplicas] = {}
        for url in urls.values():
            if url not in by_url:
                by_url[url] = TritonReplicas(url)
        pools = cls({device_class: by_url[url] for device_class, url in urls.items()})
        log.info("Triton pools: %s", ", ".join(f"{p.name} at {p.client.url}" for p in pools.pools))
        return pools

    @property
    def classes(self) -> list[str] | None:
        """The device classes served, sorted; None when one Triton serves every class."""
        return None if self._default is not None else sorted(self._by_class)

    def serves(self, device_class: str) -> bool:
        return self._default is not None or device_class in self._by_class

    def pool_of(self, device_class: str) -> Pool | None:
        """The pool serving ``device_class``, or None."""
        client = self._default if self._default is not None else self._by_class.get(device_class)
        return next((p for p in self.pools if p.client is client), None)

    def for_class(self, device_class: str) -> TritonReplicas:
        """The Triton serving ``device_class``; :class:`UnservedDeviceClass` naming the pools when none does."""
        client = self._default if self._default is not None else self._by_class.get(device_class)
        if client is None:
            raise UnservedDeviceClass(f"no Triton pool serves device class {device_class!r}; this cluster's serving "
                                      f"pools serve {', '.join(self.classes)}")
        return client

    def server_ready(self) -> dict[str, bool]:
        """Each pool's readiness (at least one replica ready), by pool name."""
        return {pool.name: pool.client.server_ready() for pool in self.pools}

    def close(self) -> None:
        for pool in self.pools:
            pool.client.close()


def parse_triton_urls(raw: str | None) -> dict[str, str]:
    """``MARGIN_TRITON_URLS``: a JSON object of device class -> non-empty address; empty means none (every class
    on ``MARGIN_TRITON_URL``). Anything else is a :class:`ConfigError` that says what is wrong."""
    if raw is None or not raw.strip():
        return {}
    hint = 'expected a JSON object of device class -> Triton gRPC address, e.g. {"cpu": "triton-cpu:8001"}'
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{TRITON_URLS.env} is not valid JSON ({err}): {hint}") from None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{TRITON_URLS.env}={raw!r} is not a non-empty JSON object: {hint} (leave it empty to "
                          f"let MARGIN_TRITON_URL serve every device class)")
    bad = sorted(f"{k!r}: {v!r}" for k, v in value.items() if not k.strip() or not isinstance(v, str) or not v.strip())
    if bad:
        raise ConfigError(f"{TRITON_URLS.env} has empty device classes or addresses that are not non-empty strings: "
                          f"{', '.join(bad)}; {hint}")
    for device_class, address in value.items():
        try:
            parse_pool_address(address)
        except ConfigError as err:
            raise ConfigError(f"{TRITON_URLS.env}, device class {device_class!r}: {err}") from None
    return dict(value)
