"""Model versions side by side, and one atomic "active" pointer per ``<archetype>/<type>``.

A version is a file's content hash (`version_of`: the first 12 hex digits of its SHA-256).
A model that was ever deployed (`mltasks models deploy`) keeps its versions in a folder beside
the plain files::

    <models_dir>/<archetype>/<type>.versions/<version>.onnx        (FP32 I/O)
    <models_dir>/<archetype>/<type>.versions/<version>_fp16.onnx   (FP16 I/O, the exporter's form)
    <models_dir>/<archetype>/<type>.versions/pointer.json          the pointer

A version file is written to a temporary name, fsynced and renamed; the pointer is written the
same way, and only after its file is complete: a reader sees the old pointer or the new one,
never a half-copied file. ``pointer.json`` says which version is active (and since when, and
why), the candidate and its state (``canary`` while it shadows, then ``promoted`` or
``rolled_back``), the versions active before (for ``rollback``) and the last rollback.

A model without a ``.versions`` folder is served from its plain file as before (discovery);
its version is still the hash of that file. Every change of any pointer also replaces
``<models_dir>/versions.generation``: a worker compares that one file's identity before each
batch (one ``stat``) to learn that something changed, even when no control message reached it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.errors import ModelError
from mltasks.files import write_atomic
from mltasks.models.plain import plain_find

VERSION_LEN = 12
POINTER = "pointer.json"
GENERATION = "versions.generation"
HISTORY_KEPT = 10
VERSION_FILE = re.compile(r"^([0-9a-f]{12})(_fp16)?\.onnx$")

CANARY = "canary"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"


def version_of(path: Path) -> str:
    """A file's version id: the first 12 hex digits of the SHA-256 of its bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:VERSION_LEN]


def parse_model(name: str) -> tuple[str, str]:
    """``<archetype>/<type>`` into its two parts; ModelError naming what is unknown."""
    archetype, _, model_type = name.partition("/")
    if archetype not in ARCHETYPES:
        raise ModelError(
            f"{name}: unknown archetype {archetype!r} (known: {', '.join(ARCHETYPES)})"
        )
    if model_type not in MODEL_TYPES:
        raise ModelError(
            f"{name}: unknown model type {model_type!r} (known: {', '.join(MODEL_TYPES)})"
        )
    return archetype, model_type


def versions_dir(models_dir: Path, archetype: str, model_type: str) -> Path:
    return Path(models_dir) / archetype / f"{model_type}.versions"


def generation_file(models_dir: Path) -> Path:
    return Path(models_dir) / GENERATION


@functools.lru_cache(maxsize=16)
def _generation_path(models_dir: Path) -> str:
    return str(generation_file(models_dir))


def generation_stamp(models_dir: Path) -> tuple[int, int] | None:
    """Identity of the generation file (inode, mtime): changes with every pointer change.

    Looked at before every batch: its path is joined once (8 against 2 us a look)."""
    try:
        st = os.stat(_generation_path(models_dir))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass(frozen=True, slots=True)
class Pointer:
    """One model's pointer.json, read."""

    model: str
    active: dict[str, Any] | None
    candidate: dict[str, Any] | None
    history: list[dict[str, Any]]
    last_rollback: dict[str, Any] | None
    root: Path

    def path_of(self, entry: dict[str, Any] | None) -> Path | None:
        if not entry:
            return None
        return self.root / str(entry["file"])

    @property
    def active_version(self) -> str | None:
        return None if not self.active else str(self.active["version"])

    @property
    def canary(self) -> dict[str, Any] | None:
        """The candidate while it shadows the active version, else None."""
        c = self.candidate
        return c if c and c.get("state") == CANARY else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "active": self.active,
            "candidate": self.candidate,
            "history": self.history,
            "last_rollback": self.last_rollback,
        }


def read_pointer(models_dir: Path, archetype: str, model_type: str) -> Pointer | None:
    """The pointer of a versioned model; None for a model served from its plain file."""
    root = versions_dir(models_dir, archetype, model_type)
    try:
        doc = json.loads((root / POINTER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{root / POINTER}: unreadable pointer: {exc}") from exc
    return Pointer(
        f"{archetype}/{model_type}",
        doc.get("active"),
        doc.get("candidate"),
        list(doc.get("history") or []),
        doc.get("last_rollback"),
        root,
    )


def active_file(models_dir: Path, archetype: str, model_type: str) -> tuple[Path, str] | None:
    """(file, version) the pointer makes active, or None when the model has no pointer."""
    p = read_pointer(models_dir, archetype, model_type)
    if p is None or p.active is None:
        return None
    path = p.path_of(p.active)
    assert path is not None
    return path, str(p.active["version"])


def _write_pointer(root: Path, doc: dict[str, Any]) -> None:
    write_atomic(root / POINTER, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def bump_generation(models_dir: Path) -> None:
    write_atomic(generation_file(models_dir), f"{time.time_ns()}\n".encode())


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One writer at a time per model (deploy, rollback, a worker's promotion)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _doc(p: Pointer | None) -> dict[str, Any]:
    if p is None:
        return {"active": None, "candidate": None, "history": [], "last_rollback": None}
    return {k: v for k, v in p.as_dict().items() if k != "model"}


def store_file(
    models_dir: Path, archetype: str, model_type: str, source: Path, fp16: bool
) -> tuple[str, Path]:
    """Copy a file into the model's versions folder (atomically); (version, stored path)."""
    blob = Path(source).read_bytes()
    version = hashlib.sha256(blob).hexdigest()[:VERSION_LEN]
    root = versions_dir(models_dir, archetype, model_type)
    target = root / f"{version}{'_fp16' if fp16 else ''}.onnx"
    if not target.is_file() or target.read_bytes() != blob:
        write_atomic(target, blob)
    return version, target


def _entry(version: str, path: Path, via: str, **extra: Any) -> dict[str, Any]:
    return {"version": version, "file": path.name, "since": time.time(), "via": via, **extra}


def _adopt_plain(models_dir: Path, archetype: str, model_type: str) -> dict[str, Any] | None:
    """The plain file that serves today, stored as the first version (its rollback target)."""
    found = plain_find(models_dir, archetype, model_type)
    if found is None:
        return None
    version, stored = store_file(
        models_dir, archetype, model_type, found.path, found.path.name.endswith("_fp16.onnx")
    )
    return _entry(version, stored, "plain file")


def deploy(
    models_dir: Path,
    archetype: str,
    model_type: str,
    stored: Path,
    version: str,
    *,
    now: bool = False,
) -> Pointer:
    """Make a stored version the candidate (``canary``), or with ``now`` the active one."""
    root = versions_dir(models_dir, archetype, model_type)
    with _locked(root):
        p = read_pointer(models_dir, archetype, model_type)
        doc = _doc(p)
        if doc["active"] is None:
            doc["active"] = _adopt_plain(models_dir, archetype, model_type)
        active = doc["active"]
        if active is not None and active["version"] == version:
            raise ModelError(f"{archetype}/{model_type}: version {version} is already active")
        if now or active is None:
            _push_history(doc)
            doc["active"] = _entry(version, stored, "deploy --now" if now else "deploy")
            doc["candidate"] = None
        else:
            doc["candidate"] = _entry(version, stored, "deploy", state=CANARY)
        _write_pointer(root, doc)
        bump_generation(models_dir)
    out = read_pointer(models_dir, archetype, model_type)
    assert out is not None
    return out


def _push_history(doc: dict[str, Any]) -> None:
    if doc["active"] is not None:
        old = dict(doc["active"], until=time.time())
        doc["history"] = [old, *doc["history"]][:HISTORY_KEPT]


def promote(models_dir: Path, archetype: str, model_type: str, version: str, reason: str) -> bool:
    """The canary candidate ``version`` becomes active; False when it no longer is the canary."""
    root = versions_dir(models_dir, archetype, model_type)
    with _locked(root):
        p = read_pointer(models_dir, archetype, model_type)
        if p is None or p.canary is None or p.canary["version"] != version:
            return False
        doc = _doc(p)
        _push_history(doc)
        cand = dict(p.canary)
        doc["active"] = {
            "version": version,
            "file": cand["file"],
            "since": time.time(),
            "via": "promoted",
        }
        doc["candidate"] = dict(cand, state=PROMOTED, decided=time.time(), reason=reason)
        _write_pointer(root, doc)
        bump_generation(models_dir)
    return True


def reject(models_dir: Path, archetype: str, model_type: str, version: str, reason: str) -> bool:
    """Automatic rollback of the canary ``version`` (the active one never stopped serving)."""
    root = versions_dir(models_dir, archetype, model_type)
    with _locked(root):
        p = read_pointer(models_dir, archetype, model_type)
        if p is None or p.canary is None or p.canary["version"] != version:
            return False
        doc = _doc(p)
        now = time.time()
        doc["candidate"] = dict(p.canary, state=ROLLED_BACK, decided=now, reason=reason)
        doc["last_rollback"] = {
            "from": version,
            "to": p.active_version,
            "reason": reason,
            "at": now,
            "by": "canary",
        }
        _write_pointer(root, doc)
        bump_generation(models_dir)
    return True


def rollback(
    models_dir: Path, archetype: str, model_type: str, reason: str = "operator"
) -> Pointer:
    """Back to the version active before: a canary candidate is dropped (the active version
    stays); without one, the previous version becomes active again at once."""
    root = versions_dir(models_dir, archetype, model_type)
    name = f"{archetype}/{model_type}"
    with _locked(root):
        p = read_pointer(models_dir, archetype, model_type)
        if p is None or p.active is None:
            raise ModelError(f"{name}: no deployed versions, nothing to roll back to")
        doc = _doc(p)
        now = time.time()
        if p.canary is not None:
            doc["candidate"] = dict(p.canary, state=ROLLED_BACK, decided=now, reason=reason)
            doc["last_rollback"] = {
                "from": p.canary["version"],
                "to": p.active_version,
                "reason": reason,
                "at": now,
                "by": "operator",
            }
        else:
            previous = next((h for h in p.history if (root / str(h["file"])).is_file()), None)
            if previous is None:
                raise ModelError(f"{name}: no previous version to roll back to")
            doc["history"] = [h for h in p.history if h is not previous]
            doc["last_rollback"] = {
                "from": p.active_version,
                "to": previous["version"],
                "reason": reason,
                "at": now,
                "by": "operator",
            }
            doc["active"] = {
                "version": previous["version"],
                "file": previous["file"],
                "since": now,
                "via": "rollback",
            }
        _write_pointer(root, doc)
        bump_generation(models_dir)
    out = read_pointer(models_dir, archetype, model_type)
    assert out is not None
    return out


def list_models(models_dir: Path) -> list[dict[str, Any]]:
    """Per model with a file: its active version (and since when), the candidate and its
    state, the last rollback; plain-file models show their file's hash as the version."""
    out: list[dict[str, Any]] = []
    for archetype in ARCHETYPES:
        for model_type in MODEL_TYPES:
            p = read_pointer(models_dir, archetype, model_type)
            if p is not None and p.active is not None:
                out.append(
                    {
                        "model": p.model,
                        "versioned": True,
                        "active": p.active,
                        "candidate": p.candidate,
                        "last_rollback": p.last_rollback,
                        "history": p.history,
                    }
                )
                continue
            found = plain_find(models_dir, archetype, model_type)
            if found is None:
                continue
            st = found.path.stat()
            out.append(
                {
                    "model": found.name,
                    "versioned": False,
                    "active": {
                        "version": version_of(found.path),
                        "file": str(found.path.relative_to(models_dir)),
                        "since": st.st_mtime,
                        "via": "plain file",
                    },
                    "candidate": None,
                    "last_rollback": None,
                    "history": [],
                }
            )
    return out


def stored_versions(models_dir: Path, archetype: str, model_type: str) -> list[str]:
    root = versions_dir(models_dir, archetype, model_type)
    if not root.is_dir():
        return []
    return sorted(m.group(1) for p in root.iterdir() if (m := VERSION_FILE.match(p.name)))
