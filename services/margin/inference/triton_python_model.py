"""A generic Triton python-backend ``model.py`` that serves the TorchScript file ``model.pt`` or the ONNX file
``model.onnx`` beside it.

This file is data, not part of Margin's import graph: :func:`margin.inference.triton_export.export_version`
copies it to ``<repository>/<model>/1/model.py`` when a TorchScript or ONNX version is exported with the
``python`` backend, and Triton's python-backend stub imports it. It imports ``triton_python_backend_utils``,
which exists only inside that stub, so nothing else may import it.

What it does:

* ``initialize`` reads the model config (input and output names, data types, ``max_batch_size``) and loads
  the version folder's artifact, by its file name (:data:`RUNTIMES`): ``model.pt`` with ``torch.jit.load`` on
  CPU, or on ``cuda:<model_instance_device_id>`` for a ``KIND_GPU`` instance; ``model.onnx`` into an
  onnxruntime session (CPUExecutionProvider, with CUDAExecutionProvider first for a ``KIND_GPU`` instance when
  this onnxruntime has it). Intra-op threads (torch's, or the session's) are limited to ``torch_num_threads``
  from the config's ``parameters`` (default 1: Triton scales with instances, not with threads inside one).
  When every input has a fixed shape (apart from the batch dimension), two forward passes on zeros warm the
  model up (TorchScript's profiling executor, onnxruntime's first-run allocations), so the first request is
  not slow.
* ``execute`` gets the list of requests Triton's dynamic batcher gathered. With batching on
  (``max_batch_size > 0``), requests whose inputs share a shape apart from the batch dimension are
  concatenated along dimension 0 and run as ONE forward pass under ``torch.inference_mode()``; the
  outputs are split back per request. The model may return a tensor, a tuple/list of tensors in the
  configured output order, or a dict keyed by output name (an ONNX model's outputs are fetched by their
  configured names); each output must have its configured data type (it is not cast: a mismatch is the
  request's error, which a deploy's probe request turns into a refusal). With batching off each request runs
  alone.
* A failing request gets an error response; it never takes the model down. When a batched forward pass
  fails, each request of the batch is retried alone, so that one bad request fails only itself.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

THREADS_PARAMETER = "torch_num_threads"
UNSUPPORTED_TYPES = ("TYPE_STRING",)
ONNX_UNSUPPORTED_TYPES = ("TYPE_BF16",)  # onnxruntime takes and returns numpy arrays, and numpy has no bfloat16
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"


class _RequestError(Exception):
    """A problem with one request's tensors: becomes that request's error response."""


def _dtype_mismatch(name: str, returned: str, data_type: str) -> str:
    """Outputs are not cast: a model returning another dtype than its signature declares is refused (a deploy's
    probe request shows it), rather than served converted (float logits truncated to integers, say)."""
    return (f"output {name!r}: the model returned {returned}, the signature declares "
            f"{data_type.removeprefix('TYPE_')}")


def _parameter(config: dict, key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {})
    return value.get("string_value", default) if isinstance(value, dict) else default


class _OnnxModule:
    """An onnxruntime session called like a TorchScript module, so that batching, error isolation and output checks
    are the same for both: positional torch tensors in the configured input order in, a tuple of torch tensors in
    the configured output order out (views of onnxruntime's arrays: nothing copied, nothing cast)."""

    def __init__(self, session, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]]):
        self.session = session
        self.input_names = [name for name, _ in inputs]
        self.output_names = [name for name, _ in outputs]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: t.numpy() for name, t in zip(self.input_names, tensors, strict=True)}
        return tuple(torch.from_numpy(array) for array in self.session.run(self.output_names, feeds))


def _load_torchscript(path: Path, args: dict, model: TritonPythonModel) -> tuple[object, torch.device]:
    """``model.pt`` on CPU, or on the instance's GPU for a ``KIND_GPU`` instance."""
    if args.get("model_instance_kind") == "GPU":
        device = torch.device("cuda", int(args.get("model_instance_device_id", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    return module, device


def _onnx_providers(args: dict) -> list:
    """CPU, with CUDA first for a ``KIND_GPU`` instance when this onnxruntime has it (onnxruntime-gpu)."""
    import onnxruntime

    if args.get("model_instance_kind") == "GPU" and CUDA_PROVIDER in onnxruntime.get_available_providers():
        return [(CUDA_PROVIDER, {"device_id": int(args.get("model_instance_device_id", 0))}), CPU_PROVIDER]
    return [CPU_PROVIDER]


def _load_onnx(path: Path, args: dict, model: TritonPythonModel) -> tuple[object, torch.device]:
    """``model.onnx`` in an onnxruntime session. Its tensors stay on the host (device cpu): onnxruntime copies them
    to the GPU itself when its CUDA provider runs the graph."""
    import onnxruntime  # only ONNX deployments need it

    for name, data_type in (*model.inputs, *model.outputs):
        if data_type in ONNX_UNSUPPORTED_TYPES:
            raise pb_utils.TritonModelException(
                f"{model.model_name}: tensor {name!r} has type {data_type}, which this backend cannot pass to "
                "onnxruntime (numpy has no bfloat16)")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = model.threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=_onnx_providers(args))
    return _OnnxModule(session, model.inputs, model.outputs), torch.device("cpu")


# The artifact file a version folder may hold -> how to load it: (module called with torch tensors, input device).
RUNTIMES = {"model.pt": _load_torchscript, "model.onnx": _load_onnx}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", args.get("model_name", "model"))
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [(spec["name"], spec["data_type"]) for spec in config.get("input", [])]
        self.outputs = [(spec["name"], spec["data_type"]) for spec in config.get("output", [])]
        for name, data_type in (*self.inputs, *self.outputs):
            if data_type in UNSUPPORTED_TYPES:
                raise pb_utils.TritonModelException(
                    f"{self.model_name}: tensor {name!r} has type {data_type}, which a TorchScript or ONNX "
                    "model served by this backend cannot take or return")

        self.threads = max(1, int(_parameter(config, THREADS_PARAMETER, "1")))
        torch.set_num_threads(self.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only allowed before any inter-op work; harmless when too late
            pass
        # as_numpy() views Triton's shared memory read-only; torch only reads it (inference_mode).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

        folder = Path(args["model_repository"]) / str(args["model_version"])
        found = [(folder / name, load) for name, load in RUNTIMES.items() if (folder / name).is_file()]
        if not found:
            raise pb_utils.TritonModelException(f"{self.model_name}: {folder} holds none of {list(RUNTIMES)}")
        path, load = found[0]
        self.module, self.device = load(path, args, self)
        self._warm_up(config)

    def _warm_up(self, config: dict) -> None:
        """Two forward passes on zeros, so that TorchScript's profiling executor has optimized the graph (and
        onnxruntime has made its first-run allocations) before the first real request. Only for fixed shapes; a
        model that rejects zeros is simply not warmed up."""
        try:
            inputs = []
            for spec in config.get("input", []):
                dims = [int(d) for d in spec.get("reshape", {}).get("shape", spec.get("dims", []))]
                if any(d < 0 for d in dims):
                    return
                if spec["data_type"] == "TYPE_BF16":
                    zeros = torch.zeros(dims, dtype=torch.bfloat16)
                else:
                    zeros = torch.from_numpy(np.zeros(dims, pb_utils.triton_string_to_numpy(spec["data_type"])))
                inputs.append(zeros.unsqueeze(0) if self.batching else zeros)
            for _ in range(2):
                self._forward(inputs)
        except Exception:
            pass

    # -- tensors ------------------------------------------------------------------------------------
    def _input(self, request, name: str, data_type: str) -> torch.Tensor:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise _RequestError(f"input {name!r} is missing")
        if data_type == "TYPE_BF16":  # numpy has no bfloat16: go through DLPack
            value = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
        else:
            value = torch.from_numpy(tensor.as_numpy())
        return value

    def _outputs(self, result) -> list[np.ndarray]:
        if isinstance(result, torch.Tensor):
            result = (result,)
        elif isinstance(result, dict):
            missing = [name for name, _ in self.outputs if name not in result]
            if missing:
                raise _RequestError(f"the model returned no output named {missing}; it returned {sorted(result)}")
            result = tuple(result[name] for name, _ in self.outputs)
        elif not isinstance(result, (tuple, list)):
            raise _RequestError(f"the model returned {type(result).__name__}, not tensors")
        if len(result) < len(self.outputs):
            raise _RequestError(f"the model returned {len(result)} output(s), the config declares "
                                f"{len(self.outputs)}: {[name for name, _ in self.outputs]}")
        arrays = []
        for (name, data_type), value in zip(self.outputs, result, strict=False):
            if not isinstance(value, torch.Tensor):
                raise _RequestError(f"output {name!r}: the model returned {type(value).__name__}, not a tensor")
            value = value.detach()
            if data_type == "TYPE_BF16":
                if value.dtype != torch.bfloat16:
                    raise _RequestError(_dtype_mismatch(name, str(value.dtype).removeprefix("torch."), data_type))
                arrays.append(value.cpu().contiguous())
            else:
                array = value.cpu().numpy()
                if array.dtype != np.dtype(pb_utils.triton_string_to_numpy(data_type)):
                    raise _RequestError(_dtype_mismatch(name, str(array.dtype), data_type))
                arrays.append(np.ascontiguousarray(array))
        return arrays

    def _response(self, arrays) -> object:
        tensors = []
        for (name, data_type), value in zip(self.outputs, arrays, strict=True):
            if data_type == "TYPE_BF16":
                tensors.append(pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value)))
            else:
                tensors.append(pb_utils.Tensor(name, value))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(message: str) -> object:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))

    # -- execution ----------------------------------------------------------------------------------
    def _forward(self, inputs: list[torch.Tensor]) -> list:
        with torch.inference_mode():
            if self.device.type != "cpu":
                inputs = [t.to(self.device, non_blocking=True) for t in inputs]
            return self._outputs(self.module(*inputs))

    def _run_alone(self, inputs: list[torch.Tensor]) -> object:
        try:
            return self._response(self._forward(inputs))
        except Exception as exc:
            return self._error(f"{self.model_name}: {exc}")

    def _run_batch(self, group: list[tuple[int, list[torch.Tensor]]], responses: list) -> None:
        """One forward pass for requests whose inputs can be stacked; split the outputs back."""
        if len(group) == 1:
            index, inputs = group[0]
            responses[index] = self._run_alone(inputs)
            return
        sizes = [inputs[0].shape[0] for _, inputs in group]
        total = sum(sizes)
        try:
            stacked = [torch.cat([inputs[i] for _, inputs in group]) for i in range(len(self.inputs))]
            outputs = self._forward(stacked)
            for (name, _), value in zip(self.outputs, outputs, strict=True):
                if value.ndim == 0 or value.shape[0] != total:
                    raise _RequestError(f"output {name!r} has shape {list(value.shape)}; its first dimension "
                                        f"should be the batch size {total}")
        except Exception:
            # Do not let one request fail the others: run each alone, each gets its own answer or error.
            for index, inputs in group:
                responses[index] = self._run_alone(inputs)
            return
        offset = 0
        for (index, _), size in zip(group, sizes, strict=True):
            try:
                responses[index] = self._response([value[offset:offset + size] for value in outputs])
            except Exception as exc:
                responses[index] = self._error(f"{self.model_name}: {exc}")
            offset += size

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[torch.Tensor]]]] = {}
        for index, request in enumerate(requests):
            try:
                inputs = [self._input(request, name, data_type) for name, data_type in self.inputs]
            except Exception as exc:
                responses[index] = self._error(f"{self.model_name}: {exc}")
                continue
            if not self.batching or not inputs or any(t.ndim == 0 for t in inputs):
                responses[index] = self._run_alone(inputs)
                continue
            # Requests stack along dim 0 only when every other dimension (and dtype) agrees.
            key = tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)
            groups.setdefault(key, []).append((index, inputs))
        for group in groups.values():
            self._run_batch(group, responses)
        return responses

    def finalize(self) -> None:
        self.module = None
        if getattr(self, "device", None) is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
