# syntax=docker/dockerfile:1
#
# One image for the API, the worker and the one-shot migration (docker-compose.yml picks the command).
#
#   CPU (default):  docker build -t arborist:cpu .
#   GPU:            docker build -t arborist:gpu \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# torch comes from the PyTorch wheel index, not PyPI:
#   CPU-only wheels (no CUDA libraries, a few hundred MB instead of several GB):
#     https://download.pytorch.org/whl/cpu
#   CUDA wheels: https://download.pytorch.org/whl/cu128 (match the base image's CUDA version)

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python:3.11-slim has Python and venv; the CUDA (Ubuntu) bases need them installed.
RUN if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip

# torch first, in its own layer: it is by far the largest dependency and changes least often.
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml alembic.ini ./
COPY core ./core
COPY api ./api
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
# Editable: the code stays in /app, next to migrations/ (core.service.db.migrate finds it there).
RUN pip install -e ".[s3]" \
    && python -c "import torch, core.runs.run, api.main, worker.tasks; assert torch.__version__.startswith('2.13.0')"

# Unprivileged user; the artifact and dataset directories exist (owned by it) so named volumes inherit that.
RUN useradd --create-home --uid 10001 --user-group arborist \
    && mkdir -p /data/artifacts /data/datasets \
    && chown -R arborist:arborist /data
USER arborist

ENV ARBORIST_ARTIFACT_ROOT=/data/artifacts \
    ARBORIST_DATA_ALLOWED_ROOTS='["/data/datasets"]'

EXPOSE 8000
# For the API (the default command). The compose file gives the worker a check of its own.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
