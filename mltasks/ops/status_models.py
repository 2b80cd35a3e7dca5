"""How many models ``mltasks status`` expects, and how many load: from the workers'
reports, else by loading the level's ONNX files here (cached per folder state)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from mltasks.config import Config
from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.fallback.ladder import MODEL_QUEUES
from mltasks.ops.status_snapshot import ModelsInfo

# The status module's logger, as before this part moved here: log filters know it.
log = logging.getLogger("mltasks.ops.status")


def serving_types(config: Config, level: int = 3) -> tuple[str, ...]:
    """The types a worker of a model level loads: its fusion's, or all with preload: all."""
    if config.models.preload == "all":
        return MODEL_TYPES
    return tuple(config.models.fusion.for_level(level))


def expected_models(config: Config, level: int = 3) -> int:
    """Models each worker process of a model level loads: its fusion's types x 6."""
    return len(ARCHETYPES) * len(serving_types(config, level))


_files_cache: dict[tuple[Any, ...], dict[str, int]] = {}


def loadable_by_type(config: Config, level: int = 3) -> dict[str, int]:
    """Per type of the level's fusion, how many archetypes' files load and pass the
    family's checks, here. Cached per folder state (names, sizes, times), so a live screen
    refreshing every second loads them once."""
    from mltasks.errors import ModelError
    from mltasks.models.discovery import find
    from mltasks.models.loaded import load_model

    types = serving_types(config, level)
    present = []
    for a in ARCHETYPES:
        for t in types:
            found = find(config.models.dir, a, t)
            if found is None:
                continue
            try:
                st = found.path.stat()
            except OSError:
                continue
            present.append((a, t, found.path, st.st_size, st.st_mtime_ns))
    key = (str(config.models.dir.resolve()), *((str(p), s, m) for _, _, p, s, m in present))
    cached = _files_cache.get(key)
    if cached is not None:
        return dict(cached)
    counts = dict.fromkeys(types, 0)
    for a, t, p, _, _ in present:
        try:
            load_model(p, a, t, ["CPUExecutionProvider"])
        except ModelError:
            continue
        counts[t] += 1
    _files_cache.clear()
    _files_cache[key] = counts
    return dict(counts)


def count_loadable_models(config: Config, level: int = 3) -> int:
    """How many of a level's fusion files load here (used when no worker reports)."""
    return sum(loadable_by_type(config, level).values())


def _models(
    config: Config,
    health: Mapping[str, Mapping[str, Any]],
    live: Mapping[str, bool],
    count_files: Callable[[Config, int], int],
    serving: int = 3,
) -> ModelsInfo:
    """What the live model workers loaded.

    Their reports when they publish them (the fewest of them); when live workers do not
    report, the model files that load here; with no live model worker, nothing is loaded
    (the level's verdict says so already).
    """
    level = serving if serving in (1, 2, 3) else 3  # the models of the level in force
    expected = expected_models(config, level)
    fusion = {lv: dict(config.models.fusion.for_level(lv)) for lv in (1, 2, 3)}
    info = _models_count(config, health, live, count_files, expected, level)
    info.level, info.fusion = level, fusion
    if info.source == "files":
        with contextlib.suppress(Exception):  # onnxruntime missing here: counts unknown
            info.by_type = loadable_by_type(config, level)
    return info


def _models_count(
    config: Config,
    health: Mapping[str, Mapping[str, Any]],
    live: Mapping[str, bool],
    count_files: Callable[[Config, int], int],
    expected: int,
    level: int,
) -> ModelsInfo:
    model_queues = [q for q in MODEL_QUEUES if live.get(q)]
    if not model_queues:
        return ModelsInfo(None, expected, "no live model worker")
    reported = [
        int(doc["models_loaded"])
        for q, doc in health.items()
        if q in model_queues and isinstance(doc.get("models_loaded"), int)
    ]
    if reported:
        return ModelsInfo(min(reported), expected, "workers")
    try:
        return ModelsInfo(count_files(config, level), expected, "files")
    except Exception as exc:  # onnxruntime missing or broken here: unknown, not a crash
        log.warning(
            "cannot count the model files: %s", exc, extra={"event": "status_models_unknown"}
        )
        return ModelsInfo(None, expected, "unknown")
