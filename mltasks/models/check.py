"""``mltasks models check DIR``: what the service would make of every file in a models folder.

Each ``.onnx`` file is listed with the model it is (``<archetype>/<type>``), how the family
table placed it (input kind, output roles), its precision, and whether it loads and answers a
probe batch. Files the service writes itself (precision variants ``<type>.fp16.onnx``,
``<type>.int8.onnx``) are not listed. The command exits 0 only when every file listed loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.errors import ModelError
from mltasks.models.discovery import find
from mltasks.models.family import signature
from mltasks.models.loaded import load_model
from mltasks.models.plain import SUFFIXES
from mltasks.models.versions import VERSION_FILE

_VARIANT_SUFFIXES = (".fp16.onnx", ".fp32.onnx", ".int8.onnx")


@dataclass(slots=True)
class FileReport:
    model: str  # <archetype>/<type>, or "" for a file the service does not recognise
    file: str
    ok: bool
    reason: str = ""
    served: bool = False  # the file that serves its model (the other is shadowed)
    input: str = ""  # state | sequence | state_action
    roles: list[str] = field(default_factory=list)
    precision: str = ""


def _name_of(path: Path, root: Path) -> tuple[str, str] | None:
    """(archetype, type) that a file name stands for, or None."""
    parts = path.relative_to(root).parts
    if len(parts) == 3 and parts[0] in ARCHETYPES and parts[1].endswith(".versions"):
        model_type = parts[1].removesuffix(".versions")
        if model_type in MODEL_TYPES and VERSION_FILE.match(parts[2]):
            return parts[0], model_type  # a stored version (mltasks.models.versions)
        return None
    if len(parts) != 2 or parts[0] not in ARCHETYPES:
        return None
    for model_type in MODEL_TYPES:
        if parts[1] in (f"{model_type}{s}" for s in SUFFIXES):
            return parts[0], model_type
    return None


def check_dir(models_dir: Path) -> list[FileReport]:
    """One report per .onnx file under ``models_dir`` (variants excluded), sorted by path."""
    root = Path(models_dir)
    reports: list[FileReport] = []
    files = sorted(p for p in root.rglob("*.onnx") if not p.name.endswith(_VARIANT_SUFFIXES))
    for path in files:
        named = _name_of(path, root)
        if named is None:
            reports.append(
                FileReport(
                    "",
                    str(path),
                    False,
                    "not served: the name is not <archetype>/<type>.onnx or <type>_fp16.onnx",
                )
            )
            continue
        archetype, model_type = named
        found = find(root, archetype, model_type)
        served = found is not None and found.path == path
        report = FileReport(f"{archetype}/{model_type}", str(path), False, served=served)
        report.input = signature(model_type).input
        try:
            model = load_model(path, archetype, model_type, ["CPUExecutionProvider"])
        except ModelError as exc:
            report.reason = str(exc)
        else:
            report.ok = True
            report.roles = sorted(model.roles)
            report.precision = model.precision
            if not served and found is not None:
                report.reason = f"shadowed: {found.path.name} serves this model"
        reports.append(report)
    return reports


def render(reports: list[FileReport], as_json: bool) -> str:
    if as_json:
        return json.dumps([asdict(r) for r in reports], indent=1)
    lines = []
    for r in reports:
        state = "ok  " if r.ok else "FAIL"
        what = f"{r.input} -> {'+'.join(r.roles)} {r.precision}" if r.ok else r.reason
        note = f" ({r.reason})" if r.ok and r.reason else ""
        lines.append(f"{state} {r.model or '-':<33} {Path(r.file).name:<30} {what}{note}")
    bad = sum(not r.ok for r in reports)
    lines.append(f"{len(reports)} files, {len(reports) - bad} load, {bad} do not")
    return "\n".join(lines)
