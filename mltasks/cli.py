"""The ``mltasks`` command: db init, models init, bridge, worker, flower, dev, status, bench."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mltasks.config import get_config, load_config, set_config
from mltasks.errors import MLTasksError


def _db_init(args: argparse.Namespace) -> int:
    from psycopg.conninfo import conninfo_to_dict

    from mltasks.db import create_database_if_missing, init_schema

    cfg = get_config()
    created: list[str] = []
    if args.create:
        created = create_database_if_missing(cfg.database, args.admin_url, args.owner)
    if args.create or args.admin_url:
        user = str(conninfo_to_dict(cfg.database.conninfo).get("user") or "")
        admin = args.admin_url or _default_admin(cfg.database.conninfo)
        init_schema(cfg.database, admin_url=admin, owner=args.owner, runtime=user or None)
        roles = f" (owner {args.owner}; {user or 'the runtime role'}: rows only)"
    else:
        init_schema(cfg.database)
        roles = ""
    # Said once everything worked: a half-done init does not claim success.
    for what in created:
        print(f"created {what}")
    print(f"schema applied to {cfg.database.safe_dsn}{roles}")
    return 0


def _default_admin(conninfo: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(conninfo, dbname="postgres")


def _models_init(args: argparse.Namespace) -> int:
    import time

    from mltasks.demo_models import write_demo_models

    t0 = time.perf_counter()
    paths = write_demo_models(Path(args.dir), seed=args.seed)
    print(f"wrote {len(paths)} models into {args.dir} in {time.perf_counter() - t0:.1f}s")
    return 0


def _bridge(args: argparse.Namespace) -> int:
    from bridge.loop import main

    main()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from mltasks.celery_app import worker_command

    cmd = worker_command(args.queues, "--loglevel", args.loglevel, *args.celery_args)
    return subprocess.call(cmd)


def _flower(args: argparse.Namespace) -> int:
    conf = Path(__file__).with_name("flowerconfig.py")
    cmd = [sys.executable, "-m", "celery", "-A", "mltasks", "flower", f"--conf={conf}"]
    extra = list(args.flower_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    # Flower takes this process's place: a signal to `mltasks flower` reaches Flower itself
    # (a child would outlive a SIGTERM to its parent).
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*cmd, *extra])
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mltasks", description=__doc__)
    p.add_argument("--config", help="a YAML file (default: $MLTASKS_CONFIG or config/mltasks.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_cmd", required=True)
    init = db.add_parser("init", help="apply sql/schema.sql (idempotent)")
    init.add_argument(
        "--create", action="store_true", help="create the role and database if missing"
    )
    init.add_argument(
        "--admin-url",
        default=None,
        help="superuser connection used by --create, and to apply the schema as the owner "
        "role (default: same server and user, db postgres)",
    )
    init.add_argument(
        "--owner",
        default="mltasks_owner",
        help="role that owns the database and schema (no login; default: %(default)s); the "
        "configured user gets only row privileges",
    )
    init.set_defaults(func=_db_init)

    models = sub.add_parser("models", help="model files").add_subparsers(
        dest="models_cmd", required=True
    )
    minit = models.add_parser("init", help="write the 54 demo models")
    minit.add_argument("dir")
    minit.add_argument("--seed", type=int, default=0)
    minit.set_defaults(func=_models_init)

    br = sub.add_parser("bridge", help="run a bridge (same as python -m bridge)")
    br.set_defaults(func=_bridge)

    wk = sub.add_parser("worker", help="run a Celery worker (celery -A mltasks worker)")
    wk.add_argument("-Q", "--queues", default="cpu")
    wk.add_argument("--loglevel", default="INFO")
    wk.add_argument("celery_args", nargs=argparse.REMAINDER)
    wk.set_defaults(func=_worker)

    fl = sub.add_parser("flower", help="run Flower behind basic auth (MLTASKS_FLOWER_PASSWORD)")
    fl.add_argument("flower_args", nargs=argparse.REMAINDER)
    fl.set_defaults(func=_flower)

    try:
        from mltasks.bench.cli import add_parser as add_bench
    except ImportError:  # the bench package is optional at import time
        pass
    else:
        add_bench(sub)
    from mltasks.dev import add_parser as add_dev
    from mltasks.status import add_parser as add_status

    add_dev(sub)
    add_status(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) != "flower":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        # Flower's own options (--port=5598) go to Flower, in their order.
        args.flower_args = [*extra, *args.flower_args]
    try:
        if args.config:
            os.environ["MLTASKS_CONFIG"] = args.config
            set_config(load_config(args.config))
        result: int = args.func(args)
        return result
    except MLTasksError as exc:
        print(f"mltasks: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
