"""The compose stack's files, checked without Docker (no engine runs on the machines CI
uses): images pinned, start order only on health checks that exist, volumes declared,
ports unique, every mounted or referenced file present, every variable documented in
.env.example, Prometheus pointed at the port the API listens on, and the image's health
check and user. A mistake in any of these otherwise shows only when someone runs
``docker compose up``."""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROMETHEUS: dict[str, Any] = yaml.safe_load(
    (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
)
HEALTH_CONDITIONS = {"service_healthy", "service_started", "service_completed_successfully"}

# ${NAME}, ${NAME:-default}, ${NAME:?message} or $NAME; "$$" is a literal dollar sign.
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_]\w*)(?P<rest>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))")


def env_example() -> dict[str, str]:
    """KEY=VALUE lines of .env.example, quotes removed, as compose reads them."""
    values: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML document, mapping keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def variables(text: str) -> set[str]:
    unescaped = text.replace("$$", "")
    return {m.group("braced") or m.group("bare") for m in _VARIABLE.finditer(unescaped)}


def interpolate(text: str, env: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        return env[match.group("braced") or match.group("bare")]

    return "$".join(_VARIABLE.sub(value, part) for part in text.split("$$"))


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (keyword, arguments) per build stage, continuation
    lines joined and comments dropped; the first list holds the ARGs before any FROM."""
    joined: list[str] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also those inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for instruction in joined:
        if not instruction.strip():
            continue
        keyword, _, arguments = instruction.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def dockerfile_healthcheck() -> str | None:
    return next((args for key, args in final_stage() if key == "HEALTHCHECK"), None)


def api_port() -> int:
    """The port `ehrmamba serve` listens on in the api container: the compose command's
    --port if it has one, else the image's CMD's."""
    command = SERVICES["api"].get("command")
    if command is None:
        command = next(args for key, args in final_stage() if key == "CMD")
    words = command if isinstance(command, list) else shlex.split(command)
    return int(words[words.index("--port") + 1])


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, PurePosixPath]]:
    """(host path, container path) of the service's bind mounts."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = _volume_parts(volume)
        if _is_path(source):
            mounts.append(((ROOT / source).resolve(), PurePosixPath(target)))
    return mounts


def host_path(service: dict[str, Any], container: str) -> Path | None:
    """Where a container path of the service comes from in the repository, if it is
    under one of its bind mounts."""
    path = PurePosixPath(container)
    for source, target in bind_mounts(service):
        if path == target or target in path.parents:
            return source / path.relative_to(target)
    return None


def _volume_parts(volume: str | dict[str, Any]) -> tuple[str, str]:
    if isinstance(volume, dict):
        return str(volume.get("source", "")), str(volume["target"])
    source, _, rest = volume.partition(":")
    return source, rest.split(":")[0]


def _is_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _healthcheck_of(name: str) -> str | None:
    """The service's health check command: its own, or its image's when it builds ours."""
    check = SERVICES[name].get("healthcheck")
    if check is not None:
        test = check.get("test")
        return " ".join(test) if isinstance(test, list) else test
    if "build" in SERVICES[name]:
        return dockerfile_healthcheck()
    return None


# --- images and start order ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_pinned_image_or_a_build(name: str) -> None:
    service = SERVICES[name]
    assert "image" in service or "build" in service, name
    if "build" in service:
        build = service["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
        return
    image = service["image"]
    repository, _, tag = image.rpartition("/")[2].partition(":")
    assert "@sha256:" in image or (tag and tag != "latest"), f"{name}: unpinned image {image}"
    assert repository, image


def test_images_of_the_dockerfile_are_pinned() -> None:
    for key, args in dockerfile_stages()[0]:
        if key == "ARG" and args.split("=")[0].endswith("_IMAGE"):
            image = args.partition("=")[2]
            tag = image.rpartition("/")[2].partition(":")[2]
            assert tag not in {"", "latest"}, f"Dockerfile: unpinned {args}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on_waits_for_health_checks_that_exist(name: str) -> None:
    depends = SERVICES[name].get("depends_on", {})
    assert isinstance(depends, dict), f"{name}: depends_on needs conditions (the long form)"
    for target, spec in depends.items():
        assert target in SERVICES, f"{name} depends on unknown service {target}"
        condition = spec.get("condition")
        assert condition in HEALTH_CONDITIONS, f"{name} -> {target}: condition {condition}"
        if condition == "service_healthy":
            assert _healthcheck_of(target), f"{name} waits for {target}, which has no healthcheck"
        if condition == "service_completed_successfully":
            assert SERVICES[target].get("restart") == "no", f"{target} must be one-shot"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_long_running_service_has_a_health_check(name: str) -> None:
    if SERVICES[name].get("restart") == "no":
        return  # a one-shot job: done is its health
    assert _healthcheck_of(name), f"{name} has no healthcheck"


def test_the_loader_is_a_one_shot_job_on_the_api_image() -> None:
    loader, api = SERVICES["loader"], SERVICES["api"]
    assert loader["restart"] == "no"
    assert loader["image"] == api["image"]
    assert loader["depends_on"]["hapi"]["condition"] == "service_healthy"
    assert "deploy/load_samples.py" in loader["command"]
    copied = [args.split() for key, args in final_stage() if key == "COPY"]
    assert ["deploy/load_samples.py", "deploy/load_samples.py"] in copied


# --- volumes, ports, files ----------------------------------------------------------------


def test_named_volumes_are_declared_and_used() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    used = set()
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source, _ = _volume_parts(volume)
            if source and not _is_path(source):
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"


def test_ports_are_well_formed_and_unique() -> None:
    env = env_example()
    published: dict[tuple[str, int, str], str] = {}
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            text = interpolate(str(port), env)
            mapping, _, protocol = text.partition("/")
            parts = mapping.split(":")
            assert len(parts) in (2, 3), f"{name}: port {text} is not [ip:]host:container"
            address = parts[0] if len(parts) == 3 else "0.0.0.0"
            host, container = int(parts[-2]), int(parts[-1])
            assert 0 < host < 65536, f"{name}: {text}"
            assert 0 < container < 65536, f"{name}: {text}"
            key = (address, host, protocol or "tcp")
            assert key not in published, f"{name} and {published.get(key)} both publish {key}"
            published[key] = name
    assert any(name == "api" for name in published.values())


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_mounted_and_referenced_files_exist(name: str) -> None:
    service = SERVICES[name]
    for source, _ in bind_mounts(service):
        assert source.exists(), f"{name}: mounts missing {source}"
        assert ROOT in source.parents, f"{name}: mounts {source} from outside the repository"
    for env_file in _env_files(service):
        if env_file == ".env":  # made by the operator from the example, never committed
            assert (ROOT / ".env.example").is_file()
            assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
        else:
            assert (ROOT / env_file).is_file(), f"{name}: env_file {env_file} missing"
    # Container paths named in commands and checks must come from a mount that has them.
    words = [*_words(service.get("command")), *_words(service.get("healthcheck", {}).get("test"))]
    for word in words:
        value = word.partition("=")[2] if word.startswith("--") else word
        if value.startswith("/") and (found := host_path(service, value)) is not None:
            assert found.exists(), f"{name}: {value} is mounted from missing {found}"


def test_the_samples_folder_is_mounted_and_documented() -> None:
    loader = SERVICES["loader"]
    source = loader["command"][loader["command"].index("--source") + 1]
    assert host_path(loader, source) == ROOT / "samples"
    assert (ROOT / "samples" / "README.md").is_file()


def test_dockerfile_copies_only_what_the_build_context_keeps() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for stage in dockerfile_stages():
        for key, args in stage:
            if key != "COPY" or args.startswith("--from"):
                continue
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
                assert source.split("/")[0] not in ignored, f"{source} is in .dockerignore"
    for kept_out in (".venv", ".cache", "data", "runs", "var", ".env", ".git"):
        assert kept_out in ignored, f".dockerignore lets {kept_out} into the build"


def test_grafana_provisioning_resolves() -> None:
    grafana = SERVICES["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None
    assert provisioning.is_dir()
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in SERVICES
    assert int(port) == 9090
    providers = yaml.safe_load((provisioning / "dashboards" / "ehrmamba.yml").read_text())
    for provider in providers["providers"]:
        folder = host_path(grafana, provider["options"]["path"])
        assert folder is not None, f"{provider['options']['path']} is not mounted"
        assert list(folder.glob("*.json")), f"no dashboard in {folder}"


def test_postgres_creates_the_database_hapi_uses() -> None:
    url = SERVICES["hapi"]["environment"]["spring.datasource.url"]
    database = url.rsplit("/", 1)[1]
    initdb = host_path(SERVICES["postgres"], "/docker-entrypoint-initdb.d")
    assert initdb is not None
    scripts = " ".join(p.read_text() for p in initdb.glob("*.sql"))
    assert f"CREATE DATABASE {database};" in scripts


def test_hapi_is_configured_for_the_service() -> None:
    env = SERVICES["hapi"]["environment"]
    assert env["hapi.fhir.bulk_export_enabled"] == "true"
    assert env["hapi.fhir.client_id_strategy"] == "ANY"
    assert env["hapi.fhir.reuse_cached_search_results_millis"] == "0"
    api = SERVICES["api"]["environment"]
    assert api["EHRMAMBA_FHIR_BASE_URL"] == "http://hapi:8080/fhir"
    assert api["REDIS_URL"].startswith("redis://redis:6379")
    assert api["DATABASE_URL"].startswith("postgresql+psycopg://")


# --- variables ----------------------------------------------------------------------------


def test_every_variable_is_in_env_example() -> None:
    used = set().union(*(variables(text) for text in strings(COMPOSE)))
    missing = used - set(env_example())
    assert not missing, f"docker-compose.yml uses {sorted(missing)}, absent from .env.example"
    assert "EHRMAMBA_CACHE_KEY_SECRET" in env_example(), "replicas must share it"


def test_the_variable_helpers() -> None:
    assert variables("a ${A} $B ${C:-x} ${D:?set D} $${E} $$F") == {"A", "B", "C", "D"}
    assert interpolate("${A}:$${A}", {"A": "1"}) == "1:${A}"


# --- Prometheus and the image -------------------------------------------------------------


def test_prometheus_scrapes_the_api_where_it_listens() -> None:
    port = api_port()
    published = [interpolate(str(p), env_example()) for p in SERVICES["api"]["ports"]]
    assert all(p.rsplit(":", 1)[1] == str(port) for p in published), published
    scraped = []
    for job in PROMETHEUS["scrape_configs"]:
        targets = [t for c in job.get("static_configs", []) for t in c["targets"]]
        targets += [f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]]
        if any(t.split(":")[0] == "api" for t in targets):
            assert job.get("metrics_path", "/metrics") == "/metrics"
            scraped += targets
    assert scraped, "no Prometheus job scrapes the api service"
    assert all(t == f"api:{port}" for t in scraped), scraped


def test_the_image_checks_readiness_and_runs_as_a_user() -> None:
    check = dockerfile_healthcheck()
    assert check is not None, "the final stage has no HEALTHCHECK"
    assert f"127.0.0.1:{api_port()}/health/ready" in check
    users = [args for key, args in final_stage() if key == "USER"]
    assert users, "the final stage runs as root (no USER)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"USER {users[-1]} is root"
    command = next(args for key, args in final_stage() if key == "CMD")
    assert "ehrmamba serve --host 0.0.0.0" in command
    assert "${WORKERS}" in command


def test_the_image_installs_the_torch_of_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    defaults = {}
    for stage in dockerfile_stages():
        for key, args in stage:
            name, sep, value = args.partition("=")
            if key == "ARG" and sep:
                defaults[name] = value
    assert f"torch=={defaults['TORCH_VERSION']}" == pinned


def _env_files(service: dict[str, Any]) -> list[str]:
    files = service.get("env_file", [])
    listed = [files] if isinstance(files, str) else files
    return [f if isinstance(f, str) else f["path"] for f in listed]


def _words(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return value if isinstance(value, list) else shlex.split(value)
