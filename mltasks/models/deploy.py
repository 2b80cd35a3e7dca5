"""``mltasks models deploy | rollback | list``: the operator's side of model versions.

``deploy FILE --model <archetype>/<type>`` loads the file as a worker would (signature and a
probe batch, as ``models check``), stores it as a version (`mltasks.models.versions`), makes
it the candidate, and tells every worker through Celery's remote control channel
(``mltasks_models``). It prints the version id and exits 0 when the candidate is accepted for
the canary; a file that cannot serve is refused with the reason, exit 1, and nothing changes.
``--now`` makes it active at once, without the canary: unsafe, a bad file answers the game
from its first batch. ``rollback`` returns to the previous version at once; ``list`` shows
each model's active version, its candidate and the canary's progress, the last rollback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mltasks import keys
from mltasks.config import get_config
from mltasks.errors import ModelError
from mltasks.models import versions

NICE = 10
"""How much lower the operator's read-only commands run than the service (`lower_priority`)."""


def _models_dir(args: argparse.Namespace) -> Path:
    return Path(args.dir) if args.dir else Path(get_config().models.dir)


def _redis() -> Any:
    from mltasks.redisurl import cache_client

    return cache_client(get_config())


def _told(model: str, version: str, action: str) -> int:
    from mltasks.broker.celery_app import control_app
    from mltasks.models import control

    return len(control.broadcast(control_app(), model, version, action, reply=True))


def deploy_command(args: argparse.Namespace) -> int:
    from mltasks.models.loaded import load_model

    models_dir = _models_dir(args)
    try:
        archetype, model_type = versions.parse_model(args.model)
        source = Path(args.file)
        if not source.is_file():
            raise ModelError(f"{source}: no such file")
        model = load_model(source, archetype, model_type, ["CPUExecutionProvider"])
        check_live_states(model)
        version, stored = versions.store_file(
            models_dir, archetype, model_type, source, model.precision == "fp16"
        )
        name = f"{archetype}/{model_type}"
        prepare_variants(stored, archetype, model_type)
        try:  # a version deployed again starts its canary afresh
            _redis().delete(keys.canary_stats(name, version))
        except Exception as exc:
            print(f"mltasks: warning: canary totals not reset: {exc}", file=sys.stderr)
        pointer = versions.deploy(models_dir, archetype, model_type, stored, version, now=args.now)
    except ModelError as exc:
        print(f"mltasks: deploy refused, nothing changed: {exc}", file=sys.stderr)
        return 1
    told = _told(name, version, "deploy")
    print(version)
    if pointer.canary is not None:
        print(
            f"{name}@{version} accepted for the canary: it shadows {pointer.active_version} until"
            f" promoted or rolled back; {told} worker(s) told (others read the pointer)"
        )
    else:
        print(f"{name}@{version} is active now (no canary); {told} worker(s) told")
    return 0


CHECK_STATES = 256
"""Held-out states a deployed file must answer with finite values (`check_live_states`)."""


def check_live_states(model: Any) -> None:
    """Refuse a file that returns NaN or infinity on realistic states (the variants' fixed
    held-out set, 64 at a time; a sequence type sees each state as a monster with no
    history). The probe's two rows of 0.5 miss a file broken on low HP, say; such a file
    in canary replaced the candidate before it, which was then lost (issue 27). The shadow
    canary still guards live traffic. Raises ModelError."""
    import numpy as np

    from mltasks.models.variants import heldout_states

    states = np.asarray(heldout_states()[:CHECK_STATES], dtype=np.float32)
    bad = sum(
        int((~model.run(states[i : i + 64]).finite()).sum()) for i in range(0, len(states), 64)
    )
    if bad:
        raise ModelError(
            f"{model.path}: non-finite outputs on {bad} of {len(states)} held-out states"
        )


def prepare_variants(stored: Path, archetype: str, model_type: str) -> None:
    """Build (and on the CPU verify) the precision variants this host's levels serve the
    stored version in, here, before any worker hears of it: a worker then only opens a
    session, instead of quantising and checking agreement beside the batches it answers,
    which under load delayed them past the fallback ladder's queue-lag limit (issue 27).
    A failure is only a warning: the worker tries again, and the master serves."""
    from mltasks.models.engine import level_plan
    from mltasks.models.variants import CPU, ensure_variant, native, resolve

    cfg = get_config()
    for level in (1, 2, 3):
        chain, precision = level_plan(cfg, level)
        first = chain[0] if isinstance(chain[0], str) else chain[0][0]
        if precision == native(stored):
            continue
        try:
            if first == CPU:
                resolve(stored, precision, first)
            else:  # a GPU's verdict is the worker's to give, on its GPU
                ensure_variant(stored, precision)
        except Exception as exc:
            print(
                f"mltasks: warning: {archetype}/{model_type}: no {precision} variant: {exc}",
                file=sys.stderr,
            )


def lower_priority(by: int = NICE) -> None:
    """`models list` and `status`, often run in a loop on the live host, take the CPU after
    the service (nice 10): each costs about 1.5 CPU seconds, mostly imports. Deploy and
    rollback keep their priority: at nice 5 a deploy on the loaded 2-core test host took
    15-29 s instead of 3-7, past the 30 s a reload may take, and its 255s lasted as long
    (docs/PERFORMANCE.md, "Hot reload under load")."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(by)


def rollback_command(args: argparse.Namespace) -> int:
    models_dir = _models_dir(args)
    try:
        archetype, model_type = versions.parse_model(args.model)
        before = versions.read_pointer(models_dir, archetype, model_type)
        pointer = versions.rollback(models_dir, archetype, model_type, args.reason)
    except ModelError as exc:
        print(f"mltasks: rollback refused: {exc}", file=sys.stderr)
        return 1
    name = pointer.model
    told = _told(name, pointer.active_version or "", "rollback")
    last = pointer.last_rollback or {}
    if before is not None and before.canary is not None:
        print(f"{name}: candidate {last.get('from')} dropped; {pointer.active_version} serves")
    else:
        print(f"{name}: {pointer.active_version} serves again (was {last.get('from')})")
    print(f"{told} worker(s) told (others read the pointer)")
    return 0


def canary_progress(models: list[dict[str, Any]]) -> None:
    """Add each candidate's shadow totals (Redis) to `versions.list_models` rows."""
    wanted = [m for m in models if m.get("candidate")]
    if not wanted:
        return
    try:
        r = _redis()
        pipe = r.pipeline(transaction=False)
        for m in wanted:
            pipe.hgetall(keys.canary_stats(m["model"], m["candidate"]["version"]))
        for m, raw in zip(wanted, pipe.execute(), strict=True):
            m["candidate"]["progress"] = {k.decode(): float(v) for k, v in raw.items()}
    except Exception as exc:
        for m in wanted:
            m["candidate"]["progress"] = {"error": str(exc)}


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def render(models: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<32} {'active':<12} {'since':<21} {'via':<12} candidate / last rollback"]
    for m in models:
        a = m["active"] or {}
        extra = ""
        c = m.get("candidate")
        if c:
            extra = f"{c['version']} {c.get('state')}"
            prog = c.get("progress") or {}
            if "rows" in prog:
                extra += f" ({prog['rows']:.0f} rows, {prog.get('batches', 0):.0f} batches)"
            if c.get("reason"):
                extra += f": {c['reason']}"
        rb = m.get("last_rollback")
        if rb:
            extra += f"{'; ' if extra else ''}rolled back {rb['from']} at {_when(rb['at'])}"
        lines.append(
            f"{m['model']:<32} {a.get('version', '-'):<12} {_when(a.get('since')):<21} "
            f"{a.get('via', '-'):<12} {extra}"
        )
    return "\n".join(lines)


def list_command(args: argparse.Namespace) -> int:
    models = versions.list_models(_models_dir(args))
    canary_progress(models)
    print(json.dumps(models, indent=1) if args.json else render(models))
    return 0


def add_parsers(models: Any) -> None:
    """``models deploy``, ``models rollback``, ``models list`` under ``mltasks models``."""
    dep = models.add_parser(
        "deploy",
        help="check a model file, store it as a version and start its canary",
        description=__doc__,
    )
    dep.add_argument("file")
    dep.add_argument("--model", required=True, help="<archetype>/<type>, e.g. tank/combat_dqn")
    dep.add_argument(
        "--now",
        action="store_true",
        help="UNSAFE: active at once, without the shadow canary",
    )
    dep.add_argument("--dir", default=None, help="models folder (default: models.dir)")
    dep.set_defaults(func=deploy_command)
    rb = models.add_parser(
        "rollback", help="back to the previous version of a model at once (or drop its candidate)"
    )
    rb.add_argument("model", help="<archetype>/<type>")
    rb.add_argument("--reason", default="operator", help="recorded in the pointer")
    rb.add_argument("--dir", default=None, help="models folder (default: models.dir)")
    rb.set_defaults(func=rollback_command)
    ls = models.add_parser(
        "list", help="per model: active version and since when, candidate and canary progress"
    )
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--dir", default=None, help="models folder (default: models.dir)")
    ls.set_defaults(func=list_command, yield_cpu=NICE)
