"""Which execution provider a process can use. Clean when no driver or GPU exists."""

from __future__ import annotations

import contextlib
import logging

from mltasks.config import HardwareConfig

log = logging.getLogger(__name__)


def gpu_count() -> int:
    """NVIDIA devices visible through NVML; 0 when there is no driver or no device."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no libnvidia-ml, no driver: the normal case on a CPU host
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def cuda_usable(hw: HardwareConfig) -> bool:
    """True when ONNX Runtime has its CUDA provider and a device is present."""
    if hw.device == "cpu":
        return False
    import onnxruntime as ort

    usable = "CUDAExecutionProvider" in ort.get_available_providers() and gpu_count() > 0
    if hw.device == "cuda" and not usable:
        log.warning(
            "hardware.device is cuda but no usable GPU: using the CPU",
            extra={"event": "gpu_unavailable"},
        )
    return usable
