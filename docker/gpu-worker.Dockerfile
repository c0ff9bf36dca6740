# syntax=docker/dockerfile:1.7
# The Celery worker for GPU node pools: the CUDA build of PyTorch (PyPI's Linux wheels bundle the CUDA runtime as
# nvidia-* wheels; the node's driver comes in through the NVIDIA container toolkit), Margin on top, with
# onnxruntime-gpu in place of onnxruntime (the same module: ONNX compression measures fp16 variants on CUDA).
# `docker build -f docker/gpu-worker.Dockerfile -t margin-gpu-worker .` (`make images`).

FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN pip install torch==2.13.0 "torchao>=0.14"
COPY pyproject.toml README.md ./
COPY protos protos
COPY services services
RUN pip install grpcio-tools==1.81.1 \
 && mkdir -p services/margin/v1 \
 && python -m grpc_tools.protoc -I protos --python_out=services --grpc_python_out=services --pyi_out=services \
      protos/margin/v1/*.proto \
 && touch services/margin/v1/__init__.py \
 && pip uninstall -y grpcio-tools \
 && pip install . \
 && pip uninstall -y onnxruntime \
 && pip install "onnxruntime-gpu>=1.20,<2"
COPY tests/data/sentences.txt /opt/venv/share/margin/sentences.txt

FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH \
    MARGIN_HOME=/tmp/margin MARGIN_HELD_OUT_SENTENCES=/opt/venv/share/margin/sentences.txt \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
# bubblewrap (bwrap) and setpriv (util-linux, essential in Debian) for the worker: a tenant's model package runs in
# a bwrap sandbox (services/margin/worker/sandbox.py); the build fails here if either is missing.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap \
 && rm -rf /var/lib/apt/lists/* \
 && bwrap --version && setpriv --version
RUN groupadd --gid 1000 margin && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin margin
COPY --from=builder /opt/venv /opt/venv
USER 1000
EXPOSE 9090
CMD ["python", "-m", "celery", "-A", "margin.worker.app", "worker", "-Q", "train.nvidia-l4", "--concurrency", "1"]
