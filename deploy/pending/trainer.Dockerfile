# syntax=docker/dockerfile:1.7
# Two images from one file, built from the repository root so they see libs/:
#   target service: the trainer (Kafka consumer + TrainerService), slim
#     docker build -f services/trainer/Dockerfile --target service -t flywheel-trainer .
#   target job: the training Job it launches, on CUDA with the training stack (the package's extras)
#     docker build -f services/trainer/Dockerfile --target job -t flywheel-trainer-job .

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------- the trainer service

FROM ${PYTHON_IMAGE} AS service-build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
WORKDIR /src
# Locked dependencies first, from the lock and the manifests alone: rebuilt only when they change.
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY libs/eval/pyproject.toml libs/eval/
COPY libs/model/pyproject.toml libs/model/
COPY libs/proto/pyproject.toml libs/proto/
COPY services/trainer/pyproject.toml services/trainer/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package flywheel-trainer
# Then the sources, installed as wheels (nothing editable points back at /src).
COPY libs/common libs/common
COPY libs/eval libs/eval
COPY libs/model libs/model
COPY libs/proto libs/proto
COPY services/trainer services/trainer
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package flywheel-trainer

FROM ${PYTHON_IMAGE} AS service
RUN groupadd --system --gid 10001 flywheel \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin flywheel
COPY --from=service-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 50053 9103
ENTRYPOINT ["python", "-m", "flywheel_trainer"]

# ---------------------------------------------------------------- the training Job

FROM ${CUDA_IMAGE} AS job-build
# The managed CPython the venv runs on, copied whole into the job stage.
ARG PYTHON_VERSION=3.11.14
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN uv python install "${PYTHON_VERSION}"
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY libs/eval/pyproject.toml libs/eval/
COPY libs/model/pyproject.toml libs/model/
COPY libs/proto/pyproject.toml libs/proto/
COPY services/trainer/pyproject.toml services/trainer/
# --all-extras: the training stack (torch, bitsandbytes, ...) is the package's optional part.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --all-extras --package flywheel-trainer --python "${PYTHON_VERSION}"
COPY libs/common libs/common
COPY libs/eval libs/eval
COPY libs/model libs/model
COPY libs/proto libs/proto
COPY services/trainer services/trainer
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --all-extras --package flywheel-trainer --python "${PYTHON_VERSION}"

FROM ${CUDA_IMAGE} AS job
RUN groupadd --system --gid 10001 flywheel \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin flywheel
COPY --from=job-build /opt/python /opt/python
COPY --from=job-build /opt/venv /opt/venv
# HOME and the caches live on the Job's scratch volume: the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/scratch \
    HF_HOME=/scratch/huggingface \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/scratch/triton
USER 10001:10001
ENTRYPOINT ["python", "-m", "flywheel_trainer.job"]
