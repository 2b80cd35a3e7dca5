"""Which queue a batch goes to: the tier the service stands on now."""

from __future__ import annotations

from mltasks.config import Config
from mltasks.hardware import cuda_usable


def initial_queue(config: Config) -> str:
    """``gpu`` when this host can run the GPU tier, else ``cpu``."""
    return "gpu" if cuda_usable(config.hardware) else "cpu"
