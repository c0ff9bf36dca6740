"""The real pretrained MiniLM-L6 sentence encoder through the Compression service and its Celery worker: imported
into the registry from its package (safetensors + BERT config), compressed by an explicit recipe and by
AutoCompress with a cosine floor, each variant registered as TorchScript and measured from that artifact (cosine of
its embeddings to the fp32 source's on the held-out sentences of tests/data/sentences.txt); recipes the encoder
cannot take are refused."""
from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from margin.cli.main import app
from margin.common import protoconv
from margin.compression import minilm
from margin.modelzoo.architectures import build_model
from margin.v1 import common_pb2, compression_pb2, registry_pb2
from safetensors.torch import save
from typer.testing import CliRunner

from tests.integration.training_stack import TrainingStack, training_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning",
                                                           "ignore::DeprecationWarning", "ignore::UserWarning")]
State = common_pb2.JobState
EMB = {"quantize": {"scheme": "embedding_int8"}}
SMOOTHQUANT = {"name": "emb-int8+int8-per-token+smoothquant",
               "steps": [EMB, {"quantize": {"scheme": "dynamic_int8_per_token", "smoothquant": True}}]}
CANDIDATES = [{"name": "emb-int8+int8-dynamic",
               "steps": [EMB, {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
              SMOOTHQUANT,
              {"name": "emb-int8+int8-weight-only", "steps": [EMB, {"quantize": {"scheme": "weight_only_int8"}}]}]
runner = CliRunner()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingStack]:
    with training_stack(tmp_path_factory.mktemp("minilm"), max_upload=256 << 20) as s:  # the weights are 91 MB
        yield s


@pytest.fixture(scope="module")
def source(stack: TrainingStack) -> common_pb2.VersionRef:
    version = minilm.register_minilm(stack.cluster.client(), "minilm")
    return common_pb2.VersionRef(model=version.model, number=version.number)


@pytest.fixture(scope="module")
def held_out() -> tuple[object, list[str], np.ndarray]:
    """The tokenizer, the held-out sentences and the fp32 model's embeddings of them (the package's model loaded by
    transformers itself, not the worker's path)."""
    model, tokenizer = minilm.load_minilm()
    sentences = minilm.held_out_sentences()
    return tokenizer, sentences, minilm.encode(model, tokenizer, sentences)


def recipe(data: dict) -> compression_pb2.Recipe:
    return json_format.ParseDict(data, compression_pb2.Recipe())


def finished(stack: TrainingStack, job_id: str) -> compression_pb2.CompressionJob:
    stub, md = stack.compression_stub()
    ended = {State.Value(n) for n in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_BUDGET_EXCEEDED",
                                      "JOB_STATE_CANCELLED")}
    return wait_for(lambda: (j := stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job_id),
                                                         metadata=md)).state in ended and j, 240, interval=0.5)


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"margin {' '.join(args)} -> exit {result.exit_code}\n{result.output}"
    return result.output


def test_smoothquant_recipe_gives_a_small_variant_whose_cosine_matches_the_artifact(stack, source, held_out):
    stub, md = stack.compression_stub()
    job = stub.SubmitCompression(compression_pb2.SubmitCompressionRequest(source=source, recipe=recipe(SMOOTHQUANT)),
                                 metadata=md)
    final = finished(stack, job.id)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.outcome
    assert len(final.variants) == 1 and final.chosen == 0
    v, base = final.variants[0], final.baseline
    print(f"\nMiniLM {SMOOTHQUANT['name']}: R {v.compression_ratio:.2f} ({v.size_bytes:,} of {base.size_bytes:,} "
          f"bytes), cosine mean {v.quality:.5f} min {v.quality_min:.5f}; p50 b1 {v.latency_p50_ms_batch1:.2f} ms "
          f"(source {base.latency_p50_ms_batch1:.2f}), b32 {v.latency_p50_ms_batch32:.1f} ms (source "
          f"{base.latency_p50_ms_batch32:.1f}); cost per million {v.cost_per_million.micros} µ$ (source "
          f"{base.cost_per_million.micros}); job {final.cost.total.micros} µ$")
    assert v.quality_metric == "cosine" and v.compression_ratio >= 3.5
    assert v.quality >= 0.99 and v.quality_min >= 0.98 and v.quality_min <= v.quality
    assert base.quality == pytest.approx(1.0, abs=1e-6) and base.quality_metric == "cosine"
    # what the report says is what the registered artifact does
    client = stack.cluster.client()
    version, blob = client.download_bytes(v.version)
    assert v.size_bytes == len(blob) == version.size_bytes
    tokenizer, sentences, reference = held_out
    cos = minilm.cosines(reference, minilm.encode(torch.jit.load(io.BytesIO(blob)), tokenizer, sentences))
    assert len(cos) == len(sentences) == 381
    assert float(cos.mean()) == pytest.approx(v.quality, abs=1e-6)
    assert float(cos.min()) == pytest.approx(v.quality_min, abs=1e-5)
    assert v.latency_p50_ms_batch32 > 0 and v.cost_per_million.micros > 0
    # lineage, recipe and signature
    assert (version.parent.model, version.parent.number) == (source.model, source.number)
    assert version.format == registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT
    recorded = protoconv.from_struct(version.recipe)
    assert recorded["job_id"] == job.id and recorded["recipe"]["steps"][1]["quantize"]["smoothquant"] is True
    signature = protoconv.signature_from_proto(version.signature)
    assert [(t.name, t.dtype) for t in signature.inputs] == [("input_ids", "INT64"), ("attention_mask", "INT64")]
    assert signature.outputs[0].shape == (-1, 384)
    assert version.metrics["cosine"] == pytest.approx(v.quality) and "cosine_min" in version.metrics


def test_auto_compress_from_the_cli_picks_the_cheapest_variant_above_the_cosine_floor(stack, source):
    out = cli("compress", "auto", f"{source.model}:{source.number}", "--floor", "cosine>=0.99",
              "--candidates", json.dumps(CANDIDATES), "--compression", stack.compression.server.address,
              "--api-key", stack.cluster.keys["acme"])
    job_id = re.search(r"cj-[0-9a-f]+", out).group(0)
    final = finished(stack, job_id)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.outcome
    assert final.auto.floor.metric == "cosine" and len(final.variants) == len(CANDIDATES)
    for v in final.variants:
        print(f"\n  {v.recipe.name}: cosine {v.quality:.5f} (min {v.quality_min:.5f}), R {v.compression_ratio:.2f}, "
              f"b32 {v.latency_p50_ms_batch32:.1f} ms, {v.cost_per_million.micros} µ$/M")
        assert v.meets_floor == (v.quality >= 0.99)
    passing = [v for v in final.variants if v.meets_floor]
    assert passing and final.chosen >= 0, final.outcome
    chosen = final.variants[final.chosen]
    assert chosen.cost_per_million.micros == min(v.cost_per_million.micros for v in passing)
    assert chosen.pareto_optimal and "cosine" in final.outcome


def test_recipes_and_metrics_minilm_cannot_take_are_refused(stack, source):
    stub, md = stack.compression_stub()

    def refused(request: compression_pb2.SubmitCompressionRequest) -> str:
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitCompression(request, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return err.value.details()

    int8 = recipe({"name": "int8", "steps": [{"quantize": {"scheme": "dynamic_int8"}}]})
    assert "prune is not supported for minilm" in refused(compression_pb2.SubmitCompressionRequest(
        source=source, recipe=recipe({"name": "p", "steps": [{"prune": {"kind": "KIND_UNSTRUCTURED",
                                                                         "amount": 0.5}}]})))
    assert "'accuracy' does not apply to a minilm model" in refused(compression_pb2.SubmitCompressionRequest(
        source=source, recipe=int8, quality_metric="accuracy"))
    assert "unknown quantization scheme 'int3_magic'" in refused(compression_pb2.SubmitCompressionRequest(
        source=source, recipe=recipe({"name": "x", "steps": [{"quantize": {"scheme": "int3_magic"}}]})))
    assert "not supported for minilm" in refused(compression_pb2.SubmitCompressionRequest(
        source=source, recipe=recipe({"name": "x", "steps": [{"quantize": {"scheme": "static_int8"}}]})))
    assert "margin:sentences" in refused(compression_pb2.SubmitCompressionRequest(
        source=source, recipe=int8, eval_dataset=common_pb2.DatasetRef(builtin="sklearn:digits")))
    # and cosine does not apply to a classifier (an untrained digits MLP is enough to be refused)
    client = stack.cluster.client()
    client.ensure_model("digits-mlp")
    arch = {"family": "mlp", "input_dim": 64, "hidden": [16], "num_classes": 10}
    mlp = client.upload_bytes(save(dict(build_model(arch).state_dict())), registry_pb2.UploadMetadata(
        model="digits-mlp", format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS, architecture=protoconv.struct(arch)))
    assert "'cosine' does not apply to a mlp model" in refused(compression_pb2.SubmitCompressionRequest(
        source=common_pb2.VersionRef(model="digits-mlp", number=mlp.number), recipe=int8, quality_metric="cosine"))
    # the estimate of the built-in search space: five variants, a first guess (or history) for minilm
    estimate = stub.EstimateCompression(compression_pb2.EstimateCompressionRequest(
        auto=compression_pb2.AutoCompressRequest(source=source)), metadata=md)
    assert estimate.variants == 5 and "minilm" in estimate.basis


def test_importing_the_same_weights_again_returns_the_same_version(stack, source):
    again = minilm.register_minilm(stack.cluster.client(), "minilm")
    assert (again.model, again.number) == (source.model, source.number)
    out = cli("models", "import-minilm", "--registry", stack.cluster.registry.server.address,
              "--api-key", stack.cluster.keys["acme"])
    assert "Versions of minilm" in out
    imported = [v for v in stack.versions("minilm") if v.format == registry_pb2.ARTIFACT_FORMAT_SAFETENSORS]
    assert [v.number for v in imported] == [source.number]  # the variants are TorchScript children of it
    architecture = protoconv.from_struct(imported[0].architecture)
    assert architecture["family"] == "minilm" and architecture["config"]["hidden_size"] == 384
    assert imported[0].sha256 == protoconv.from_struct(imported[0].recipe)["sha256"]
