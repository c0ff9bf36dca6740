"""MARGIN_TRITON_URLS parsing and the device class -> Triton pool mapping (no Triton needed: nothing listens on
the addresses, and a gRPC channel connects lazily)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from margin.cluster.processes import free_port
from margin.common.config import ConfigError
from margin.common.costs import PriceCatalog
from margin.common.errors import FailedPrecondition
from margin.inference.deployments import instance_kind_for
from margin.inference.pools import TritonPools, UnservedDeviceClass, parse_triton_urls
from margin.inference.service import settings_from_env


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_empty_means_one_triton_for_every_class(raw):
    assert parse_triton_urls(raw) == {}


def test_a_json_object_of_addresses_is_the_mapping():
    assert parse_triton_urls('{"cpu": "triton-cpu:8001", "nvidia-l4": "triton-l4:8001"}') == {
        "cpu": "triton-cpu:8001", "nvidia-l4": "triton-l4:8001"}


@pytest.mark.parametrize("raw, fragments", [
    ("cpu=triton:8001", ["MARGIN_TRITON_URLS is not valid JSON", "device class -> Triton gRPC address"]),
    ('{"cpu": "triton:8001",}', ["not valid JSON"]),
    ('["triton:8001"]', ["not a non-empty JSON object", "MARGIN_TRITON_URL serve every device class"]),
    ('"triton:8001"', ["not a non-empty JSON object"]),
    ("{}", ["not a non-empty JSON object"]),
    ('{"cpu": 8001}', ["not non-empty strings", "'cpu': 8001"]),
    ('{"cpu": ""}', ["'cpu': ''"]),
    ('{"cpu": ["a:1", "b:1"]}', ["'cpu': ['a:1', 'b:1']"]),
    ('{"": "triton:8001"}', ["empty device classes", "'': 'triton:8001'"]),
    ('{"cpu": "t:1", "nvidia-l4": null}', ["'nvidia-l4': None"]),
])
def test_malformed_values_are_a_config_error_that_says_what_is_wrong(raw, fragments):
    with pytest.raises(ConfigError) as info:
        parse_triton_urls(raw)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_the_service_reads_the_mapping_from_the_environment(monkeypatch):
    monkeypatch.setenv("MARGIN_TRITON_URLS", '{"cpu": "a:8001", "nvidia-t4": "b:8001"}')
    assert settings_from_env().triton_urls == {"cpu": "a:8001", "nvidia-t4": "b:8001"}
    monkeypatch.setenv("MARGIN_TRITON_URLS", "{cpu: a}")
    with pytest.raises(ConfigError, match="MARGIN_TRITON_URLS is not valid JSON"):
        settings_from_env()
    monkeypatch.delenv("MARGIN_TRITON_URLS")
    assert settings_from_env().triton_urls == {}


def test_the_service_process_exits_with_a_configuration_error(tmp_path: Path):
    env = {**os.environ, "MARGIN_HOME": str(tmp_path), "MARGIN_TRITON_URLS": '{"cpu": 8001}',
           "MARGIN_GRPC_PORT": "0", "MARGIN_METRICS_PORT": "-1", "MARGIN_LOG_FORMAT": "text",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "services"),
                                                        os.environ.get("PYTHONPATH")]))}
    env.pop("MARGIN_ADMIN_KEY", None)
    done = subprocess.run([sys.executable, "-m", "margin.inference"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "configuration error" in done.stderr and "MARGIN_TRITON_URLS" in done.stderr and "'cpu': 8001" in \
        done.stderr, done.stderr


def test_one_triton_serves_every_class():
    pools = TritonPools.connect({}, f"127.0.0.1:{free_port()}")
    try:
        assert pools.classes is None and [p.name for p in pools.pools] == ["default"]
        assert pools.for_class("cpu") is pools.for_class("tpu-v9") is pools.pools[0].client
        assert pools.serves("anything")
    finally:
        pools.close()


def test_each_class_goes_to_its_pool_and_an_unserved_class_is_failed_precondition():
    cpu, gpu = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    pools = TritonPools.connect({"cpu": cpu, "nvidia-t4": gpu, "nvidia-l4": gpu}, "ignored:1",
                                PriceCatalog.load().device_classes)
    try:
        assert pools.classes == ["cpu", "nvidia-l4", "nvidia-t4"]
        assert sorted(p.name for p in pools.pools) == ["cpu", "nvidia-l4,nvidia-t4"]  # one pool per address
        assert pools.for_class("cpu").url == cpu
        assert pools.for_class("nvidia-t4") is pools.for_class("nvidia-l4")
        assert pools.for_class("nvidia-t4").url == gpu
        assert not pools.serves("nvidia-a10g")
        with pytest.raises(UnservedDeviceClass) as info:
            pools.for_class("nvidia-a10g")
        assert isinstance(info.value, FailedPrecondition) and info.value.code_name == "FAILED_PRECONDITION"
        assert str(info.value) == ("no Triton pool serves device class 'nvidia-a10g'; this cluster's serving pools "
                                   "serve cpu, nvidia-l4, nvidia-t4")
        assert pools.server_ready() == {"cpu": False, "nvidia-l4,nvidia-t4": False}  # nothing listens there
    finally:
        pools.close()


def test_a_class_outside_the_price_catalog_is_a_config_error():
    with pytest.raises(ConfigError, match=r"not in the price catalog: \['tpu-v9'\]"):
        TritonPools.connect({"cpu": "a:1", "tpu-v9": "b:1"}, "ignored:1", PriceCatalog.load().device_classes)


def test_instance_kind_auto_puts_gpu_classes_on_gpus(monkeypatch):
    assert [instance_kind_for("auto", c) for c in ("cpu", "nvidia-l4", "nvidia-h100")] == \
        ["KIND_CPU", "KIND_GPU", "KIND_GPU"]
    assert instance_kind_for("KIND_CPU", "nvidia-l4") == "KIND_CPU"  # a fixed kind wins (local runs on CPU)
    monkeypatch.setenv("MARGIN_TRITON_INSTANCE_KIND", "auto")
    assert settings_from_env().instance_kind == "auto"
    monkeypatch.setenv("MARGIN_TRITON_INSTANCE_KIND", "KIND_TPU")
    with pytest.raises(ConfigError, match="MARGIN_TRITON_INSTANCE_KIND='KIND_TPU'"):
        settings_from_env()


def test_the_reload_concurrency_comes_from_the_environment_and_is_at_least_one(monkeypatch):
    assert settings_from_env().reload_concurrency == 8
    monkeypatch.setenv("MARGIN_RELOAD_CONCURRENCY", "3")
    assert settings_from_env().reload_concurrency == 3
    for bad in ("0", "-1", "many"):
        monkeypatch.setenv("MARGIN_RELOAD_CONCURRENCY", bad)
        with pytest.raises(ConfigError, match="MARGIN_RELOAD_CONCURRENCY"):
            settings_from_env()
