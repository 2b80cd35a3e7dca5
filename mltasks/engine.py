"""ONNX model discovery and batched inference, one engine per worker process.

Sessions are made after the fork (first use or ``worker_process_init``), never at
import: an ONNX Runtime session does not survive a fork.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort

from mltasks.config import Config
from mltasks.contract import ARCHETYPES, MODEL_TYPES, N_ACTIONS, STATE_DIM
from mltasks.errors import ModelError
from mltasks.variants import CPU, CUDA, TENSORRT, Precision, ProviderSpec, providers_for, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    archetype: str
    model_type: str
    path: Path
    session: ort.InferenceSession
    input_name: str

    @property
    def name(self) -> str:
        return f"{self.archetype}/{self.model_type}"

    @property
    def source(self) -> str:
        return "model"

    def logits(self, states: np.ndarray) -> np.ndarray:
        """Run one batch; raises ModelError when the output breaks the model contract."""
        try:
            out = self.session.run(None, {self.input_name: states})[0]
        except Exception as exc:  # onnxruntime raises its own, untyped errors
            raise ModelError(f"{self.name}: inference failed: {exc}") from exc
        out = np.asarray(out)
        if out.shape != (states.shape[0], N_ACTIONS):
            raise ModelError(f"{self.name}: returned shape {out.shape} for {states.shape[0]} rows")
        return out


def model_path(models_dir: Path, archetype: str, model_type: str) -> Path:
    """Only names from the contract ever reach a path: never a value read from the database."""
    if archetype not in ARCHETYPES or model_type not in MODEL_TYPES:
        raise ModelError(f"unknown model {archetype}/{model_type}")
    return models_dir / archetype / f"{model_type}.onnx"


_PROVIDERS = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}


def level_plan(config: Config, level: int) -> tuple[list[ProviderSpec], Precision]:
    """(providers, precision) of a model level as this host can run it.

    A GPU level that finds no GPU runs like the CPU level, precision included: FP16 on
    the CPU would be the slowest choice of all.
    """
    provider, precision = config.fallback.level_profile(level)
    if config.hardware.device == "cpu":
        provider = "cpu"
    chain = providers_for(_PROVIDERS[provider], config.hardware.gpu_device_id)
    if chain[0] == CPU and provider != "cpu":
        precision = config.fallback.level_profile(3)[1]
    return chain, cast(Precision, precision)


def load_model(
    path: Path,
    archetype: str,
    model_type: str,
    config: Config,
    providers: list[ProviderSpec] | None = None,
) -> LoadedModel:
    """Load and check one model: input [N, 64] float32, output [N, 10]."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.inference.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(path), sess_options=opts, providers=providers or level_plan(config, 3)[0]
        )
    except Exception as exc:
        raise ModelError(f"{path}: cannot load: {exc}") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one input, found {len(inputs)}")
    shape = inputs[0].shape
    if len(shape) != 2 or shape[1] != STATE_DIM:
        raise ModelError(f"{path}: input shape {shape}, expected [N, {STATE_DIM}]")
    model = LoadedModel(archetype, model_type, path, session, inputs[0].name)
    # Probe with two rows: catches a fixed batch dimension and a wrong output width.
    model.logits(np.zeros((2, STATE_DIM), dtype=np.float32))
    return model


class Engine:
    """The models of one process at one fallback level, keyed by (archetype, model_type)."""

    def __init__(self, config: Config, level: int = 3) -> None:
        self.config = config
        self.level = level
        self.models: dict[tuple[str, str], LoadedModel] = {}
        self.skipped: dict[str, str] = {}

    def load(self) -> Engine:
        cfg = self.config.models
        types = MODEL_TYPES if cfg.preload == "all" else (cfg.serve_model_type,)
        chain, precision = level_plan(self.config, self.level)
        for archetype in ARCHETYPES:
            for model_type in types:
                path = model_path(cfg.dir, archetype, model_type)
                if not path.is_file():
                    self.skipped[f"{archetype}/{model_type}"] = "missing"
                    continue
                try:
                    self.models[(archetype, model_type)] = load_model(
                        self._variant(path, precision, chain),
                        archetype,
                        model_type,
                        self.config,
                        chain,
                    )
                except ModelError as exc:
                    self.skipped[f"{archetype}/{model_type}"] = str(exc)
                    log.error(
                        "model skipped: %s",
                        exc,
                        extra={"event": "model_skipped", "model": f"{archetype}/{model_type}"},
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

    @staticmethod
    def _variant(master: Path, precision: Precision, chain: list[ProviderSpec]) -> Path:
        """The accepted precision variant of a master, or the master itself."""
        if precision == "fp32":
            return master
        first = chain[0] if isinstance(chain[0], str) else chain[0][0]
        try:
            return resolve(master, precision, first)[0]
        except Exception as exc:  # unwritable folder, converter failure: the master serves
            log.warning(
                "no %s variant of %s, serving fp32: %s",
                precision,
                master,
                exc,
                extra={"event": "variant_unavailable", "model": str(master)},
            )
            return master

    def serving(self, archetype: str) -> LoadedModel | None:
        """The model that answers this archetype, or None (its requests then get 255)."""
        return self.models.get((archetype, self.config.models.serve_model_type))


_engines: dict[int, Engine] = {}
_lock = threading.Lock()


def get_engine(config: Config, level: int = 3) -> Engine:
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
