"""`mltasks experience record` and `mltasks experience export DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _record(args: argparse.Namespace) -> int:
    from mltasks.experience.recorder import main

    return main()


def _export(args: argparse.Namespace) -> int:
    from mltasks.config import get_config
    from mltasks.db import connect, wrap_errors
    from mltasks.experience.export import export

    cfg = get_config()
    target = Path(args.dir)
    with connect(cfg.database) as conn, wrap_errors("exporting experience"):
        written = export(conn, target)
    for archetype, n in written.items():
        print(f"{target / (archetype + '.npz')}: {n} transitions")
    if not written:
        print(f"no transitions recorded in {cfg.database.safe_dsn}: nothing written")
    return 0


def add_parser(subparsers: Any) -> None:
    ex = subparsers.add_parser(
        "experience", help="answered decisions kept as transitions for training"
    ).add_subparsers(dest="experience_cmd", required=True)
    rec = ex.add_parser(
        "record",
        help="run the recorder (python -m mltasks.experience) until SIGINT or SIGTERM",
        description="Every experience.interval_s, move answered requests into ai_experience "
        "as transitions (state, action, next state of the same monster), bounded by "
        "experience.retention_s and experience.max_rows. A process of its own, off the "
        "answer path; run one (a second one skips its rounds). Exits at once when "
        "experience.enabled is false.",
    )
    rec.set_defaults(func=_record)
    exp = ex.add_parser(
        "export",
        help="write DIR/<archetype>.npz of the recorded transitions",
        description="One .npz per archetype with state [N,64] float32, action [N], "
        "next_state [N,64], source, model, confidence and more (docs/models.md, section "
        "Experience); numpy reads it with allow_pickle=False. Files are replaced atomically.",
    )
    exp.add_argument("dir")
    exp.set_defaults(func=_export)
