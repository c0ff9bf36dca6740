# syntax=docker/dockerfile:1.7
# Margin's gRPC services and the CPU worker: `docker build -f docker/service.Dockerfile -t margin-service .`
# (`make images`). One image, the command picks the service (python -m margin.registry | ... | celery worker).

FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# CPU PyTorch first (the CUDA build is the gpu-worker image's), then the generated gRPC code, then Margin.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY protos protos
COPY services services
RUN pip install grpcio-tools==1.81.1 \
 && mkdir -p services/margin/v1 \
 && python -m grpc_tools.protoc -I protos --python_out=services --grpc_python_out=services --pyi_out=services \
      protos/margin/v1/*.proto \
 && touch services/margin/v1/__init__.py \
 && pip uninstall -y grpcio-tools \
 && pip install .
COPY tests/data/sentences.txt /opt/venv/share/margin/sentences.txt

FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH \
    MARGIN_HOME=/tmp/margin MARGIN_HELD_OUT_SENTENCES=/opt/venv/share/margin/sentences.txt
# bubblewrap (bwrap) and setpriv (util-linux, essential in Debian) for the CPU worker, which runs this image: a
# tenant's model package runs in a bwrap sandbox (services/margin/worker/sandbox.py); the build fails here if either
# is missing.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap \
 && rm -rf /var/lib/apt/lists/* \
 && bwrap --version && setpriv --version
RUN groupadd --gid 1000 margin && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin margin
COPY --from=builder /opt/venv /opt/venv
USER 1000
EXPOSE 50051 9090
CMD ["python", "-m", "margin.registry"]
