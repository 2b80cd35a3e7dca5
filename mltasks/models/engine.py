"""The models of one worker process at one fallback level, and what each archetype fuses.

A level's engine loads, per archetype, the types its fusion names (``models.fusion``; every
type with ``models.preload: all``) through discovery (`mltasks.models.discovery`), places and
probes each file (`mltasks.models.loaded`), and hands the answering path the members of an
archetype's fusion. A file that cannot serve is skipped with one ERROR line naming it.

Sessions are made after the fork (first use or ``worker_process_init``), never at import:
an ONNX Runtime session does not survive a fork.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np

from mltasks.config import Config
from mltasks.contract import ARCHETYPES, MODEL_TYPES, STATE_DIM
from mltasks.errors import ModelError
from mltasks.fallback.ladder import Level, Precision
from mltasks.models.discovery import find
from mltasks.models.loaded import LoadedModel, load_model
from mltasks.models.merged import Merged, merge, same_models
from mltasks.models.variants import (
    CPU,
    CUDA,
    TENSORRT,
    ProviderSpec,
    native,
    providers_for,
    resolve,
)
from mltasks.models.versions import version_of

log = logging.getLogger(__name__)


_PROVIDERS = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}


def level_plan(config: Config, level: int) -> tuple[list[ProviderSpec], Precision]:
    """(providers, precision) of a model level as this host can run it: its
    ``fallback.levelN`` (`mltasks.fallback.ladder`), degraded to what the host has.

    A GPU level that finds no GPU runs like the CPU level, precision included: FP16 on
    the CPU would be the slowest choice of all.
    """
    provider, precision = config.fallback.level_profile(level)
    if config.hardware.device == "cpu":
        provider = "cpu"
    chain = providers_for(_PROVIDERS[provider], config.hardware.gpu_device_id)
    if chain[0] == CPU and provider != "cpu":
        precision = config.fallback.level_profile(Level.CPU)[1]
    return chain, cast(Precision, precision)


class Engine:
    """The models of one process at one fallback level, keyed by (archetype, model_type)."""

    def __init__(self, config: Config, level: int = Level.CPU) -> None:
        self.config = config
        self.level = level
        self.weights = config.models.fusion.for_level(level)
        self.models: dict[tuple[str, str], LoadedModel] = {}
        self.skipped: dict[str, str] = {}
        # Canary candidates loaded beside the active versions (mltasks.models.shadow).
        self.candidates: dict[tuple[str, str], LoadedModel] = {}
        # Per archetype: the members a merged session was last built for, and it (None:
        # they cannot be merged). Built off the batch path (`merged`).
        self._merged: dict[str, tuple[tuple[LoadedModel, ...], Merged | None]] = {}
        self._merging: set[str] = set()
        self._merge_lock = threading.Lock()

    def load(self) -> Engine:
        cfg = self.config.models
        types = MODEL_TYPES if cfg.preload == "all" else tuple(self.weights)
        chain, precision = level_plan(self.config, self.level)
        for archetype in ARCHETYPES:
            for model_type in types:
                name = f"{archetype}/{model_type}"
                found = find(cfg.dir, archetype, model_type)
                if found is None:
                    self.skipped[name] = "missing"
                    continue
                try:
                    self.models[(archetype, model_type)] = self.load_one(
                        archetype, model_type, found.path, found.version
                    )
                except ModelError as exc:
                    self.skipped[name] = str(exc)
                    log.error(
                        "model skipped: %s", exc, extra={"event": "model_skipped", "model": name}
                    )
        log.info(
            "level %d: %d models loaded from %s as %s on %s (%d missing or skipped)",
            self.level,
            len(self.models),
            cfg.dir,
            precision,
            chain[0] if isinstance(chain[0], str) else chain[0][0],
            len(self.skipped),
            extra={"event": "models_loaded", "count": len(self.models), "level": self.level},
        )
        return self

    def load_one(
        self, archetype: str, model_type: str, master: Path, version: str | None = None
    ) -> LoadedModel:
        """One model file as this level serves it (its precision variant where one is
        built), tagged with the master's version. Raises ModelError."""
        chain, precision = level_plan(self.config, self.level)
        path = self._variant(master, model_type, precision, chain)
        return load_model(
            path,
            archetype,
            model_type,
            chain,
            self.config.inference.intra_op_threads,
            version or version_of(master),
        )

    def shadows(self, archetype: str) -> dict[str, LoadedModel]:
        """Candidates in canary for an archetype's fusion members, by type
        (`mltasks.models.shadow`): they run beside the active version, never answer."""
        if not self.candidates or random.random() >= self.config.canary.share:
            return {}
        return {t: c for (a, t), c in self.candidates.items() if a == archetype}

    @staticmethod
    def _variant(
        master: Path, model_type: str, precision: Precision, chain: list[ProviderSpec]
    ) -> Path:
        """The level's precision of a master, built from it and accepted on agreement
        (`mltasks.models.variants`), or the master itself: an FP16 export serves the CPU
        level as its FP32 variant, and INT8 is quantised from that."""
        if precision == native(master):
            return master
        first = chain[0] if isinstance(chain[0], str) else chain[0][0]
        try:
            return resolve(master, precision, first)[0]
        except Exception as exc:  # unwritable folder, converter failure: the master serves
            log.warning(
                "no %s variant of %s, serving the master: %s",
                precision,
                master,
                exc,
                extra={"event": "variant_unavailable", "model": str(master)},
            )
            return master

    def fusion(self, archetype: str) -> list[tuple[LoadedModel, float]]:
        """The loaded members of this level's fusion for an archetype, in the family's
        order, with their weights; empty when none is loaded (its requests get 255)."""
        return [
            (m, w)
            for t, w in self.weights.items()
            if (m := self.models.get((archetype, t))) is not None
        ]

    def merged(self, archetype: str, members: Sequence[LoadedModel]) -> Merged | None:
        """The merged session of exactly these members (`mltasks.models.merged`), or None
        while there is none: then it is built on a thread of its own (about 50 ms a set
        here, never on a batch's path) and the members answer one call each meanwhile."""
        if not self.config.models.merge_max_mb:
            return None
        built = self._merged.get(archetype)
        if built is not None and same_models(built[0], members):
            return built[1]
        with self._merge_lock:
            if archetype in self._merging:
                return None
            self._merging.add(archetype)
        threading.Thread(
            target=self._merge, args=(archetype, tuple(members)), name="mltasks-merge", daemon=True
        ).start()
        return None

    def merge_all(self) -> None:
        """Build every archetype's merged session now (a worker's start, before batches)."""
        if not self.config.models.merge_max_mb:
            return
        for archetype in ARCHETYPES:
            members = [m for m, _ in self.fusion(archetype)]
            if members:
                with self._merge_lock:
                    self._merging.add(archetype)
                self._merge(archetype, tuple(members))

    def _merge(self, archetype: str, members: tuple[LoadedModel, ...]) -> None:
        try:
            merged = merge(
                members, _probe_states(self.config), self.config.models.merge_max_mb * 1024 * 1024
            )
        except Exception as exc:  # never fails the worker: the members serve alone
            log.warning("merging %s failed: %s", archetype, exc, extra={"event": "merge_failed"})
            merged = None
        with self._merge_lock:
            self._merged[archetype] = (members, merged)
            self._merging.discard(archetype)

    def loaded_types(self) -> dict[str, int]:
        """Archetypes loaded per model type this engine serves (status and metrics): its
        fusion's types, or all nine with ``models.preload: all``."""
        served = MODEL_TYPES if self.config.models.preload == "all" else tuple(self.weights)
        counts = dict.fromkeys(served, 0)
        for _, model_type in self.models:
            counts[model_type] = counts.get(model_type, 0) + 1
        return counts


def _probe_states(config: Config) -> np.ndarray:
    """States a merged session must answer exactly as its members: plausible ones of the
    configured layout, and the load probe's constant rows."""
    from mltasks.state import sample_states

    plausible = sample_states(np.random.default_rng(0), 30, config.state.layout)
    return np.concatenate([plausible, np.full((2, STATE_DIM), 0.5)]).astype(np.float32)


_engines: dict[int, Engine] = {}
_lock = threading.Lock()


def get_engine(config: Config, level: int = Level.CPU) -> Engine:
    """This process's engine for a model level (1-3), loaded on first use."""
    with _lock:
        engine = _engines.get(level)
        if engine is None or engine.config is not config:
            engine = _engines[level] = Engine(config, level).load()
        return engine


def reset_engine() -> None:
    """Forget the loaded models (tests; a worker child after fork)."""
    with _lock:
        _engines.clear()
