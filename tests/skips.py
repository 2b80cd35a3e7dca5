"""The one way a test is skipped: locally a skip with its reason, under CI a failure.

`.ci/run` sets MLTASKS_TEST_REQUIRE_SERVERS=1 (and CI services set CI): there every
prerequisite is promised, so a missing one is a defect of the run, not a reason to pass.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TypeVar

import pytest

T = TypeVar("T")


def required() -> bool:
    """Whether this run promised every prerequisite (CI, or .ci/run)."""
    flag = os.environ.get("MLTASKS_TEST_REQUIRE_SERVERS", "").strip().lower()
    ci = os.environ.get("CI", "").strip().lower()
    return flag not in ("", "0", "false", "no") or ci not in ("", "0", "false", "no")


def need(condition: T | None, reason: str) -> T:
    """`condition` itself when it holds (truthy), to go on with; otherwise skip with
    `reason`, or fail under CI."""
    if condition:
        return condition
    if required():
        pytest.fail(f"{reason} (a skip is a failure under CI / MLTASKS_TEST_REQUIRE_SERVERS)")
    pytest.skip(reason)


def need_module(name: str, reason: str = "") -> ModuleType:
    """The module `name`, imported; when it is missing, `need` says so (skip, or fail under CI)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        need(False, reason or f"{name} is not installed ({exc})")
        raise  # not reached: need(False, ...) always skips or fails
