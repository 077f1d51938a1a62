"""docker-compose.yml and Dockerfile agree with the code: services, Settings fields, dependencies, volumes, pins."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"api", "worker", "redis", "postgres", "migrate", "minio", "buckets"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def test_every_service_exists(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES


def test_arborist_variables_are_settings_fields(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    fields = set(Settings.model_fields)
    seen = set()
    for name, service in compose["services"].items():
        for var in _env(service):
            if var.startswith("ARBORIST_"):
                field = var.removeprefix("ARBORIST_").lower()
                assert field in fields, f"{name}: {var} is not a Settings field"
                seen.add(var)
    assert {"ARBORIST_DATABASE_URL", "ARBORIST_BROKER_URL", "ARBORIST_ARTIFACT_ROOT"} <= seen
    # The values parse as the containers would parse them.
    for var in list(os.environ):
        if var.startswith("ARBORIST_"):
            monkeypatch.delenv(var)
    for var, value in _env(compose["services"]["api"]).items():
        if var.startswith("ARBORIST_"):
            monkeypatch.setenv(var, value.replace("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}", "s3cret"))
    settings = Settings(_env_file=None)
    assert settings.environment == "prod" and settings.queue_name == "celery"
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.artifact_root == "s3://arborist/artifacts"
    assert settings.data_allowed_roots == ["s3://arborist/datasets"]
    assert settings.job_time_limit_s > settings.heartbeat_timeout_s


def _substituted(value: str) -> str:
    """A compose value with its ``${VAR:?message}`` references replaced by the variable's name."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", r"\1", value)


def test_api_and_worker_share_only_the_network_services(compose: dict[str, Any]) -> None:
    """Issue #19: API and worker may run on separate hosts. They share settings, and the artifact store is the
    bucket the compose file creates on its S3 service (the endpoint and credentials the store itself uses); no
    volume is mounted into either."""
    services = compose["services"]
    api, worker, migrate = _env(services["api"]), _env(services["worker"]), _env(services["migrate"])
    assert api == worker and migrate["ARBORIST_DATABASE_URL"] == api["ARBORIST_DATABASE_URL"]
    for name in ("api", "worker"):
        assert not services[name].get("volumes"), f"{name} mounts a volume: it could not run on another host"
    root = api["ARBORIST_ARTIFACT_ROOT"]
    assert root.startswith("s3://")
    bucket = root.removeprefix("s3://").split("/", 1)[0]
    assert all(r.startswith(f"s3://{bucket}/") for r in json.loads(api["ARBORIST_DATA_ALLOWED_ROOTS"]))
    minio, buckets = services["minio"], services["buckets"]
    host, port = api["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    assert host == "minio" and minio["command"][:2] == ["server", "/data"] and port == "9000"
    creds = {k: _substituted(v) for k, v in _env(minio).items()}
    assert _substituted(api["AWS_ACCESS_KEY_ID"]) == creds["MINIO_ROOT_USER"]
    assert _substituted(api["AWS_SECRET_ACCESS_KEY"]) == creds["MINIO_ROOT_PASSWORD"]
    assert f"store/{bucket}" in buckets["command"][0] and "mc mb --ignore-existing" in buckets["command"][0]
    assert {k: _substituted(v) for k, v in _env(buckets).items()} == creds
    assert _depends(buckets) == {"minio": "service_healthy"} and buckets["restart"] == "no"
    for name in ("api", "worker"):
        assert _depends(services[name])["buckets"] == "service_completed_successfully", name
    assert "objects:/data" in minio["volumes"]


def test_depends_on_and_healthchecks_are_consistent(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, condition in _depends(service).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no check"
    for name in ("api", "worker"):
        deps = _depends(services[name])
        assert deps["migrate"] == "service_completed_successfully", name
        assert deps["postgres"] == deps["redis"] == "service_healthy", name
        assert "healthcheck" in services[name], name
    assert _depends(services["migrate"]) == {"postgres": "service_healthy"}
    assert services["migrate"]["restart"] == "no"


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared


def test_worker_reserves_a_gpu_and_runs_the_celery_app(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    command = worker["command"]
    assert command[:3] == ["python", "-m", "worker.gpus"]  # one pinned celery worker per GPU, -c 1 each
    queues = command[command.index("-Q") + 1].split(",")
    assert set(queues) == {"gpu", "cpu"} and command[command.index("--gpus") + 1] == "all"
    from worker.gpus import worker_command

    child = worker_command("0", "gpu,cpu", "h")
    assert child[1:5] == ["-m", "celery", "-A", "worker.celery_app"] and child[child.index("-c") + 1] == "1"
    assert "gpu0@" in worker["healthcheck"]["test"][1]
    assert "BASE_IMAGE" in worker["build"]["args"] and "cuda" in worker["build"]["args"]["BASE_IMAGE"]
    assert compose["services"]["api"]["command"][:2] == ["uvicorn", "api.main:app"]


def test_dockerfile_pins_torch_and_takes_a_cuda_base(dockerfile: str) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert pin == "torch==2.13.0"
    assert f'"{pin}"' in dockerfile or f" {pin} " in dockerfile
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M)
    assert "download.pytorch.org/whl/cpu" in dockerfile and "ARG TORCH_INDEX_URL" in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.M)
    for path in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (ROOT / path).exists(), f"COPY {path}: no such path"
