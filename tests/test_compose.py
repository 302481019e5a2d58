"""docker-compose.yml and the Dockerfile agree with the code (no Docker engine runs here,
so they are parsed and checked, not started)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from encoder.settings import Settings
from tests.helpers import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _command(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_has_the_services_users_need():
    assert {"redis", "minio", "minio-init", "worker", "flower", "producer", "search"} <= set(
        SERVICES
    )


def test_redis_requires_a_password_and_keeps_the_queue_across_restarts():
    command = " ".join(_command("redis"))
    assert "--requirepass ${REDIS_PASSWORD" in command
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command


def test_worker_command_names_an_app_that_exists_and_is_the_celery_app():
    command = _command("worker")
    assert command[:4] == ["celery", "-A", "worker", "worker"]
    import celery

    import worker

    assert isinstance(worker.app, celery.Celery)
    worker.app.loader.import_default_modules()  # what `celery worker` does at start-up
    assert {"imgenc.encode_chunk", "imgenc.finalize_job"} <= set(worker.app.tasks)


def test_worker_reserves_a_gpu_and_scales_without_fixed_names_or_ports():
    worker_service = SERVICES["worker"]
    devices = worker_service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert "container_name" not in worker_service and "ports" not in worker_service


def test_flower_is_behind_basic_auth_from_the_environment():
    command = " ".join(_command("flower"))
    assert command.startswith("celery -A worker flower")
    assert "--basic-auth=${FLOWER_USER" in command and "${FLOWER_PASSWORD" in command


def test_every_imgenc_variable_in_compose_is_a_setting_the_code_reads():
    env = SERVICES["worker"]["environment"]
    fields = {f"IMGENC_{name.upper()}" for name in Settings.__dataclass_fields__}
    imgenc_vars = {k for k in env if k.startswith("IMGENC_")}
    assert imgenc_vars and imgenc_vars <= fields, imgenc_vars - fields
    assert env["IMGENC_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)


def test_producer_is_a_one_off_whose_command_is_a_real_imgenc_subcommand():
    producer = SERVICES["producer"]
    assert producer.get("profiles") == ["tools"]
    from imgenc.cli import build_parser

    command = _command("producer")
    assert command[0] == "imgenc"
    build_parser().parse_args(command[1:])
    build_parser().parse_args(["enqueue", "/images", "--out", "s3://codes/x", "--wait"])


def test_search_serves_the_compose_destination_with_the_workers_behind_auth():
    import re

    from imgenc.cli import build_parser

    # As compose does: interpolate ${VAR:-default} and ${VAR:?error} first, then split.
    raw = SERVICES["search"]["command"]
    interpolated = re.sub(r"\$\{(\w+):\?[^}]*\}", "secret", raw)
    interpolated = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", interpolated)
    command = shlex.split(interpolated)
    assert command[:2] == ["imgenc", "serve"]
    args = build_parser().parse_args(command[1:])
    assert args.workers and args.auth == "search:secret" and args.host == "0.0.0.0"
    assert args.dest == "s3://codes/catalogue"
    assert SERVICES["search"]["ports"] == ["127.0.0.1:8000:8000"]
    assert "deploy" not in SERVICES["search"]  # no GPU: the workers encode the queries


@pytest.mark.parametrize("service", ["worker", "flower", "producer", "search"])
def test_services_built_from_the_repo_use_its_dockerfile(service):
    assert SERVICES[service]["build"] == "."


def test_dockerfile_copies_paths_that_exist_and_runs_the_standard_worker_command():
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
    cmd = next(line for line in lines if line.startswith("CMD "))
    assert '"celery", "-A", "worker", "worker"' in cmd


def test_env_example_sets_every_required_variable():
    example = (REPO / ".env.example").read_text()
    text = (REPO / "docker-compose.yml").read_text()
    import re

    required = set(re.findall(r"\$\{(\w+):\?", text))
    defined = {
        line.split("=")[0]
        for line in example.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert required <= defined, required - defined
    assert Path(REPO / ".env.example").exists()


def test_cpu_workers_build_the_openvino_variant_and_run_int8_with_a_mounted_calibration():
    service = SERVICES["worker-cpu"]
    assert service["build"]["args"] == {"VARIANT": "cpu"} and service["profiles"] == ["cpu"]
    env = service["environment"]
    assert env["IMGENC_RUNTIME"] == "openvino" and env["IMGENC_CALIBRATION"].startswith("/calib/")
    fields = {f"IMGENC_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert {k for k in env if k.startswith("IMGENC_")} <= fields
    assert any(v.endswith(":/calib:ro") for v in service["volumes"])
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'if [ "$VARIANT" = "cpu" ]' in dockerfile and ".[flower,openvino]" in dockerfile


def test_milvus_runs_pinned_with_its_etcd_and_minio_a_health_check_and_a_password():
    milvus, etcd = SERVICES["milvus"], SERVICES["etcd"]
    for service in (milvus, etcd):
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), image
        assert service["healthcheck"]["test"]
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
    assert milvus["environment"]["MINIO_ADDRESS"] == "minio:9000"
    assert milvus["environment"]["COMMON_SECURITY_AUTHORIZATIONENABLED"] == "true"
    assert "${MILVUS_PASSWORD:?" in milvus["environment"]["COMMON_SECURITY_DEFAULTROOTPASSWORD"]
    assert milvus["depends_on"]["etcd"]["condition"] == "service_healthy"


def test_the_search_service_points_at_milvus_with_its_password():
    from encoder.settings import Settings

    env = SERVICES["search"]["environment"]
    assert env["IMGENC_MILVUS_URI"] == "http://milvus:19530"
    assert env["IMGENC_MILVUS_TOKEN"].startswith("root:${MILVUS_PASSWORD:?")
    assert SERVICES["search"]["depends_on"]["milvus"]["condition"] == "service_healthy"
    settings = Settings.from_env(environ={"IMGENC_MILVUS_URI": "http://milvus:19530"})
    assert settings.milvus_uri == "http://milvus:19530"
