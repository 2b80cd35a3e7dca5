"""Where a model lives: ``<models_dir>/<archetype>/<type>.onnx`` or ``<type>_fp16.onnx``.

The fork's Phase 11 exporter writes ``<type>_fp16.onnx`` (FP16 weights and I/O); its
continuous-training script, and this service's earlier releases, ``<type>.onnx`` (FP32).
When both exist, **``<type>.onnx`` wins**: it is the later export in the fork's workflow
(retraining writes it), and the FP32 file is the exact master from which the service builds
every other precision. The other file is reported (``mltasks models check``) and ignored.

A model that was deployed (`mltasks.models.versions`) has a ``<type>.versions`` folder whose
``pointer.json`` names the active version: that file serves, and the plain files are ignored.

Only names from the contract ever reach a path: never a value read from the database.
Precision variants the service caches beside a master (``<stem>.fp16.onnx``,
``<stem>.fp32.onnx``, ``<stem>.int8.onnx``) are not masters and are never discovered as
such.
"""

from __future__ import annotations

from pathlib import Path

from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.models.plain import Found, plain_find
from mltasks.models.versions import active_file


def find(models_dir: Path, archetype: str, model_type: str) -> Found | None:
    """The file that serves this model, or None when there is none: the active version of
    a versioned model, else the preferred plain file."""
    active = active_file(models_dir, archetype, model_type)
    if active is not None:
        plain = plain_find(models_dir, archetype, model_type)
        return Found(archetype, model_type, active[0], plain.path if plain else None, active[1])
    return plain_find(models_dir, archetype, model_type)


def discover(
    models_dir: Path,
    archetypes: tuple[str, ...] = ARCHETYPES,
    model_types: tuple[str, ...] = MODEL_TYPES,
) -> tuple[list[Found], list[str]]:
    """(found files, names of the models with no file), archetype-major."""
    found: list[Found] = []
    missing: list[str] = []
    for archetype in archetypes:
        for model_type in model_types:
            f = find(models_dir, archetype, model_type)
            if f is None:
                missing.append(f"{archetype}/{model_type}")
            else:
                found.append(f)
    return found, missing
