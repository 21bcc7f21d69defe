# syntax=docker/dockerfile:1.7
# The inference service image: `ehrmamba serve` with the shipped model in models/compact.
#
#   docker build -t ehrmamba .                      CPU (the default; no CUDA libraries pulled)
#   docker build -t ehrmamba:cuda --build-arg DEVICE=cuda .
#                                                   CUDA torch plus the fused selective-scan
#                                                   kernel (mamba-ssm, causal-conv1d), built
#                                                   against that torch on a CUDA devel image
#
# Two stages: the builder makes a virtual environment in /opt/venv, the runtime copies only
# that environment, the model and the sample loader, and runs as an unprivileged user.
# Builder and runtime of one DEVICE share a base family, so the venv's interpreter path
# (/usr/local/bin/python3.11 on python:*-slim, /usr/bin/python3.11 on Ubuntu) exists in both.

ARG DEVICE=cpu
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# --- base images per device: BuildKit builds only the ones DEVICE selects -------------------
FROM ${PYTHON_IMAGE} AS builder-cpu

FROM ${CUDA_DEVEL_IMAGE} AS builder-cuda
# Ubuntu 22.04 ships Python 3.10; the project needs 3.11 (and its headers for the kernels).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git \
    && rm -rf /var/lib/apt/lists/*

FROM ${PYTHON_IMAGE} AS runtime-cpu
# libgomp: OpenMP runtime for xgboost's wheels (torch and numba bring their own).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_RUNTIME_IMAGE} AS runtime-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# --- builder -------------------------------------------------------------------------------
FROM builder-${DEVICE} AS builder
ARG DEVICE
# Keep in step with the torch pin in pyproject.toml (tests/deploy/test_compose.py checks).
ARG TORCH_VERSION=2.13.0
# GPU generations to compile the CUDA kernels for (Ampere, Ada, Hopper by default).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index that matches the device: PyPI's default torch is a CUDA build
# of several GB, which a CPU image must not carry. pyproject's torch==2.13.0 is then met.
RUN if [ "$DEVICE" = "cuda" ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fhir_adapter fhir_adapter
COPY model model
COPY training training
COPY service service
COPY cli cli
COPY bench bench
# The CUDA kernels compile against the torch installed above, hence no build isolation.
RUN if [ "$DEVICE" = "cuda" ]; then \
        pip install "setuptools>=69" "wheel>=0.43" "packaging>=24" "ninja>=1.11" \
        && pip install --no-build-isolation ".[cuda]" "causal-conv1d>=1.4,<2"; \
    else \
        pip install .; \
    fi

# --- runtime -------------------------------------------------------------------------------
FROM runtime-${DEVICE} AS runtime
RUN groupadd --system --gid 10001 ehrmamba \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app/var \
        --shell /usr/sbin/nologin ehrmamba
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY models/compact models/compact
COPY deploy/load_samples.py deploy/load_samples.py
# The only writable place: the default SQLite store, numba's compiled-kernel cache, HOME.
RUN mkdir -p /app/var && chown 10001:10001 /app/var
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/app/var \
    NUMBA_CACHE_DIR=/app/var/numba-cache \
    EHRMAMBA_MODEL_PATH=/app/models/compact \
    WORKERS=2
# A numeric user, so that orchestrators can verify it is not root without resolving names.
USER 10001:10001
EXPOSE 8000
# 200 only when the model is loaded and the store migrated; urlopen raises on 503.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]
# exec: uvicorn, not a shell, receives the stop signal and drains its workers.
CMD exec ehrmamba serve --host 0.0.0.0 --port 8000 --workers "${WORKERS}"
