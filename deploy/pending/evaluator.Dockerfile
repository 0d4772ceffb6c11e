# syntax=docker/dockerfile:1.7
# The evaluator (gates candidates on the exams, runs canaries, promotes and rolls back). Built from
# the repository root so it sees libs/:  docker build -f services/evaluator/Dockerfile .
# It scores candidates with ONNX Runtime on CPU, so the image is slim.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
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
COPY services/evaluator/pyproject.toml services/evaluator/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package flywheel-evaluator
# Then the sources, installed as wheels (nothing editable points back at /src).
COPY libs/common libs/common
COPY libs/eval libs/eval
COPY libs/model libs/model
COPY libs/proto libs/proto
COPY services/evaluator services/evaluator
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package flywheel-evaluator

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 flywheel \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin flywheel
COPY --from=build /opt/venv /opt/venv
# The golden sets the gate scores candidates on (settings golden.dataset points here).
COPY datasets /opt/flywheel/datasets
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 50054 9104
ENTRYPOINT ["python", "-m", "flywheel_evaluator"]
