# syntax=docker/dockerfile:1.7
# NVIDIA Triton for Margin's serving pools: the official image plus what Margin's python-backend model
# (services/margin/inference/triton_python_model.py, copied into every deployed model's directory) imports —
# PyTorch and NumPy in the python backend's interpreter.
# `docker build -f docker/triton.Dockerfile -t margin-triton .` (`make images`).

ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.10-py3

FROM ${TRITON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv --system-site-packages /opt/venv \
 && /opt/venv/bin/pip install torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128 \
 && /opt/venv/bin/pip install "numpy<2.3"
COPY services/margin/inference/triton_python_model.py /opt/margin/triton_python_model.py

FROM ${TRITON_IMAGE}
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/margin /opt/margin
# The python backend's stub runs the image's python3; the venv's packages are on its path.
RUN python3 -c "import site; print(site.getsitepackages()[0])" > /tmp/site \
 && echo "/opt/venv/lib/python3.$(python3 -c 'import sys; print(sys.version_info.minor)')/site-packages" \
      > "$(cat /tmp/site)/margin-venv.pth" && rm /tmp/site
# The official image's triton-server user (UID 1000).
USER 1000
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*"]
