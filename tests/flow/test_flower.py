"""Flower behind basic auth: ``celery -A mltasks flower --conf=mltasks/ops/flowerconfig.py``
against the test broker, as a subprocess, and the options file on its own."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mltasks.config import Config
from mltasks.errors import ConfigError
from mltasks.ops.flowerconfig import PASSWORD_ENV, PORT_ENV, USER_ENV, flower_options
from mltasks.ops.processes import free_port

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "mltasks" / "ops" / "flowerconfig.py"
USER = "operator"
PASSWORD = "correct-horse-battery"


def status(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            code: int = resp.status
            return code
    except urllib.error.HTTPError as exc:
        return exc.code


def flower_cmd() -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "mltasks", "flower", f"--conf={CONF}"]


def flower_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "MLTASKS_FLOWER"))}
    env["MLTASKS_CONFIG"] = str(REPO / "tests" / "config" / "test.yaml")
    env.update(extra)
    return env


def wait_for_port(proc: subprocess.Popen[bytes], port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"flower exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"flower did not listen on {port} within {timeout}s")


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = flower_env(
        **{USER_ENV: USER, PASSWORD_ENV: PASSWORD, PORT_ENV: str(port)},
    )
    with (tmp_path / "flower.log").open("wb") as logfile:
        proc = subprocess.Popen(flower_cmd(), cwd=REPO, env=env, stdout=logfile, stderr=logfile)
        try:
            wait_for_port(proc, port)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_flower_asks_for_the_password(flower: str) -> None:
    assert status(f"{flower}/") == 401
    assert status(f"{flower}/tasks") == 401
    assert status(f"{flower}/tasks", (USER, "wrong-password-123")) == 401
    assert status(f"{flower}/", (USER, PASSWORD)) == 200
    assert status(f"{flower}/tasks", (USER, PASSWORD)) == 200
    # Flower leaves its health check open (for container health checks).
    assert status(f"{flower}/healthcheck") == 200


def test_flower_refuses_to_start_without_a_password() -> None:
    proc = subprocess.run(
        flower_cmd(),
        cwd=REPO,
        env=flower_env(**{PORT_ENV: str(free_port())}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert PASSWORD_ENV in proc.stderr


def test_options_from_the_environment() -> None:
    opts = flower_options({PASSWORD_ENV: PASSWORD, PORT_ENV: "5601"})
    assert opts["basic_auth"] == [f"mltasks:{PASSWORD}"]
    assert opts["port"] == 5601
    assert opts["address"] == "127.0.0.1"
    assert opts["enable_events"] is True

    with pytest.raises(ConfigError, match=PASSWORD_ENV):
        flower_options({})
    with pytest.raises(ConfigError, match="at least"):
        flower_options({PASSWORD_ENV: "short"})
    with pytest.raises(ConfigError, match="':'"):
        flower_options({PASSWORD_ENV: PASSWORD, USER_ENV: "a:b"})
    with pytest.raises(ConfigError, match=PORT_ENV):
        flower_options({PASSWORD_ENV: PASSWORD, PORT_ENV: "http"})
    # Authentication set another way stands instead of ours.
    assert "basic_auth" not in flower_options({"FLOWER_BASIC_AUTH": "a:b"})
    assert "basic_auth" not in flower_options({}, ["celery", "flower", "--auth=.*@example.org"])


def test_task_events_are_off_until_flower_asks(base_config: Config) -> None:
    """Events cost a publish per task and state: workers start without them, and Flower
    (enable_events, above) switches them on while it runs; monitoring.task_events forces them."""
    import dataclasses

    from mltasks.broker.celery_app import settings_for

    assert settings_for(base_config).get("worker_send_task_events") is False
    on = dataclasses.replace(
        base_config, monitoring=dataclasses.replace(base_config.monitoring, task_events=True)
    )
    assert settings_for(on).get("worker_send_task_events") is True


# -- the app itself refuses to serve Flower open (issue 11, item 7) ---------------------------


def _run_until_listening_or_exit(
    cmd: list[str], env: dict[str, str], port: int, tmp_path: Path
) -> tuple[int | None, str]:
    """(exit code, or None while it listens; its output). A listening Flower is stopped."""
    log = tmp_path / f"flower-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return proc.returncode, log.read_text(errors="replace")
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=0.2),
                ):
                    return None, log.read_text(errors="replace")
                time.sleep(0.05)
            raise AssertionError(f"flower neither listened nor exited:\n{log.read_text()}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


PLAIN_FLOWER = [sys.executable, "-m", "celery", "-A", "mltasks", "flower"]
MLTASKS_FLOWER = [sys.executable, "-m", "mltasks.cli", "flower"]


@pytest.mark.parametrize(
    "cmd",
    [
        pytest.param(lambda port: [*PLAIN_FLOWER, f"--port={port}"], id="celery-flower"),
        pytest.param(
            lambda port: [*MLTASKS_FLOWER, "--", "--auth=", f"--port={port}"], id="empty-auth"
        ),
        pytest.param(
            lambda port: [*PLAIN_FLOWER, "--basic-auth=admin:", f"--port={port}"],
            id="no-password",
        ),
    ],
)
def test_flower_never_runs_open_whatever_the_command_line(cmd: Any, tmp_path: Path) -> None:
    port = free_port()
    code, out = _run_until_listening_or_exit(cmd(port), flower_env(), port, tmp_path)
    assert code == 2, f"flower served on {port} without authentication:\n{out}"
    assert f"mltasks flower: {PASSWORD_ENV} is not set" in out


def test_plain_celery_flower_takes_our_basic_auth(tmp_path: Path) -> None:
    port = free_port()
    env = flower_env(**{USER_ENV: USER, PASSWORD_ENV: PASSWORD})
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*PLAIN_FLOWER, f"--port={port}"], cwd=REPO, env=env, stdout=out, stderr=out
        )
        try:
            wait_for_port(proc, port)
            base = f"http://127.0.0.1:{port}"
            for path in ("/", "/workers", "/tasks", "/metrics"):
                assert status(base + path) == 401, path
            assert status(base + "/", (USER, PASSWORD)) == 200
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_mltasks_flower_passes_flower_options_through(tmp_path: Path) -> None:
    port = free_port()
    env = flower_env(**{USER_ENV: USER, PASSWORD_ENV: PASSWORD})
    code, out = _run_until_listening_or_exit(
        [*MLTASKS_FLOWER, f"--port={port}"], env, port, tmp_path
    )
    assert code is None, out
    assert "unrecognized arguments" not in out


def test_an_empty_auth_option_is_no_authentication() -> None:
    with pytest.raises(ConfigError, match=PASSWORD_ENV):
        flower_options({}, ["celery", "flower", "--auth="])
    with pytest.raises(ConfigError, match=PASSWORD_ENV):
        flower_options({"FLOWER_AUTH": " "})
