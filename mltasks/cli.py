"""The ``mltasks`` command: db init, models init, bridge, worker, flower, dev, status, bench."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mltasks.config import get_config, load_config, set_config
from mltasks.errors import MLTasksError


def _db_init(args: argparse.Namespace) -> int:
    from mltasks.db import create_database_if_missing, init_schema

    cfg = get_config()
    if args.create and create_database_if_missing(cfg.database, args.admin_url):
        print(f"created database {cfg.database.safe_dsn}")
    init_schema(cfg.database)
    print(f"schema applied to {cfg.database.safe_dsn}")
    return 0


def _models_init(args: argparse.Namespace) -> int:
    import time

    from mltasks.files import write_atomic
    from mltasks.models.agreement import agreement, render
    from mltasks.models.demo import demo_models, model_file

    cfg = get_config()
    layout = args.layout or cfg.state.layout
    target = Path(args.dir)
    t0 = time.perf_counter()
    models = list(demo_models(seed=args.seed, layout=layout))
    differing = [
        p
        for a, t, blob in models
        if (p := model_file(target, a, t)).is_file() and p.read_bytes() != blob
    ]
    if differing and not args.force:
        shown = ", ".join(str(p.relative_to(target)) for p in differing[:5])
        more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
        print(
            f"mltasks: {len(differing)} model files in {target} differ from the demo models"
            f" ({shown}{more}); nothing written. --force replaces them.",
            file=sys.stderr,
        )
        return 1
    for a, t, blob in models:
        write_atomic(model_file(target, a, t), blob)
    print(
        f"wrote {len(models)} models into {target} in {time.perf_counter() - t0:.1f}s"
        f" (state layout {layout}{'; replaced ' + str(len(differing)) if differing else ''})"
    )
    print("agreement with the rule teacher on held-out states:")
    print(
        render(
            agreement(
                target,
                dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, layout=layout)),
            )
        )
    )
    return 0


def _models_check(args: argparse.Namespace) -> int:
    from mltasks.models.check import check_dir, render

    reports = check_dir(Path(args.dir))
    print(render(reports, args.json))
    return 0 if all(r.ok for r in reports) else 1


def _models_agreement(args: argparse.Namespace) -> int:
    import json

    from mltasks.models.agreement import agreement, render

    rows = agreement(Path(args.dir), get_config(), n=args.states)
    print(
        json.dumps([dataclasses.asdict(r) for r in rows], indent=1) if args.json else render(rows)
    )
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
    return subprocess.call([*cmd, *args.flower_args])


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
        help="superuser connection used by --create (default: same server, db postgres)",
    )
    init.set_defaults(func=_db_init)

    models = sub.add_parser("models", help="model files").add_subparsers(
        dest="models_cmd", required=True
    )
    minit = models.add_parser(
        "init",
        help="write the 54 demo models",
        description="Write the 54 demo models as the fork's Phase 11 exporter writes them "
        "(<archetype>/<type>_fp16.onnx, FP16 I/O, the nine types' real signatures), small "
        "networks fitted to the rule policy on the configured state layout. A file that "
        "differs is never replaced without --force.",
    )
    minit.add_argument("dir")
    minit.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    minit.add_argument("--force", action="store_true", help="replace files that differ")
    minit.add_argument(
        "--layout",
        choices=("encoder", "seed"),
        default=None,
        help="state layout to fit the models on (default: the config's state.layout)",
    )
    minit.set_defaults(func=_models_init)
    mcheck = models.add_parser(
        "check", help="what the service makes of every model file in DIR (exit 1: one fails)"
    )
    mcheck.add_argument("dir")
    mcheck.add_argument("--json", action="store_true", help="a JSON list, one object a file")
    mcheck.set_defaults(func=_models_check)
    magree = models.add_parser(
        "agreement",
        help="each type's and each level's fused agreement with the rule teacher",
    )
    magree.add_argument("dir")
    magree.add_argument("--states", type=int, default=2000, help="(default: %(default)s)")
    magree.add_argument("--json", action="store_true")
    magree.set_defaults(func=_models_agreement)

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
    args = build_parser().parse_args(argv)
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
