"""The broker and the cache behind Redis ACL users (issue 11, item 5).

A private redis-server whose default user is off: the service logs in as `mltasks` with
only the commands and keys it uses (docs/deploy.md gives the same rules), the game as
`game`, allowed to read and write its own action cache and nothing else. A real bridge and
a real worker answer through it, the game's L2 key is written, and a client without the
password gets nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis

from mltasks import keys
from mltasks.config import Config
from tests import game
from tests.conftest import wait_for
from tests.faults.support import REPO, RedisServer, Service, Settings, warm_up

pytestmark = pytest.mark.faults

SERVICE_PASSWORD = "service-secret-123"
GAME_PASSWORD = "game-secret-456"
STATE = [0.8, 0.5] + [0.0] * 62

# The ACL rules of docs/deploy.md ("Redis users"), word for word.
SERVICE_RULES = (
    "on >{password} resetkeys resetchannels ~* &* +@all -@admin -@dangerous"
    " +info +client|setname +client|getname +client|id"
)
GAME_RULES = "on >{password} resetkeys resetchannels ~ml:action:* +get +setex +ping +select"


def acl_args() -> list[str]:
    return [
        "--user", "default", "off",
        "--user", "mltasks", *SERVICE_RULES.format(password=SERVICE_PASSWORD).split(),
        "--user", "game", *GAME_RULES.format(password=GAME_PASSWORD).split(),
    ]  # fmt: skip


def test_the_service_runs_on_redis_acl_users_with_least_rights(
    config: Config, models_dir: Path, tmp_path: Path
) -> None:
    server = RedisServer(
        tmp_path / "redis", acl_args(), username="mltasks", password=SERVICE_PASSWORD
    )
    server.start()
    url = f"redis://mltasks:{SERVICE_PASSWORD}@127.0.0.1:{server.port}"
    svc = Service(
        tmp_path / "svc", database_url=config.database.conninfo, redis_url=url,
        models_dir=models_dir, settings=Settings(write_actions=True),
    )  # fmt: skip
    try:
        anonymous = redis.Redis(port=server.port, socket_timeout=2)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()

        svc.start_worker("cpu-1", "cpu")
        svc.start_bridge()
        svc.wait_worker("cpu-1", "cpu")
        with psycopg.connect(config.database.conninfo, autocommit=True) as pg:
            warm_up(pg)
            _, answer = game.decide(pg, STATE, timeout_ms=5000, archetype="tank")
            assert answer is not None and answer[0] != 255
        # The game's own user reads the action cache the service wrote (caching.write_actions,
        # for a gateway that does not write its own), and nothing more.
        gamer = redis.Redis(
            port=server.port, username="game", password=GAME_PASSWORD, socket_timeout=2
        )
        import numpy as np

        from mltasks.cache.codec import action_keys

        key = action_keys(np.array([STATE], dtype=np.float32), [1002])[0]
        wait_for(lambda: gamer.get(key) is not None, 10, "the service's L2 write")
        with pytest.raises(redis.exceptions.NoPermissionError):
            gamer.get(keys.LEVEL)
        with pytest.raises(redis.exceptions.NoPermissionError):
            gamer.lpush("cpu", "forged")
        gamer.close()
        # status logs in with the same URL
        res = subprocess.run(
            [sys.executable, "-m", "mltasks.cli", "status", "--json"],
            env=svc.env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        doc = json.loads(res.stdout)
        assert doc["redis"]["reachable"] is True, doc["redis"]
        assert SERVICE_PASSWORD not in res.stdout + res.stderr
        for name in ("cpu-1", "bridge"):
            assert SERVICE_PASSWORD not in svc.log_text(name), name
            assert "NOPERM" not in svc.log_text(name), svc.tail(name)
        assert not svc.crashed(), svc.tails()
    finally:
        svc.close()
        server.stop()
