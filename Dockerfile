# syntax=docker/dockerfile:1
# alignpress job image: `docker run IMAGE run recipes/demo.yaml --output-dir /outputs/demo`.
#
# Base: the PyPI torch 2.13.0 wheel is built for CUDA 13.0 and brings its own CUDA libraries as pip
# packages (cuda-toolkit 13.0.3, nvidia-cudnn-cu13, nvidia-nccl-cu13), so the base only has to
# match that CUDA major version and let the NVIDIA container toolkit inject the driver (R580 or
# newer for CUDA 13). The `-base` variant does exactly that; `-runtime` would add a second copy of
# cuBLAS/cuFFT/NCCL that torch never loads.
# Local CPU test build (no registry access): --build-arg BASE_IMAGE=localhost/debian-base:bookworm
# with the CPU torch wheel from --build-arg PIP_FIND_LINKS=/opt/wheels (see tests/test_container.py).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Optional extra wheel folder for pip (the CPU torch wheel in the local test build); empty = PyPI only.
ARG PIP_FIND_LINKS=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/hf

# python3 is 3.11 on Debian bookworm, 3.12 on Ubuntu 24.04: both meet the lock's minimum (3.11).
# Both distributions forbid pip in the system python (PEP 668), hence the venv. g++ and python3-dev: DeepSpeed compiles its CPU Adam
# kernel on first use, which the ZeRO-3 offload config needs (recipes/accelerate/zero3-offload.yaml).
# Versions come from the base image's distribution release, which BASE_IMAGE pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates g++ python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app

# Dependencies first, so a code change does not reinstall them. The pipca secret is the build
# machine's CA bundle, for builds behind a TLS-inspecting proxy; without it pip uses its own.
COPY requirements.lock requirements-gpu.lock ./
RUN --mount=type=secret,id=pipca \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
    && if [ -z "$PIP_FIND_LINKS" ]; then unset PIP_FIND_LINKS; fi \
    && pip install -r requirements.lock \
    && pip install --no-deps -r requirements-gpu.lock

# pyproject.toml: the version that --version, run.json and the card report (the code is not pip-installed)
COPY pyproject.toml entrypoint.py ./
COPY src/ src/
COPY recipes/ recipes/

# Runs as root: SkyPilot's docker runtime sets up ssh and packages inside the container with
# root (or passwordless sudo), and the job writes to whatever is mounted at /outputs.
# ALIGNPRESS_OUTPUTS: without --output-dir a run goes to /outputs/<recipe name>, where the results are
# meant to be mounted (docker run -v ...:/outputs; SkyPilot's bucket). No VOLUME: an anonymous volume
# there would be a mount point on the VM's own disk, which sky/run.sh could not tell from the bucket.
# Writable by any user: `docker run --user "$(id -u):$(id -g)"` (results on the volume owned by you)
# with no volume for the Hub cache downloads into the image's.
RUN mkdir -p /outputs "$HF_HOME" && chmod 1777 /outputs "$HF_HOME"
ENV ALIGNPRESS_OUTPUTS=/outputs
ENTRYPOINT ["python", "/app/entrypoint.py"]
CMD ["--help"]
