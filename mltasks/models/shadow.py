"""Hot model swaps and the shadow canary, in each worker process.

**Swaps.** Before each batch the task calls `refresh` with its engine. It compares one file's
identity (``versions.generation``, one ``stat``) with the last it saw; when a pointer changed
(a deploy, a promotion, a rollback, here or on any host sharing the models folder) it reads
the pointers of the models it serves. A version it already holds (a promoted candidate) is
swapped in at once; another is loaded on a background thread while batches go on on the old
version, and swapped in before a later batch. Swaps happen only here, between batches: a batch
takes its fusion members once (`mltasks.serving.inference`), so it runs start to finish on one
version, and the old session is released when the last batch holding it is done
(reference counting).

The Celery remote control command ``mltasks_models`` (sent by ``mltasks models deploy`` and
``rollback``, and by a worker that promotes or rolls back) makes the next batch look at once
and replies with what the worker serves; a worker that missed it still sees the generation
file change, and a worker started later reads the pointers when it loads.

**Canary.** While a model has a candidate in ``canary`` state, the engine offers it for the
archetype's batches (``canary.share`` of them). The answering path records, for the rows the
active version computed, its output and seconds (`ShadowJob`); after the batch's answers are
written, `run_shadows` runs the candidate on the same rows and adds to the candidate's totals
in Redis (``keys.canary_stats``), shared by every worker: rows, batches, errors, non-finite
rows, rows whose top action matches the active version's, and both versions' seconds. The
first worker that sees a limit broken rolls the candidate back (`versions.reject`; a log line
``event=canary_rolled_back`` and ``ml_canary_rollbacks_total``); the first that sees enough
rows within every limit promotes it (`versions.promote`, ``event=canary_promoted``).

One module because the swaps and the canary share one per-process state (the swapper, the
shadow thread, the engine they act on) and the one remote control command that wakes both.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from celery import bootsteps

from mltasks import keys, metrics
from mltasks.config import CanaryConfig
from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.errors import ModelError
from mltasks.models import control, served, versions

if TYPE_CHECKING:
    from mltasks.models.engine import Engine
    from mltasks.models.loaded import LoadedModel

log = logging.getLogger(__name__)

STATS_TTL_S = 7 * 86400


@dataclass(slots=True)
class ShadowJob:
    """What the candidate is compared with: the active version's output for some rows."""

    archetype: str
    model_type: str
    candidate: Any  # LoadedModel
    states: np.ndarray
    windows: np.ndarray | None
    active_scores: np.ndarray | None
    active_seconds: float


@dataclass(slots=True)
class _Swapper:
    """This process's view of the pointers (per engine) and its pending background loads."""

    stamps: dict[int, tuple[int, int] | None] = field(default_factory=dict)  # per engine
    forced: set[int] = field(default_factory=set)  # engines to look again before their batch
    ready: list[tuple[int, tuple[str, str], str, Any]] = field(default_factory=list)
    loading: set[tuple[tuple[str, str], str]] = field(default_factory=set)
    since: dict[tuple[str, str], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_swapper = _Swapper()


def reset() -> None:
    """Forget what this process saw (a fresh engine, tests)."""
    global _swapper
    _swapper = _Swapper()


def notify() -> None:
    """The next batch reads the pointers (the control command, in a solo worker)."""
    _swapper.stamps.clear()


def _served(engine: Engine) -> list[tuple[str, str]]:
    types = MODEL_TYPES if engine.config.models.preload == "all" else tuple(engine.weights)
    return [(a, t) for a in ARCHETYPES for t in types]


def refresh(engine: Engine) -> None:
    """Between batches: swap in what is ready, and look at the pointers if they changed.
    Never raises: the batch is answered by what the engine holds."""
    try:
        _refresh(engine)
    except Exception as exc:
        log.error("model versions not refreshed: %s", exc, extra={"event": "refresh_failed"})


def _refresh(engine: Engine) -> None:
    sw = _swapper
    if sw.ready:
        with sw.lock:
            mine = [r for r in sw.ready if r[0] == id(engine)]
            sw.ready = [r for r in sw.ready if r[0] != id(engine)]
        for _, key, role, model in mine:
            _apply(engine, key, role, model)
    models_dir = engine.config.models.dir
    stamp = versions.generation_stamp(models_dir)
    if id(engine) in sw.stamps and stamp == sw.stamps[id(engine)]:
        return
    sw.stamps[id(engine)] = stamp
    for key in _served(engine):
        try:
            p = versions.read_pointer(models_dir, *key)
        except ModelError as exc:
            log.error("%s", exc, extra={"event": "pointer_unreadable", "model": "/".join(key)})
            continue
        if p is None:
            continue
        _reconcile(engine, key, p)


def _reconcile(engine: Engine, key: tuple[str, str], p: versions.Pointer) -> None:
    sw = _swapper
    current = engine.models.get(key)
    cand = engine.candidates.get(key)
    want = p.active_version
    if want is not None and (current is None or current.version != want):
        if cand is not None and cand.version == want:  # promoted: its session is ready
            engine.candidates.pop(key, None)
            metrics.set_model_version(cand.name, cand.version, "candidate", on=False)
            _swap_in(engine, key, cand)
            cand = None
        else:
            _load(engine, key, "active", p.path_of(p.active), want)
    canary = p.canary
    if canary is None:
        sw.since.pop(key, None)
        if cand is not None:
            engine.candidates.pop(key, None)
            metrics.set_model_version(cand.name, cand.version, "candidate", on=False)
            log.info(
                "%s: candidate %s dropped",
                p.model,
                cand.version,
                extra={"event": "candidate_dropped", "model": p.model},
            )
            served.publish(engine)
    else:
        sw.since[key] = float(canary.get("since") or time.time())
        if cand is None or cand.version != canary["version"]:
            engine.candidates.pop(key, None)
            _load(engine, key, "candidate", p.path_of(canary), str(canary["version"]))


def _load(engine: Engine, key: tuple[str, str], role: str, path: Path | None, version: str) -> None:
    sw = _swapper
    tag = (key, f"{id(engine)}:{role}@{version}")
    if path is None or tag in sw.loading:
        return
    sw.loading.add(tag)

    def work() -> None:
        model: Any = None
        try:
            model = engine.load_one(key[0], key[1], path, version)
        except ModelError as exc:
            log.error(
                "%s/%s@%s cannot load: %s",
                *key,
                version,
                exc,
                extra={"event": "version_load_failed", "model": "/".join(key)},
            )
            if role == "candidate":
                _decide(engine.config.models.dir, key, version, "rollback", f"cannot load: {exc}")
        finally:
            with sw.lock:
                sw.loading.discard(tag)
                if model is not None:
                    sw.ready.append((id(engine), key, role, model))

    threading.Thread(target=work, name=f"mltasks-load-{key[0]}-{key[1]}", daemon=True).start()


def _apply(engine: Engine, key: tuple[str, str], role: str, model: LoadedModel) -> None:
    """A background load is done: check it is still wanted, then swap it in."""
    try:
        p = versions.read_pointer(Path(engine.config.models.dir), *key)
    except ModelError:
        return
    if p is None:
        return
    if role == "active" and p.active_version == model.version:
        _swap_in(engine, key, model)
    elif role == "candidate" and p.canary is not None and p.canary["version"] == model.version:
        engine.candidates[key] = model
        metrics.set_model_version(model.name, model.version, "candidate")
        log.info(
            "%s: candidate %s shadows %s",
            model.name,
            model.version,
            p.active_version,
            extra={"event": "candidate_loaded", "model": model.name, "version": model.version},
        )
        served.publish(engine)


def _swap_in(engine: Engine, key: tuple[str, str], model: LoadedModel) -> None:
    old = engine.models.get(key)
    engine.models[key] = model  # the old session goes with the last batch that holds it
    engine.skipped.pop(model.name, None)
    metrics.observe_model_swap(model.name)
    if old is not None:
        metrics.set_model_version(old.name, old.version, "active", on=False)
    metrics.set_model_version(model.name, model.version, "active")
    log.info(
        "%s: now serving %s (was %s)",
        model.name,
        model.version,
        old.version if old is not None else "none",
        extra={"event": "model_swapped", "model": model.name, "version": model.version},
    )
    served.publish(engine)


# --- the shadow run ---------------------------------------------------------------------


class _Shadower:
    """One background thread per worker process runs the candidates, so a batch's task
    ends when its answers are written. Its queue holds two batches: when the candidate
    cannot keep up, batches go unshadowed rather than the game waiting."""

    def __init__(self) -> None:
        self.pid = 0
        self.queue: queue.Queue[tuple[Sequence[ShadowJob], Path, CanaryConfig, Any]] = queue.Queue(
            maxsize=2
        )
        self.skipped = 0

    def submit(
        self, jobs: Sequence[ShadowJob], models_dir: Path, config: CanaryConfig, r: Any
    ) -> None:
        if self.pid != os.getpid():  # a fresh process (a prefork child): its own thread
            self.pid = os.getpid()
            self.queue = queue.Queue(maxsize=2)
            threading.Thread(target=self._run, name="mltasks-shadow", daemon=True).start()
        try:
            self.queue.put_nowait((jobs, models_dir, config, r))
        except queue.Full:
            self.skipped += 1

    def _run(self) -> None:
        q = self.queue
        while True:
            jobs, models_dir, config, r = q.get()
            try:
                run_shadows(jobs, models_dir, config, r)
            except Exception as exc:  # never let the thread die
                log.warning("shadow run failed: %s", exc, extra={"event": "shadow_failed"})


_shadower = _Shadower()


def submit_shadows(
    jobs: Sequence[ShadowJob], models_dir: Path, config: CanaryConfig, r: Any
) -> None:
    """After the batch's answers are written: hand its shadow jobs to the shadow thread."""
    _shadower.submit(jobs, models_dir, config, r)


_FIELDS = ("rows", "batches", "errors", "non_finite", "agree", "candidate_s", "active_s")
FLUSH_S = 0.2
"""Totals go to Redis at most this often (at once when a row broke a limit)."""
_pending: dict[tuple[str, str, str, str], dict[str, float]] = {}
_flushed_at: dict[tuple[str, str, str, str], float] = {}


def run_shadows(jobs: Sequence[ShadowJob], models_dir: Path, config: CanaryConfig, r: Any) -> None:
    """The candidates on the rows their active versions computed; totals to Redis (shared
    by every worker); promotion or rollback when the totals say so."""
    for job in jobs:
        n = int(job.states.shape[0])
        t0 = time.thread_time()  # CPU seconds, as the active version's (mltasks.serving.inference)
        errors = non_finite = agree = 0
        try:
            out = job.candidate.run(job.states, job.windows)
        except Exception as exc:  # the candidate broke: counted, never the batch's problem
            errors = 1
            log.warning(
                "candidate %s@%s failed: %s",
                job.candidate.name,
                job.candidate.version,
                exc,
                extra={"event": "candidate_failed", "model": job.candidate.name},
            )
        else:
            finite = out.finite()
            non_finite = int((~finite).sum())
            if out.scores is not None and job.active_scores is not None:
                agree = int(
                    (
                        (np.argmax(out.scores, axis=1) == np.argmax(job.active_scores, axis=1))
                        & finite
                    ).sum()
                )
            else:
                agree = int(finite.sum())  # threat and value heads: no action to compare
        seconds = time.thread_time() - t0
        metrics.observe_canary_rows(job.candidate.name, n)
        ident = (job.archetype, job.model_type, job.candidate.name, job.candidate.version)
        acc = _pending.setdefault(ident, dict.fromkeys(_FIELDS, 0.0))
        for name, value in zip(
            _FIELDS, (n, 1, errors, non_finite, agree, seconds, job.active_seconds), strict=True
        ):
            acc[name] += value
        now = time.monotonic()
        if errors or non_finite or now - _flushed_at.get(ident, 0.0) >= FLUSH_S:
            _flush(ident, models_dir, config, r)
            _flushed_at[ident] = now


def _flush(
    ident: tuple[str, str, str, str], models_dir: Path, config: CanaryConfig, r: Any
) -> None:
    archetype, model_type, name, version = ident
    acc = _pending.pop(ident)
    key = keys.canary_stats(name, version)
    try:
        pipe = r.pipeline(transaction=False)
        for field_name in ("rows", "batches", "errors", "non_finite", "agree"):
            pipe.hincrby(key, field_name, int(acc[field_name]))
        pipe.hincrbyfloat(key, "candidate_s", acc["candidate_s"])
        pipe.hincrbyfloat(key, "active_s", acc["active_s"])
        pipe.expire(key, STATS_TTL_S)
        pipe.hgetall(key)
        stats = {k.decode(): float(v) for k, v in pipe.execute()[-1].items()}
    except Exception as exc:  # Redis away: the canary waits, the game does not
        log.warning("canary totals not kept: %s", exc, extra={"event": "canary_stats_failed"})
        return
    since = _swapper.since.get((archetype, model_type), time.time())
    decision, reason = verdict(stats, config, time.time() - since)
    if decision is not None:
        _decide(models_dir, (archetype, model_type), version, decision, reason, stats)


def verdict(stats: dict[str, float], config: CanaryConfig, age_s: float) -> tuple[str | None, str]:
    """("rollback" | "promote" | None, why) from a candidate's totals."""
    rows, batches = stats.get("rows", 0.0), stats.get("batches", 0.0)
    if batches and stats.get("errors", 0.0) / batches > config.max_error_rate:
        return "rollback", f"errors: {stats['errors']:.0f} of {batches:.0f} shadow runs failed"
    if rows and stats.get("non_finite", 0.0) / rows > config.max_non_finite_rate:
        return "rollback", f"non_finite: {stats['non_finite']:.0f} of {rows:.0f} rows"
    act, cand = stats.get("active_s", 0.0), stats.get("candidate_s", 0.0)
    if batches >= config.latency_min_batches and act > 0:
        ratio = cand / act
        if ratio > config.max_latency_ratio:
            return "rollback", (
                f"latency: {ratio:.2f}x the active version's over {batches:.0f} batches"
                f" (limit {config.max_latency_ratio:g})"
            )
    if rows >= config.min_rows and age_s >= config.min_seconds:
        agreement = stats.get("agree", 0.0) / rows
        if agreement < config.min_agreement:
            return "rollback", (
                f"agreement: {agreement:.3f} of {rows:.0f} rows (limit {config.min_agreement:g})"
            )
        ratio = cand / act if act > 0 else 1.0
        return "promote", (
            f"{rows:.0f} rows in {age_s:.0f}s, agreement {agreement:.3f}, latency {ratio:.2f}x"
        )
    return None, ""


def _decide(
    models_dir: Path,
    key: tuple[str, str],
    version: str,
    decision: str,
    reason: str,
    stats: dict[str, float] | None = None,
) -> None:
    name = "/".join(key)
    if decision == "promote":
        if not versions.promote(Path(models_dir), *key, version, reason):
            return  # another worker was first
        log.warning(
            "%s@%s promoted: %s",
            name,
            version,
            reason,
            extra={"event": "canary_promoted", "model": name, "version": version},
        )
        metrics.observe_canary_decision(name, "promoted", "")
    else:
        if not versions.reject(Path(models_dir), *key, version, reason):
            return
        limit = reason.split(":", 1)[0]
        log.error(
            "%s@%s rolled back: %s",
            name,
            version,
            reason,
            extra={"event": "canary_rolled_back", "model": name, "version": version},
        )
        metrics.observe_canary_decision(name, "rolled_back", limit)
    notify()
    if _worker_app is not None:  # else the generation file tells them
        control.broadcast(_worker_app, name, version, decision)


# The control commands this worker received, newest last: its `stats` show them (Flower's
# worker page, tab "Other": ``mltasks_models``), through `ModelsStep.info`.
_received: deque[str] = deque(maxlen=20)


# The app of the worker this process runs (`ModelsStep`): canary decisions broadcast with it.
_worker_app: Any = None


class ModelsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Adds ``mltasks_models`` to the worker's ``stats`` (``celery inspect stats``, Flower):
    the control commands received and the versions the pointers make active."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        global _worker_app
        super().__init__(worker, **kwargs)
        _worker_app = worker.app

    def info(self, worker: Any) -> dict[str, Any]:
        from mltasks.config import get_config

        serving: dict[str, str] = {}
        models_dir = Path(get_config().models.dir)
        for archetype in ARCHETYPES:
            for model_type in MODEL_TYPES:
                try:
                    p = versions.read_pointer(models_dir, archetype, model_type)
                except ModelError as exc:
                    serving[f"{archetype}/{model_type}"] = str(exc)
                    continue
                if p is None or p.active is None:
                    continue
                line = f"{p.active_version} active"
                if p.canary is not None:
                    line += f", candidate {p.canary['version']} in canary"
                if p.last_rollback:
                    line += f", last rollback {p.last_rollback['from']}"
                serving[p.model] = line
        return {
            "mltasks_models": {
                "control_command": f"celery -A mltasks control {control.COMMAND} <model> <version>",
                "received": list(_received),
                "versions": serving,
            }
        }


def _register() -> None:
    from celery.worker.control import control_command

    @control_command(  # type: ignore[untyped-decorator]
        args=[("model", str), ("version", str), ("action", str)],
        signature="<archetype>/<type> <version> <deploy|rollback|promote|...>",
    )
    def mltasks_models(
        state: Any, model: str = "", version: str = "", action: str = "refresh"
    ) -> dict[str, Any]:
        """A model's pointer changed: read the pointers before the next batch."""
        notify()
        _received.append(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}Z {action} {model}@{version}"
        )
        log.info(
            "control: %s %s@%s",
            action,
            model,
            version,
            extra={"event": "control_models", "model": model, "version": version},
        )
        return {"ok": f"{action} {model}@{version}: pointers re-read before the next batch"}


_register()
