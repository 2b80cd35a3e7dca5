"""Health probes for the degradation ladder: GPU memory, CPU load, RAM, queue lag.

``read_probes`` takes a snapshot cheaply enough to call before every batch
(well under 5 ms, nothing that sleeps); ``assess`` is a pure function of a
snapshot and thresholds, so every rule can be tested with hand-made readings.
``is_oom_error`` lets a worker treat an allocation failure as "step down a
tier" rather than as a crash.

A host without an NVIDIA driver or device is a normal case, not an error: the
readings then say ``gpu_present=False`` with ``gpu_status="no GPU"``.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import psutil
import pynvml  # ctypes only, no NVML call: importing it in a probe cost ~10 ms

from mltasks.fallback.ladder import LADDER
from mltasks.fallback.ladder import ProbeTier as Tier

TIERS: Final[tuple[Tier, ...]] = tuple(r.probe for r in LADDER if r.probe is not None)
"""In fallback order: level 1, 2, 3 (the ladder's probed levels)."""

NO_GPU: Final = "no GPU"


@dataclass(frozen=True, slots=True)
class Readings:
    """One snapshot of the host. VRAM figures are None when there is no GPU or NVML failed."""

    gpu_present: bool
    vram_used_bytes: int | None
    vram_total_bytes: int | None
    cpu_load_per_core: float
    ram_used_fraction: float
    queue_lag_s: float | None
    taken_at: float
    """Wall-clock seconds (``time.time()``), for logs and metrics."""
    cpu_percent: float | None = None
    """Host CPU use since the previous reading; None on the first (no baseline yet)."""
    gpu_status: str = ""
    """"ok", "no GPU", or the NVML error that hid the device."""

    @property
    def vram_used_fraction(self) -> float | None:
        if not self.vram_total_bytes or self.vram_used_bytes is None:
            return None
        return self.vram_used_bytes / self.vram_total_bytes


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Limits beyond which a tier is taken out of service.

    vram_fraction 0.95: the FP16 tier's arena grows per batch shape, and the last
      5% is where a larger batch fails to allocate; INT8 needs far less, so only
      the FP16 tier is gated on it.
    cpu_load_per_core 2.0: the workers run one intra-op thread each and are sized
      to the cores, so a load of 1 per core is full use by design; above 2 every
      inference gets at most half a core and its latency at least doubles, which
      the 100 ms budget does not absorb.  (4.0 would let latency quadruple first.)
    queue_lag_s 0.05: half of the default 100 ms latency budget
      (``inference.max_latency_ms``); once requests wait that long before a worker
      takes them, the rest of the budget cannot cover batching and inference.
      ``for_latency_budget`` derives it from another budget.
    ram_fraction 0.95: beyond it the kernel's OOM killer, not the worker, picks
      what dies; the CPU tier is the one that allocates host memory per batch.
    """

    vram_fraction: float = 0.95
    cpu_load_per_core: float = 2.0
    queue_lag_s: float = 0.05
    ram_fraction: float = 0.95

    @classmethod
    def for_latency_budget(cls, max_latency_ms: int) -> Thresholds:
        """Defaults with the queue-lag limit at half of the given latency budget."""
        return cls(queue_lag_s=max_latency_ms / 2000.0)


@dataclass(frozen=True, slots=True)
class TierHealth:
    tier: Tier
    healthy: bool
    reasons: tuple[str, ...] = ()

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Health of every tier, in fallback order."""

    tiers: tuple[TierHealth, ...]

    def __getitem__(self, tier: Tier) -> TierHealth:
        for t in self.tiers:
            if t.tier == tier:
                return t
        raise KeyError(tier)

    def healthy(self, tier: Tier) -> bool:
        return self[tier].healthy

    def reason(self, tier: Tier) -> str | None:
        return self[tier].reason

    @property
    def best(self) -> Tier | None:
        """The first healthy tier in fallback order, or None (answer with the rules)."""
        return next((t.tier for t in self.tiers if t.healthy), None)


def _exceeds(value: float, limit: float) -> bool:
    """True when value > limit; a NaN or infinite reading counts as exceeding (fail safe)."""
    return not (math.isfinite(value) and value <= limit)


def assess(readings: Readings, thresholds: Thresholds | None = None) -> Verdict:
    """Which tiers may serve, and why the others may not. Pure: no I/O, no clock."""
    th = thresholds or Thresholds()
    gpu: list[str] = []
    if not readings.gpu_present:
        gpu.append(f"GPU missing ({readings.gpu_status or NO_GPU})")
    fp16 = list(gpu)
    vram = readings.vram_used_fraction
    # Unknown VRAM (NVML without memory info) does not gate: an allocation failure
    # still steps the worker down through is_oom_error.
    if readings.gpu_present and vram is not None and _exceeds(vram, th.vram_fraction):
        fp16.append(f"VRAM {vram:.1%} above {th.vram_fraction:.0%}")
    cpu: list[str] = []
    if _exceeds(readings.cpu_load_per_core, th.cpu_load_per_core):
        cpu.append(f"load {readings.cpu_load_per_core:.2f}/core above {th.cpu_load_per_core:g}")
    if readings.queue_lag_s is not None and _exceeds(readings.queue_lag_s, th.queue_lag_s):
        cpu.append(
            f"queue lag {readings.queue_lag_s * 1000:.0f} ms above {th.queue_lag_s * 1000:g} ms"
        )
    if _exceeds(readings.ram_used_fraction, th.ram_fraction):
        cpu.append(f"RAM {readings.ram_used_fraction:.1%} above {th.ram_fraction:.0%}")
    return Verdict(
        (
            TierHealth("gpu_fp16", not fp16, tuple(fp16)),
            TierHealth("gpu_int8", not gpu, tuple(gpu)),
            TierHealth("cpu", not cpu, tuple(cpu)),
        )
    )


# --------------------------------------------------------------------------- probes


class _Nvml:
    """NVML initialised once per process, with a back-off when there is no driver.

    Initialising per reading would re-``dlopen`` the library each time on a CPU
    host; keeping it open on a GPU host makes a reading a couple of NVML calls.
    The pid check re-initialises in a forked child.
    """

    RETRY_S: Final = 60.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.ok = False
        self.error = NO_GPU
        self.next_try = 0.0

    def _init(self) -> None:
        now = time.monotonic()
        if self.pid == os.getpid() and (self.ok or now < self.next_try):
            return
        self.pid, self.ok, self.next_try = os.getpid(), False, now + self.RETRY_S
        try:
            pynvml.nvmlInit()
            self.ok = True
        except Exception:  # no libnvidia-ml or no driver: the normal case on a CPU host
            self.error = NO_GPU

    def memory(self, device_id: int) -> tuple[bool, int | None, int | None, str]:
        """(present, used, total, status) for one device; never raises."""
        with self.lock:
            self._init()
            if not self.ok:
                return False, None, None, self.error
            try:
                if device_id >= int(pynvml.nvmlDeviceGetCount()):
                    return False, None, None, NO_GPU
                handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
            except Exception as exc:  # device lost, driver unloaded: re-init later
                self.ok = False
                return False, None, None, f"NVML: {exc}"
            try:
                info: Any = pynvml.nvmlDeviceGetMemoryInfo(handle)
                return True, int(info.used), int(info.total), "ok"
            except Exception as exc:  # present, but no memory figures (some vGPU/MIG)
                return True, None, None, f"VRAM unknown: {exc}"

    def shutdown(self) -> None:
        with self.lock:
            if self.ok and self.pid == os.getpid():
                with contextlib.suppress(Exception):
                    pynvml.nvmlShutdown()
            self.pid, self.ok, self.next_try = None, False, 0.0


_nvml = _Nvml()
_cores = psutil.cpu_count(logical=True) or 1
_cpu_primed = False


def read_probes(queue_lag_s: float | None = None, *, device_id: int = 0) -> Readings:
    """Snapshot the host without blocking (no sampling interval anywhere).

    ``queue_lag_s`` is the caller's: the age of the oldest request still waiting
    in the worker's queue.  Load is the 1-minute average over logical cores;
    CPU percent uses psutil's non-blocking form (relative to the previous call
    in this process, hence None on the first).
    """
    global _cpu_primed
    present, used, total, status = _nvml.memory(device_id)
    load1, _, _ = psutil.getloadavg()
    percent: float | None = psutil.cpu_percent(interval=None)
    if not _cpu_primed:
        _cpu_primed, percent = True, None
    mem = psutil.virtual_memory()
    return Readings(
        gpu_present=present,
        vram_used_bytes=used,
        vram_total_bytes=total,
        cpu_load_per_core=load1 / _cores,
        ram_used_fraction=(mem.total - mem.available) / mem.total if mem.total else 0.0,
        queue_lag_s=queue_lag_s,
        taken_at=time.time(),
        cpu_percent=percent,
        gpu_status=status,
    )


def shutdown() -> None:
    """Release NVML (process exit, tests)."""
    _nvml.shutdown()


# --------------------------------------------------------------------------- errors

_OOM_MARKERS: Final[tuple[str, ...]] = (
    "failed to allocate memory",
    "bad allocation",
    "bad_alloc",
    "out of memory",
    "bfcarena",
    "cudaerrormemoryallocation",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cuda_error_out_of_memory",
    "hiperroroutofmemory",
)


def is_oom_error(exc: BaseException) -> bool:
    """True when ``exc`` (or anything it wraps) is a memory allocation failure.

    ONNX Runtime raises these as generic ``RuntimeException``/``Fail`` with the
    cause only in the message (BFC arena, CUDA, std::bad_alloc), and the engine
    wraps them in ``ModelError``, so the whole cause/context chain is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return True
        text = f"{type(current).__name__}: {current}".lower()
        if any(marker in text for marker in _OOM_MARKERS):
            return True
        if current.__cause__ is not None:
            current = current.__cause__
        else:  # `raise ... from None` hides the context, as in a traceback
            current = None if current.__suppress_context__ else current.__context__
    return False
