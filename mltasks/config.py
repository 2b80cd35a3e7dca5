"""Configuration: YAML with ``${VAR}`` substitution, read once into frozen dataclasses.

Why dataclasses rather than a dict: a typo in a key or a bad value must stop the
service at start, with a message naming the key, not at the first request.

One module because the schema is one tree of sections, read and checked in one pass; most of
its length is the table of keys, defaults and bounds. How a file becomes those dataclasses
(substitution, coercion, the errors' wording) is `mltasks.configfile`'s.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mltasks.configfile import build, read_yaml
from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.errors import ConfigError
from mltasks.fallback.ladder import (
    BEST,
    MODEL_LEVELS,
    PRECISIONS,
    PROVIDERS,
    WORST,
    Level,
    default_profile,
    model_field,
    rung,
)

if TYPE_CHECKING:
    import redis

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "mltasks.yaml"


def _range(key: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: {value} is outside {lo}..{hi}")


def _all_types() -> dict[str, float]:
    return dict.fromkeys(MODEL_TYPES, 1.0)


def _cpu_types() -> dict[str, float]:
    # The cheap state-input types, chosen from the cost table (docs/PERFORMANCE.md): a batch
    # of mixed archetypes reads every archetype's weights, and with movement_ppo as well the
    # set's INT8 weights (40 MB over six archetypes) overflow a CPU's last-level cache
    # (32 MB here): 5.4 ms a sweep of the six archetypes against 3.3 ms without it, and
    # the same models in one process answered 60-70% of 8 map servers in time against
    # 80-85%. combat_dqn stays: it is the seed's one model, the fusion's reference.
    return {"combat_dqn": 1.0, "skill_dqn": 0.5, "threat_assessment": 1.0}


@dataclass(frozen=True, slots=True)
class FusionConfig:
    """Per model level, the types that answer and their weights (mltasks/models/fusion.py)."""

    level1: Mapping[str, float] = field(default_factory=_all_types)
    level2: Mapping[str, float] = field(default_factory=_all_types)
    level3: Mapping[str, float] = field(default_factory=_cpu_types)
    # Q-values (combat_dqn, skill_dqn, the twin critics) become probabilities through a
    # softmax at this temperature; logits at 1.
    q_temperature: float = 1.0
    # Mass moved to FLEE/MOVE_AWAY at threat 1.0 (weight 1), and at the worst state value.
    threat_shift: float = 0.5
    value_shift: float = 0.2

    def __post_init__(self) -> None:
        for level in MODEL_LEVELS:
            name = model_field(level)
            weights = getattr(self, name)
            for model_type, weight in weights.items():
                key = f"models.fusion.{name}.{model_type}"
                if model_type not in MODEL_TYPES:
                    raise ConfigError(
                        f"{key}: unknown model type (known: {', '.join(MODEL_TYPES)})"
                    )
                if not (math.isfinite(weight) and weight > 0):
                    raise ConfigError(f"{key}: weight {weight!r} must be a positive number")
            if not set(weights) - {"threat_assessment"}:
                raise ConfigError(
                    f"models.fusion.{name}: needs at least one type that proposes actions"
                )
        if not (self.q_temperature > 0 and math.isfinite(self.q_temperature)):
            raise ConfigError("models.fusion.q_temperature: must be a positive number")
        for name in ("threat_shift", "value_shift"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"models.fusion.{name}: must be within 0..1")

    def for_level(self, level: int) -> Mapping[str, float]:
        """The types (in the family's order) and weights of a model level (1-3)."""
        weights: Mapping[str, float] = getattr(self, model_field(level))
        return {t: weights[t] for t in MODEL_TYPES if t in weights}


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    dir: Path = Path("models")
    # "serving" loads, per model level, the types of that level's fusion; "all" every type.
    preload: Literal["all", "serving"] = "serving"
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # An archetype's fusion members as one ONNX Runtime session (mltasks/models/merged.py):
    # one call instead of one per member, where their files total at most this many MB (each
    # merged model is held twice; large models gain little: their cost is the model, not the
    # call). 0: never.
    merge_max_mb: int = 4

    def __post_init__(self) -> None:
        _range("models.merge_max_mb", self.merge_max_mb, 0, 4096)

    REMOVED: ClassVar[dict[str, str]] = {
        "serve_model_type": "every level answers with its fusion; for one type alone, set "
        "models.fusion.level3 (and level1, level2) to that type, e.g. {combat_dqn: 1.0}"
    }


@dataclass(frozen=True, slots=True)
class StateConfig:
    # Which 64-value layout the game sends (mltasks/layouts/): "encoder" is what the fork's
    # map server writes (CONTRACT.md 2b); "seed" the seed document's table (section 2).
    layout: Literal["encoder", "seed"] = "encoder"


@dataclass(frozen=True, slots=True)
class InferenceConfig:
    # Rows a claim takes at most. Under load, 128 answered more in time than 64 in 8 of 9
    # pairs at 11,000-12,500 decisions/s (docs/PERFORMANCE.md); light load claims less.
    batch_size: int = 128
    poll_interval_ms: int = 50
    # The game's ml_max_latency_ms default: past it a decision is lost to its traditional AI.
    max_latency_ms: int = 15
    # A claimed row still 'processing' this long is claimed again (and, past its deadline,
    # answered 255): the recovery of a batch lost with its worker, beside the bridge's
    # rescue at 80% of the deadline. 0 (the default): follows the deadline, 10 x it and at
    # least 250 ms; far above any healthy batch, far below a second at the game's 15 ms.
    lease_ms: int = 0
    intra_op_threads: int = 1
    # Batches allowed to wait in a tier's queue before the bridge holds back and lets rows
    # gather into a larger batch (0: never hold back).
    max_waiting_batches: int = 1
    # While a tier's queue is full, pending rows join the batch waiting in it (the bridge
    # takes it back and sends it again with them) rather than wait for the next batch.
    top_up: bool = True

    # A batch still waiting in its queue this far into its oldest row's deadline is taken
    # back off the queue and answered 255 by the bridge (`rescue`): the game then reads a
    # 255 in time instead of timing out. A batch a worker has taken is left to it (no row
    # is paid for twice); a worker handed a batch already past this point answers it 255
    # at once, and one that dies with a batch in hand leaves its rows to the lease.
    RESCUE_SHARE: ClassVar[float] = 0.8

    @property
    def rescue_after_s(self) -> float:
        """Seconds after a batch's oldest row was created that the bridge rescues it."""
        return self.max_latency_ms / 1000 * self.RESCUE_SHARE

    def __post_init__(self) -> None:
        _range("inference.batch_size", self.batch_size, 32, 128)
        _range("inference.poll_interval_ms", self.poll_interval_ms, 1, 10_000)
        _range("inference.max_latency_ms", self.max_latency_ms, 5, 60_000)
        if self.lease_ms == 0:
            object.__setattr__(self, "lease_ms", max(250, 10 * self.max_latency_ms))
        _range("inference.lease_ms", self.lease_ms, 100, 600_000)
        _range("inference.intra_op_threads", self.intra_op_threads, 0, 64)
        _range("inference.max_waiting_batches", self.max_waiting_batches, 1, 1000)


@dataclass(frozen=True, slots=True)
class HardwareConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu_device_id: int = 0


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    name: str = "ragnarok_ml"
    user: str = "ml_user"
    password: str = field(default="", repr=False)
    # A full libpq URL or conninfo; when set it wins over the fields above.
    url: str = field(default="", repr=False)
    connect_timeout_s: int = 5
    # The service's own commits (claims, answers) do not wait for the WAL flush: an answer
    # is visible ~0.2 ms sooner and a crash loses at most the last moments of claims and
    # answers, which the lease then hands out again. The game's inserts keep their setting.
    synchronous_commit: bool = False

    # The queue table goes from empty to millions of rows and back, so its statistics are
    # always wrong, and a plan made on an empty table (psycopg prepares a statement after 5
    # runs; PostgreSQL then keeps one generic plan) seq-scans it for ever: a claim on 100k
    # rows went from 0.3 ms to minutes (docs/PERFORMANCE.md, "Plans that do not depend on
    # the table's statistics"). Every statement of the service has an index to use: with
    # seq scans priced out, each plan takes it whatever the statistics say.
    PLAN_SETTINGS: ClassVar[tuple[str, ...]] = ("enable_seqscan=off",)

    def __post_init__(self) -> None:
        _range("database.port", self.port, 1, 65535)

    @property
    def conninfo(self) -> str:
        """The libpq connection string (holds the password: never log it)."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        if self.url:
            base = self.url
        else:
            base = make_conninfo(
                host=self.host,
                port=self.port,
                dbname=self.name,
                user=self.user,
                password=self.password or None,
                connect_timeout=self.connect_timeout_s,
            )
        settings = [] if self.synchronous_commit else ["synchronous_commit=off"]
        settings += self.PLAN_SETTINGS
        options = str(conninfo_to_dict(base).get("options") or "")
        extra = " ".join(f"-c {s}" for s in settings)
        return make_conninfo(base, options=f"{options} {extra}".strip())

    @property
    def safe_dsn(self) -> str:
        """The target without credentials, for logs."""
        from psycopg.conninfo import conninfo_to_dict

        d = conninfo_to_dict(self.conninfo)
        return f"{d.get('host', '')}:{d.get('port', 5432)}/{d.get('dbname', '')}"


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = field(default="redis://127.0.0.1:6379", repr=False)
    broker_db: int = 1
    # The game's gateway keeps its action cache in db 0: the shared cache must be there too.
    cache_db: int = 0
    visibility_timeout_s: int = 30
    socket_timeout_s: float = 1.0
    # With a Sentinel list as the url (sentinel://h1:26379;sentinel://h2:26379): the name
    # of the monitored master, for the broker (kombu's master_name) and every other client.
    sentinel_master: str = "mymaster"

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            raise ConfigError(
                "redis.url: scheme must be redis://, rediss://, unix:// or sentinel://"
            )
        if self.url.startswith("sentinel://"):
            from mltasks.redisurl import sentinel_parts

            try:
                sentinel_parts(self.url)
            except ValueError as exc:
                raise ConfigError(f"redis.url: {exc}") from None
            if not self.sentinel_master:
                raise ConfigError("redis.sentinel_master: required with a sentinel:// url")
        _range("redis.broker_db", self.broker_db, 0, 15)
        _range("redis.cache_db", self.cache_db, 0, 15)
        _range("redis.visibility_timeout_s", self.visibility_timeout_s, 1, 3600)

    def db_url(self, db: int) -> str:
        """The URL on database `db` (a db number already in the URL path is replaced; in a
        Sentinel list, in every member)."""
        from mltasks.redisurl import with_db

        return with_db(self.url, db)

    def client(self, db: int, **kwargs: Any) -> redis.Redis:
        """A redis-py client on database `db` of the configured server (through the
        sentinels with a sentinel:// url); `kwargs` are redis-py's."""
        from mltasks.redisurl import client_from_url

        return client_from_url(self.db_url(db), master_name=self.sentinel_master, **kwargs)


@dataclass(frozen=True, slots=True)
class CachingConfig:
    enabled: bool = True
    action_ttl_s: int = 10
    # Model levels whose workers look L2 and L3 up before inferring. Not level 3 by
    # default: the game looked L2 up itself just before it wrote the request (CONTRACT.md
    # 4), and level 3's models cost less than the round trip (docs/PERFORMANCE.md). L1
    # histories are read at every level whose fusion has a sequence type; answers and
    # states are written at every level, L3 outputs only at these (their only readers).
    lookup_levels: tuple[int, ...] = (1, 2)
    # Whether workers write the game's L2 keys themselves. Off: the gateway SETEXes the same
    # key and value after every fresh answer it reads (CONTRACT.md 4), so a worker's write
    # only repeated it, at about 10 us a row (the key's MD5 text, the SET; docs/PERFORMANCE.md).
    # On for a gateway that does not write its own cache.
    write_actions: bool = False

    def __post_init__(self) -> None:
        _range("caching.action_ttl_s", self.action_ttl_s, 1, 3600)
        for level in self.lookup_levels:
            _range("caching.lookup_levels", level, BEST, MODEL_LEVELS[-1])


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    # The level the service starts at when Redis holds none (1 best .. 5 traditional AI).
    start_level: int = int(BEST)
    # Consecutive failed batches at a level that move the service one level down.
    failure_threshold: int = 3
    # Workers refresh a heartbeat key per queue; a queue whose key lapsed has no consumer.
    heartbeat_interval_ms: int = 500
    heartbeat_ttl_ms: int = 1500
    # Probes run in every worker's main process at this interval.
    probe_interval_s: float = 2.0
    # Recovery: probes healthy this long before one step up, confirmed by a canary batch.
    recovery_hysteresis_s: float = 30.0
    recovery_backoff_s: float = 30.0
    recovery_backoff_max_s: float = 600.0
    canary_timeout_s: float = 5.0
    # Overload thresholds of the CPU tier.
    cpu_load_per_core: float = 2.0
    queue_lag_ms: int = 50
    # (execution provider, precision) per model level.
    level1: str = default_profile(Level.GPU_FP16)
    level2: str = default_profile(Level.GPU_INT8)
    level3: str = default_profile(Level.CPU)

    def __post_init__(self) -> None:
        _range("fallback.start_level", self.start_level, BEST, WORST)
        _range("fallback.failure_threshold", self.failure_threshold, 1, 1000)
        _range("fallback.heartbeat_interval_ms", self.heartbeat_interval_ms, 50, 60_000)
        if self.heartbeat_ttl_ms <= self.heartbeat_interval_ms:
            raise ConfigError(
                "fallback.heartbeat_ttl_ms: must be longer than fallback.heartbeat_interval_ms"
            )
        for level in MODEL_LEVELS:
            name = model_field(level)
            value = getattr(self, name)
            provider, _, precision = value.partition(":")
            if provider not in PROVIDERS or precision not in PRECISIONS:
                raise ConfigError(
                    f"fallback.{name}: {value!r} is not <provider>:<precision> with provider "
                    f"in {PROVIDERS} and precision in {PRECISIONS}"
                )
            if rung(level).tier == "cpu" and provider != "cpu":
                raise ConfigError(f"fallback.{name}: the CPU level must use the cpu provider")

    def level_profile(self, level: int) -> tuple[str, str]:
        """(provider, precision) of a model level (1-3)."""
        provider, _, precision = getattr(self, model_field(level)).partition(":")
        return provider, precision


@dataclass(frozen=True, slots=True)
class CleanupConfig:
    retention_s: int = 3600
    batch_limit: int = 5000

    def __post_init__(self) -> None:
        _range("cleanup.retention_s", self.retention_s, 1, 30 * 86400)
        _range("cleanup.batch_limit", self.batch_limit, 1, 1_000_000)


@dataclass(frozen=True, slots=True)
class ExperienceConfig:
    """Experience recording (mltasks/experience/): answered decisions kept as transitions
    for the next model, by a process of its own, never on the answer path."""

    # Off in the built-in defaults (a deployment opts in); on in config/mltasks.yaml (dev).
    enabled: bool = False
    interval_s: float = 2.0  # one round of the recorder this often
    # A round reads requests at least this old: their answers (or 255s) are all in by then.
    # An answer written later is not recorded: keep it above inference.lease_ms.
    settle_s: float = 2.0
    # ... and at most this much of the game's time, so a recorder catching up after an
    # outage moves in bounded statements.
    window_s: float = 30.0
    # A monster's last decision waits this long for its next state, then is dropped.
    pair_wait_s: float = 600.0
    # Bounds of ai_experience: older rows go first, then the oldest beyond the cap.
    retention_s: int = 7 * 86400
    max_rows: int = 1_000_000
    trim_limit: int = 50_000  # rows one round deletes at most, per bound
    # Cleanup keeps a finished request the recorder has not read yet this much longer
    # than cleanup.retention_s (a recorder that is down for good does not hold them forever).
    hold_s: int = 3600
    # A round that takes longer is cancelled by PostgreSQL and retried at the next one.
    statement_timeout_ms: int = 5000
    metrics_port: int = 9094  # the recorder's /metrics (monitoring.metrics_host); 0: free port

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("interval_s", 0.05, 3600.0),
            ("settle_s", 0.0, 3600.0),
            ("window_s", 0.1, 86400.0),
            ("pair_wait_s", 0.0, 7 * 86400.0),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ConfigError(f"experience.{name}: {value!r} is outside {lo:g}..{hi:g}")
        _range("experience.retention_s", self.retention_s, 60, 365 * 86400)
        _range("experience.max_rows", self.max_rows, 1, 1_000_000_000)
        _range("experience.trim_limit", self.trim_limit, 1, 10_000_000)
        _range("experience.hold_s", self.hold_s, 0, 30 * 86400)
        _range("experience.statement_timeout_ms", self.statement_timeout_ms, 100, 600_000)
        _range("experience.metrics_port", self.metrics_port, 0, 65535)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    # The pool is chosen on the worker's command line (``--pool solo`` or Celery's default,
    # prefork): Celery cannot tell an explicit ``--pool prefork`` from a configured one.
    prefetch_multiplier: int = 1
    concurrency: int = 2


@dataclass(frozen=True, slots=True)
class MonitoringConfig:
    metrics_host: str = "127.0.0.1"
    # The worker's /metrics (its prefork children aggregated); 0 picks a free port.
    metrics_port: int = 9090
    # The bridge's own /metrics: a bridge and a worker often share a host.
    bridge_metrics_port: int = 9091
    # Task events on from the start. Off, they cost nothing until Flower (or
    # `celery control enable_events`) switches them on in the running workers.
    task_events: bool = False

    def __post_init__(self) -> None:
        _range("monitoring.metrics_port", self.metrics_port, 0, 65535)
        _range("monitoring.bridge_metrics_port", self.bridge_metrics_port, 0, 65535)
        if self.metrics_port and self.metrics_port == self.bridge_metrics_port:
            raise ConfigError(
                "monitoring.bridge_metrics_port: must differ from monitoring.metrics_port"
            )


@dataclass(frozen=True, slots=True)
class CanaryConfig:
    """The shadow canary of a deployed model version (mltasks/models/shadow.py)."""

    # Share of an archetype's batches on which the candidate runs beside the active version.
    share: float = 1.0
    # Promotion: at least this many rows shadowed, and this long since the deploy ...
    min_rows: int = 1000
    min_seconds: float = 10.0
    # ... with every limit kept. Broken, and the candidate is rolled back at once.
    max_error_rate: float = 0.0  # shadow runs that raised, per shadowed batch
    max_non_finite_rate: float = 0.0  # rows with a NaN or infinite output, per row
    max_latency_ratio: float = 3.0  # candidate's seconds / active's, summed over the batches
    latency_min_batches: int = 50  # ... judged once this many batches were shadowed
    min_agreement: float = 0.8  # rows whose top action matches the active version's

    def __post_init__(self) -> None:
        if not (0.0 < self.share <= 1.0):
            raise ConfigError(f"canary.share: {self.share!r} must be within (0, 1]")
        _range("canary.min_rows", self.min_rows, 1, 10_000_000)
        _range("canary.latency_min_batches", self.latency_min_batches, 1, 1_000_000)
        if not (0.0 <= self.min_seconds <= 86400 and math.isfinite(self.min_seconds)):
            raise ConfigError(f"canary.min_seconds: {self.min_seconds!r} is outside 0..86400")
        for name in ("max_error_rate", "max_non_finite_rate", "min_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"canary.{name}: {getattr(self, name)!r} must be within 0..1")
        if not (self.max_latency_ratio >= 1.0 and math.isfinite(self.max_latency_ratio)):
            raise ConfigError(
                f"canary.max_latency_ratio: {self.max_latency_ratio!r} must be a number >= 1"
            )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "text"


@dataclass(frozen=True, slots=True)
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    caching: CachingConfig = field(default_factory=CachingConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    experience: ExperienceConfig = field(default_factory=ExperienceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        port = self.experience.metrics_port
        if port and port in (self.monitoring.metrics_port, self.monitoring.bridge_metrics_port):
            raise ConfigError(
                "experience.metrics_port: must differ from monitoring.metrics_port and "
                "monitoring.bridge_metrics_port"
            )

    @property
    def archetypes(self) -> tuple[str, ...]:
        return ARCHETYPES


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the configuration once.

    Order: ``path`` or ``$MLTASKS_CONFIG`` or ``config/mltasks.yaml`` in the checkout
    (embedded defaults when none exists), then the ``MLTASKS_*_URL``/``MLTASKS_MODELS_DIR``
    overrides.
    """
    env = os.environ if environ is None else environ
    chosen = path or env.get("MLTASKS_CONFIG") or None
    data: dict[str, Any] = {}
    source = "built-in defaults"
    if chosen is not None:
        p = Path(chosen)
        if not p.is_file():
            raise ConfigError(f"MLTASKS_CONFIG: {p} does not exist")
        source = str(p)
    elif DEFAULT_CONFIG_PATH.is_file():
        p = DEFAULT_CONFIG_PATH
        source = str(p)
    try:
        if source != "built-in defaults":
            data = read_yaml(p, env)
        overrides = {
            "MLTASKS_DATABASE_URL": ("database", "url"),
            "MLTASKS_REDIS_URL": ("redis", "url"),
            "MLTASKS_MODELS_DIR": ("models", "dir"),
        }
        for var, (section, key) in overrides.items():
            value = env.get(var)
            if value:
                sect = data.setdefault(section, {}) or {}
                if not isinstance(sect, dict):
                    raise ConfigError(f"{section}: expected a mapping")
                sect[key] = value
                data[section] = sect
        return build(Config, data, "")
    except ConfigError as exc:
        # Every message names the file, then the key: "<file>: inference.batch_size: ...".
        raise ConfigError(f"{source}: {exc}") from None


_cached: Config | None = None
# A worker's monitor thread reads the configuration too: a read that began before a
# `set_config` must not store what it read after it (the lock orders the two).
_loading = threading.Lock()


def get_config() -> Config:
    """The process's configuration, read on first use (never at import)."""
    global _cached
    cached = _cached
    if cached is not None:
        return cached
    with _loading:
        if _cached is None:
            _cached = load_config()
        return _cached


def config_or_exit(prog: str) -> Config:
    """``get_config()`` for a process's entry point (bridge, Celery's worker, beat and
    Flower): an invalid configuration is one line on stderr naming the file and the key,
    and exit status 2, never a traceback."""
    try:
        return get_config()
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def set_config(config: Config | None) -> None:
    """Replace the process's configuration (tests, the CLI's --config)."""
    global _cached
    with _loading:
        _cached = config
