"""Configuration: defaults, substitution, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from mltasks.config import DEFAULT_CONFIG_PATH, load_config
from mltasks.configfile import substitute_env
from mltasks.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_file_matches_the_game_defaults() -> None:
    cfg = load_config(DEFAULT_CONFIG_PATH, environ={"ML_DB_PASSWORD": "s3cret"})
    assert cfg.database.name == "ragnarok_ml"
    assert cfg.database.user == "ml_user"
    assert cfg.database.password == "s3cret"
    assert "s3cret" not in repr(cfg)  # never in a log line that prints the config
    assert set(cfg.models.fusion.level3) == {"combat_dqn", "skill_dqn", "threat_assessment"}
    assert cfg.caching.lookup_levels == (1, 2)
    assert cfg.caching.write_actions is False  # the game writes its own L2 keys
    assert 32 <= cfg.inference.batch_size <= 128
    assert cfg.redis.cache_db == 0  # the game's own cache lives in db 0


def test_embedded_defaults_without_any_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), environ={})
    assert cfg.database.name == "ragnarok_ml"
    assert (cfg.monitoring.metrics_port, cfg.monitoring.bridge_metrics_port) == (9090, 9091)


def test_substitution_with_defaults() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert substitute_env("x${A}y", env) == "x1y"
    assert substitute_env("${B:-dflt}", env) == "dflt"
    assert substitute_env("${EMPTY:-dflt}", env) == "dflt"
    with pytest.raises(ConfigError, match="B is not set"):
        substitute_env("${B}", env)


def test_env_overrides_win(tmp_path: Path) -> None:
    env = {
        "MLTASKS_DATABASE_URL": "postgresql://u@h:1/d",
        "MLTASKS_REDIS_URL": "redis://other:6380",
        "MLTASKS_MODELS_DIR": "/srv/models",
    }
    cfg = load_config(write(tmp_path, "database:\n  name: x\n"), environ=env)
    assert cfg.database.url == "postgresql://u@h:1/d"
    assert conninfo_to_dict(cfg.database.conninfo) == {
        "user": "u",
        "host": "h",
        "port": "1",
        "dbname": "d",
        "options": "-c synchronous_commit=off -c enable_seqscan=off",
    }
    assert cfg.redis.db_url(3) == "redis://other:6380/3"
    assert cfg.models.dir == Path("/srv/models")


def test_mltasks_config_env_selects_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "inference:\n  batch_size: 100\n")
    assert load_config(environ={"MLTASKS_CONFIG": str(p)}).inference.batch_size == 100


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("inferense:\n  batch_size: 64\n", "inferense"),
        ("inference:\n  batchsize: 64\n", "inference.batchsize"),
        ("inference:\n  batch_size: 500\n", "inference.batch_size"),
        ("inference:\n  batch_size: lots\n", "inference.batch_size"),
        ("inference:\n  poll_interval_ms: true\n", "inference.poll_interval_ms"),
        ("hardware:\n  device: tpu\n", "hardware.device"),
        ("models:\n  serve_model_type: chess\n", "models.serve_model_type"),
        ("models:\n  fusion:\n    level3: {chess: 1}\n", "models.fusion.level3.chess"),
        ("caching:\n  enabled: maybe\n", "caching.enabled"),
        ("caching:\n  lookup_levels: [1, 4]\n", "caching.lookup_levels"),
        ("caching:\n  lookup_levels: 3\n", "caching.lookup_levels"),
        ("caching:\n  lookup_levels: [x]\n", "caching.lookup_levels"),
        ("redis:\n  url: http://x\n", "redis.url"),
        ("database:\n  port: 70000\n", "database.port"),
        ("logging: 3\n", "logging"),
        ("database:\n  password: ${NOT_SET_ANYWHERE}\n", "NOT_SET_ANYWHERE"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    assert key in str(err.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MLTASKS_CONFIG"):
        load_config(environ={"MLTASKS_CONFIG": str(tmp_path / "nope.yaml")})


def test_config_is_frozen() -> None:
    cfg = load_config(DEFAULT_CONFIG_PATH, environ={})
    with pytest.raises(AttributeError):
        cfg.inference.batch_size = 1  # type: ignore[misc]


def test_cli_reports_config_errors_naming_the_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = write(tmp_path, "inference:\n  max_latency_ms: -1\n")
    out = subprocess.run(
        [sys.executable, "-m", "mltasks.cli", "--config", str(p), "db", "init"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert "inference.max_latency_ms" in out.stderr


def test_state_layout_defaults_to_the_encoder_and_names_a_bad_value(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), environ={}).state.layout == "encoder"
    assert load_config(DEFAULT_CONFIG_PATH, environ={}).state.layout == "encoder"
    assert load_config(write(tmp_path, "state:\n  layout: seed\n"), environ={}).state.layout == (
        "seed"
    )
    with pytest.raises(ConfigError, match=r"state\.layout: 'csv' is not one of"):
        load_config(write(tmp_path, "state:\n  layout: csv\n"), environ={})
    with pytest.raises(ConfigError, match=r"state\.order: unknown key"):
        load_config(write(tmp_path, "state:\n  order: seed\n"), environ={})


def test_the_deadline_is_the_games_and_the_lease_follows_it(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), environ={})
    assert (cfg.inference.max_latency_ms, cfg.inference.lease_ms) == (15, 250)
    slow = load_config(write(tmp_path, "inference:\n  max_latency_ms: 100\n"), environ={})
    assert slow.inference.lease_ms == 1000
    with pytest.raises(ConfigError, match=r"inference\.lease_ms: 50 is outside"):
        load_config(write(tmp_path, "inference:\n  lease_ms: 50\n"), environ={})
    explicit = "inference:\n  max_latency_ms: 300\n  lease_ms: 200\n"
    assert load_config(write(tmp_path, explicit), environ={}).inference.lease_ms == 200


def test_experience_is_on_in_dev_and_off_unless_a_deployment_says_so(tmp_path: Path) -> None:
    assert load_config(DEFAULT_CONFIG_PATH, environ={}).experience.enabled
    assert not load_config(write(tmp_path, ""), environ={}).experience.enabled
    deploy = DEFAULT_CONFIG_PATH.parent.parent / "deploy" / "config" / "mltasks.yaml"
    assert not load_config(deploy, environ={}).experience.enabled
    assert load_config(deploy, environ={"MLTASKS_EXPERIENCE": "true"}).experience.enabled


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("experience:\n  max_rows: 0\n", "experience.max_rows: 0 is outside"),
        ("experience:\n  interval_s: .nan\n", "experience.interval_s: nan is outside"),
        ("experience:\n  retention: 5\n", "experience.retention: unknown key"),
        (
            "experience:\n  metrics_port: 9091\n",
            "experience.metrics_port: must differ from monitoring.metrics_port",
        ),
    ],
)
def test_bad_experience_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, text), environ={})
