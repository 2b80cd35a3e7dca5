"""The mltasks command: db init, models init, bridge, worker, beat, flower, dev, status, bench,
experience.

Every command reads config/mltasks.yaml (or --config, or $MLTASKS_CONFIG); an invalid one
stops it with one line naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from mltasks.config import get_config, load_config, set_config
from mltasks.errors import MLTasksError
from mltasks.fallback.ladder import JOBS_QUEUE, QUEUE_LEVELS, QUEUES, spell_levels


def _db_init(args: argparse.Namespace) -> int:
    from psycopg.conninfo import conninfo_to_dict

    from mltasks.db import create_database_if_missing, init_schema
    from mltasks.errors import DatabaseError

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
        try:
            init_schema(cfg.database)
        except DatabaseError as exc:
            if "does not exist" not in str(exc):
                raise
            raise DatabaseError(
                f"{str(exc).rstrip()}\nThe database or its role does not exist yet: "
                "mltasks db init --create creates both (as postgres, or --admin-url)."
            ) from exc
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

    from mltasks.files import write_atomic
    from mltasks.models.agreement import agreement, render
    from mltasks.models.demo import demo_models, model_file

    cfg = get_config()
    layout = args.layout or cfg.state.layout
    target = Path(args.dir)
    t0 = time.perf_counter()
    models = list(demo_models(seed=args.seed, layout=layout, profile=args.profile))
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
        f" (profile {args.profile}, state layout {layout}"
        f"{'; replaced ' + str(len(differing)) if differing else ''})"
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
    # `python -m bridge` takes this process's place, as Celery does for worker and beat: the
    # core never imports the processes built on it (tests/unit/test_layout.py).
    return _become([sys.executable, "-m", "bridge"])


def _worker(args: argparse.Namespace) -> int:
    from mltasks.broker.celery_app import worker_command

    cmd = worker_command(args.queues, "--loglevel", args.loglevel, *args.celery_args)
    return _become(cmd)


def _beat(args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "celery", "-A", "mltasks", "beat", "--loglevel", args.loglevel]
    return _become([*cmd, *args.celery_args])


def _become(cmd: list[str]) -> int:
    """Celery takes this process's place: a signal to `mltasks worker` (systemd's SIGTERM,
    Ctrl-C) reaches Celery itself, where a child would outlive a SIGTERM to its parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _flower(args: argparse.Namespace) -> int:
    conf = Path(__file__).parent / "ops" / "flowerconfig.py"
    cmd = [sys.executable, "-m", "celery", "-A", "mltasks", "flower", f"--conf={conf}"]
    extra = list(args.flower_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return _become([*cmd, *extra])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (their line breaks kept) but without reStructuredText's
    backticks, and every option's default shown (unless its help already says it)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain(action.help or "")
        shown = _default(action)
        if shown is None or "default" in text.lower():
            return text
        return f"{text} (default: {shown.replace('%', '%%')})"


def _default(action: argparse.Action) -> str | None:
    """An option's default as help shows it; None when there is none worth showing."""
    default = action.default
    if (
        not action.option_strings
        or default is None
        or isinstance(default, bool)
        or default is argparse.SUPPRESS
    ):
        return None
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default))
    return str(default)


def plain(text: str) -> str:
    """``x`` and `x` as x: help is read on a terminal, not rendered."""
    return re.sub(r"``?([^`]+?)``?", r"\1", text)


def _plain_everywhere(parser: argparse.ArgumentParser) -> None:
    """The one formatter on this parser and every subcommand's, however they were added."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if action.help is None and _default(action) is not None:
            action.help = "(default: %(default)s)"
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _plain_everywhere(sub)
            for choice in action._choices_actions:
                choice.help = plain(choice.help or "")


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named on a command line (``--config FILE`` may come first)."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


# Commands whose modules are imported only to run them (or for ``--help``, or an unknown
# command's error): the benchmark's imports cost 1.1 CPU seconds, which an operator's
# ``models deploy`` on a loaded live host took from the service's batches (issue 27); dev's
# and status's 0.6 more made ``models rollback`` wait past 5 s there.
HEAVY_COMMANDS = ("bench", "dev", "status", "experience")
KNOWN_COMMANDS = ("db", "models", "bridge", "worker", "beat", "flower", *HEAVY_COMMANDS)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with ``command``, of `HEAVY_COMMANDS` only its own."""
    p = argparse.ArgumentParser(prog="mltasks", description=__doc__)
    p.add_argument("--config", help="a YAML file (default: $MLTASKS_CONFIG or config/mltasks.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_cmd", required=True)
    init = db.add_parser(
        "init",
        help="apply sql/schema.sql (idempotent)",
        description="Apply sql/schema.sql to the configured database (idempotent). The "
        "database and its role must exist: --create makes them first.",
    )
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
        "--profile",
        choices=("demo", "phase11"),
        default="demo",
        help="demo (default): small networks, written in seconds. phase11: the fork's nine "
        "architectures at their default sizes (MODELS.md: 0.15M-19M parameters, about 460 MB "
        "for the 54), written in a few minutes, to measure what real models cost; their "
        "trunks are random weights, and each decision head adds the demo profile's small "
        "network fitted to the rule policy, so they answer sensibly",
    )
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
    from mltasks.models.deploy import add_parsers as add_deploy

    add_deploy(models)

    br = sub.add_parser(
        "bridge",
        help="run a bridge (the same as python -m bridge)",
        description="Claim the game's requests from PostgreSQL and send them to the workers "
        "as batches, until SIGINT or SIGTERM. Run one or more: they never claim a row twice.",
    )
    br.set_defaults(func=_bridge)

    wk = sub.add_parser(
        "worker",
        help="run a Celery worker (celery -A mltasks worker -Q ...)",
        description="A Celery worker on the given queues ("
        + ", ".join(f"{q}: {spell_levels(QUEUE_LEVELS[q])}" for q in QUEUES)
        + "); any further arguments go to celery worker, e.g. --pool solo.",
    )
    wk.add_argument(
        "-Q", "--queues", default=JOBS_QUEUE, help="comma-separated: " + ", ".join(QUEUES)
    )
    wk.add_argument("--loglevel", default="INFO", help="Celery's own level (ours: logging.level)")
    wk.set_defaults(func=_worker, celery_args=[])  # the rest of the line: to celery worker

    bt = sub.add_parser(
        "beat",
        help="run beat: cleanup and fallback recovery (celery -A mltasks beat)",
        description="Celery beat: deletes finished rows and climbs the fallback ladder back "
        "up. Run exactly one.",
    )
    bt.add_argument("--loglevel", default="WARNING", help="Celery's own level")
    bt.set_defaults(func=_beat, celery_args=[])  # the rest of the line: to celery beat

    fl = sub.add_parser("flower", help="run Flower behind basic auth (MLTASKS_FLOWER_PASSWORD)")
    fl.set_defaults(func=_flower, flower_args=[])  # the rest of the line: to celery flower

    def wanted(name: str) -> bool:  # its own command, --help, or an unknown command's error
        return command == name or command not in KNOWN_COMMANDS

    if wanted("bench"):
        try:
            from mltasks.bench.cli import add_parser as add_bench
        except ImportError:  # the bench package is optional at import time
            pass
        else:
            add_bench(sub)
    if wanted("dev"):
        from mltasks.ops.dev import add_parser as add_dev

        add_dev(sub)
    if wanted("status"):
        from mltasks.ops.status import add_parser as add_status

        add_status(sub)
    if wanted("experience"):
        from mltasks.experience.cli import add_parser as add_experience

        add_experience(sub)
    _plain_everywhere(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_command_of(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    if extra:  # worker, beat and flower hand what they do not know to Celery
        passthrough = next((n for n in ("celery_args", "flower_args") if hasattr(args, n)), None)
        if passthrough is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, passthrough, [*extra, *getattr(args, passthrough)])
    try:
        if getattr(args, "yield_cpu", False):  # an operator's command on the live host
            from mltasks.models.deploy import lower_priority

            lower_priority(int(args.yield_cpu))
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
