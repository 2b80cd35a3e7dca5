"""The deployment files agree with the code: docker-compose.yml, deploy/prometheus,
deploy/grafana, deploy/systemd. No Docker or systemd here: structure and commands only."""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import json
import re
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
# Where the checkout is in the image (deploy/Dockerfile) and on a systemd host (docs/deploy.md).
CHECKOUTS = ("/app/", "/opt/mltasks/app/")

APP_SERVICES = {"db-init", "bridge", "worker-gpu", "worker-cpu", "worker-rules", "beat", "flower"}
SERVICES = APP_SERVICES | {"postgres", "redis", "prometheus", "grafana", "models-init"}
UNITS = (
    "mltasks-bridge.service",
    "mltasks-worker@.service",
    "mltasks-beat.service",
    "mltasks-flower.service",
    "mltasks-experience.service",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = compose["services"]
    return svcs


# --- commands ---------------------------------------------------------------------------------


def _options(command: Any) -> set[str]:
    """Every option string a click command accepts."""
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", ()))
        names.update(getattr(param, "secondary_opts", ()))
    return names


def _check_options(args: Sequence[str], known: set[str], where: str) -> None:
    for arg in args:
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0]
            assert name in known, f"{where}: unknown option {name}"


def _value(args: Sequence[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        key, eq, val = arg.partition("=")
        if key in names:
            return val if eq else args[i + 1]
    return None


def check_command(argv: Sequence[str], where: str) -> None:
    """The command exists in this project, with options its program accepts."""
    prog = Path(argv[0]).name
    if prog.startswith("python"):
        assert argv[1] == "-m", f"{where}: {argv}"
        module = argv[2]
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{where}: no module {module}"
        if spec.submodule_search_locations is not None:  # a package: needs __main__
            assert importlib.util.find_spec(f"{module}.__main__"), f"{where}: {module} not runnable"
        return
    if prog == "mltasks":
        from mltasks.cli import build_parser

        try:
            build_parser().parse_args(list(argv[1:]))
        except SystemExit as exc:
            raise AssertionError(f"{where}: `{shlex.join(argv)}` does not parse") from exc
        return
    assert prog == "celery", f"{where}: unknown program {argv[0]}"
    from celery.bin.celery import celery as celery_cli

    assert argv[1:3] in (["-A", "mltasks"], ["--app", "mltasks"]), f"{where}: {argv}"
    from celery.app.utils import find_app

    assert find_app("mltasks") is importlib.import_module("mltasks.celery").app
    sub, args = argv[3], list(argv[4:])
    if sub == "flower":
        from flower.options import default_options

        known = {f"--{n}" for n in default_options._options} | {"--help"}
        known |= {k.replace("_", "-") for k in known}
        _check_options(args, known, where)
        conf = _value(args, "--conf")
        assert conf is not None, f"{where}: flower without --conf runs without our auth"
        assert conf.startswith(CHECKOUTS), f"{where}: {conf}"
        local = REPO / conf.split("/app/", 1)[1]
        assert local == REPO / "mltasks" / "ops" / "flowerconfig.py"
        return
    command = celery_cli.commands.get(sub)
    assert command is not None, f"{where}: no celery subcommand {sub}"
    _check_options(args, _options(command), where)
    if sub == "worker":
        from mltasks.broker.celery_app import QUEUES

        queues = _value(args, "-Q", "--queues")
        assert queues, f"{where}: a worker names its queues"
        for q in queues.split(","):
            assert q in QUEUES, f"{where}: queue {q} is not one of {QUEUES}"


def test_check_command_catches_mistakes() -> None:
    with pytest.raises(AssertionError):
        check_command(["python", "-m", "no_such_module"], "t")
    with pytest.raises(AssertionError):
        check_command(["celery", "-A", "mltasks", "worker", "-Q", "gpu2"], "t")
    with pytest.raises(AssertionError):
        check_command(["celery", "-A", "mltasks", "worker", "-Q", "cpu", "--bogus"], "t")
    with pytest.raises(AssertionError):
        check_command(["mltasks", "db", "frobnicate"], "t")
    with pytest.raises(AssertionError):
        check_command(["celery", "-A", "mltasks", "flower"], "t")


# --- docker-compose.yml -----------------------------------------------------------------------


def test_compose_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= SERVICES


def test_compose_app_services_build_our_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_compose_commands_exist(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES | {"models-init"}:
        command = services[name]["command"]
        assert isinstance(command, list), f"{name}: exec form, not a shell string"
        check_command(command, f"docker-compose.yml {name}")


def test_compose_workers_cover_every_queue(services: dict[str, dict[str, Any]]) -> None:
    from mltasks.broker.celery_app import QUEUES

    for queue in QUEUES:
        command = services[f"worker-{queue}"]["command"]
        assert _value(command, "-Q") == queue
        assert services[f"worker-{queue}"]["stop_signal"] == "SIGTERM"


def test_compose_gpu_worker(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["args"]["EXTRAS"] == "gpu"
    for name in ("worker-cpu", "worker-rules", "bridge", "beat"):
        assert "profiles" not in services[name], f"{name} must start by default"
        assert "deploy" not in services[name]


def test_compose_secrets_are_required(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]["environment"]
    assert flower["MLTASKS_FLOWER_PASSWORD"].startswith("${MLTASKS_FLOWER_PASSWORD:?")
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${")
    # Only published on the host's loopback.
    for name in ("flower", "prometheus", "grafana"):
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_dockerfile_copies_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    sources = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.MULTILINE)
    assert sources
    for line in sources:
        for src in line.split():
            assert (REPO / src).exists(), f"deploy/Dockerfile copies missing {src}"


def test_deploy_config_loads() -> None:
    from mltasks.config import load_config

    cfg = load_config(
        DEPLOY / "config" / "mltasks.yaml",
        environ={"MLTASKS_METRICS_HOST": "0.0.0.0", "MLTASKS_METRICS_PORT": "9092"},
    )
    assert cfg.monitoring.metrics_host == "0.0.0.0"
    assert cfg.monitoring.metrics_port == 9092
    assert cfg.logging.format == "json"


# --- Prometheus and Grafana -------------------------------------------------------------------


def _targets(job: dict[str, Any]) -> Iterator[tuple[str, int]]:
    for sd in job.get("dns_sd_configs", []):
        for host in sd["names"]:
            yield host, int(sd["port"])
    for sc in job.get("static_configs", []):
        for target in sc["targets"]:
            host, _, port = target.rpartition(":")
            yield host, int(port)


def test_prometheus_targets_are_compose_services(services: dict[str, dict[str, Any]]) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    seen = set()
    for job in prom["scrape_configs"]:
        for host, port in _targets(job):
            if host == "localhost":
                continue
            assert host in services, f"{job['job_name']}: {host} is no compose service"
            exposed = {int(p) for p in services[host].get("expose", [])}
            assert port in exposed, f"{job['job_name']}: {host} does not expose {port}"
            seen.add(host)
    assert seen >= {"bridge", "worker-gpu", "worker-cpu", "worker-rules"}
    # The workers' port is the one their config gives them.
    for name in ("worker-gpu", "worker-cpu", "worker-rules"):
        env = services[name]["environment"]
        assert {int(p) for p in services[name]["expose"]} == {int(env["MLTASKS_METRICS_PORT"])}


def test_prometheus_mount_matches(services: dict[str, dict[str, Any]]) -> None:
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisioning(services: dict[str, dict[str, Any]]) -> None:
    mounts = dict(m.split(":")[:2] for m in services["grafana"]["volumes"] if m.startswith("./"))
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "mltasks.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == path

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "mltasks.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]


def _exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_dashboard_queries_use_our_metrics() -> None:
    from mltasks.metrics import METRIC_NAMES

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "mltasks.json").read_text())
    used = set()
    for title, expr in _exprs(dashboard):
        names = re.findall(r"\b(ml_[a-z0-9_]+)", expr)
        assert names or "up{" in expr, f"{title}: {expr}"
        for name in names:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in METRIC_NAMES, f"panel {title!r} queries unknown metric {name}"
            used.add(base)
    assert used == METRIC_NAMES, f"no panel for {sorted(METRIC_NAMES - used)}"


# --- systemd ----------------------------------------------------------------------------------


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} keeping repeated keys (EnvironmentFile=, ...)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path.name}: {line} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def values(entries: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in entries if k == key]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_parses(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / unit).read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())

    svc = unit_entries(SYSTEMD / unit)["Service"]
    assert values(svc, "User") == ["mltasks"]
    assert values(svc, "Restart") == ["on-failure"]
    assert "/etc/mltasks/mltasks.env" in values(svc, "EnvironmentFile")
    assert values(svc, "KillSignal") == ["SIGTERM"]
    assert int(values(svc, "TimeoutStopSec")[0]) > 0
    assert values(unit_entries(SYSTEMD / unit)["Install"], "WantedBy") == ["multi-user.target"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_command_exists(unit: str) -> None:
    from mltasks.broker.celery_app import QUEUES

    (exec_start,) = values(unit_entries(SYSTEMD / unit)["Service"], "ExecStart")
    # systemd expands an unset $VAR to no word at all.
    argv = [a for a in shlex.split(exec_start) if not a.startswith("$")]
    assert argv[0].startswith("/opt/mltasks/venv/bin/"), argv[0]
    instances = QUEUES if "@" in unit else ("",)
    for instance in instances:
        check_command(
            [a.replace("%i", instance).replace("%H", "host") for a in argv], f"{unit} {instance}"
        )


def test_worker_unit_multiprocess_dir_and_warm_shutdown() -> None:
    from mltasks.broker.celery_app import settings_for
    from mltasks.config import load_config

    svc = unit_entries(SYSTEMD / "mltasks-worker@.service")["Service"]
    (runtime,) = values(svc, "RuntimeDirectory")
    env = dict(v.split("=", 1) for v in values(svc, "Environment"))
    assert env["PROMETHEUS_MULTIPROC_DIR"] == f"%t/{runtime}"
    assert "%i" in runtime, "one directory per worker instance"
    assert values(svc, "KillMode") == ["mixed"], "SIGTERM to the main process only"
    hard_limit = settings_for(load_config())["task_time_limit"]
    assert int(values(svc, "TimeoutStopSec")[0]) > hard_limit


def test_env_example_names_what_the_service_reads() -> None:
    text = (SYSTEMD / "mltasks.env.example").read_text()
    keys = {line.split("=", 1)[0] for line in text.splitlines() if re.match(r"^[A-Z_]+=", line)}
    assert {"MLTASKS_CONFIG", "MLTASKS_DATABASE_URL", "MLTASKS_REDIS_URL"} <= keys
    assert "PROMETHEUS_MULTIPROC_DIR" not in keys
    assert "MLTASKS_FLOWER_PASSWORD" not in keys, "Flower's password lives in flower.env"
