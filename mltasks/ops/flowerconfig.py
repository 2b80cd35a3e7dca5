"""Flower's configuration file: ``celery -A mltasks flower --conf=<this file>``.

Flower runs this file (tornado's ``parse_config_file``) and takes its module-level names
that match its options. It sets, from the environment:

| variable                          | Flower option    | default                      |
| --------------------------------- | ---------------- | ---------------------------- |
| ``MLTASKS_FLOWER_USER``           | ``basic_auth``   | ``mltasks``                  |
| ``MLTASKS_FLOWER_PASSWORD``       | ``basic_auth``   | none: Flower refuses to start |
| ``MLTASKS_FLOWER_ADDRESS``        | ``address``      | ``127.0.0.1``                |
| ``MLTASKS_FLOWER_PORT``           | ``port``         | ``5555``                     |
| ``MLTASKS_FLOWER_MAX_TASKS``      | ``max_tasks``    | ``10000``                    |

Flower can cancel, retry and rate-limit tasks and shut workers down, so it never runs
open: without a password it exits (status 2) with a message naming the variable, unless
authentication is configured another way (``FLOWER_BASIC_AUTH``, ``FLOWER_AUTH`` for
OAuth, or ``--basic-auth``/``--auth`` on the command line). Options given on Flower's
command line win over this file.

``python -m mltasks.ops.flowerconfig`` checks the environment without starting Flower.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Final

from mltasks.errors import ConfigError

USER_ENV: Final = "MLTASKS_FLOWER_USER"
PASSWORD_ENV: Final = "MLTASKS_FLOWER_PASSWORD"
ADDRESS_ENV: Final = "MLTASKS_FLOWER_ADDRESS"
PORT_ENV: Final = "MLTASKS_FLOWER_PORT"
MAX_TASKS_ENV: Final = "MLTASKS_FLOWER_MAX_TASKS"

DEFAULT_USER: Final = "mltasks"
DEFAULT_ADDRESS: Final = "127.0.0.1"
DEFAULT_PORT: Final = 5555
# Flower keeps every task it has seen in memory (arguments included): 100000 by default.
DEFAULT_MAX_TASKS: Final = 10_000
MIN_PASSWORD_LENGTH: Final = 12

# Other ways to require authentication, which then stand instead of ours.
_OTHER_AUTH_ENV: Final = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")
_OTHER_AUTH_ARGS: Final = ("--basic_auth", "--basic-auth", "--auth")


def _int(environ: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: {value} is outside {lo}..{hi}")
    return value


def other_auth(environ: Mapping[str, str], argv: Sequence[str]) -> bool:
    """True when Flower is told to authenticate some other way (an empty value is none:
    ``--auth=`` would run it open)."""
    if any(environ.get(name, "").strip() for name in _OTHER_AUTH_ENV):
        return True
    for arg in argv:
        name, _, value = arg.partition("=")
        if name in _OTHER_AUTH_ARGS and value.strip():
            return True
    return False


def flower_options(environ: Mapping[str, str], argv: Sequence[str] = ()) -> dict[str, object]:
    """The Flower options this file sets; raises ConfigError rather than run open."""
    options: dict[str, object] = {
        "address": environ.get(ADDRESS_ENV, "").strip() or DEFAULT_ADDRESS,
        "port": _int(environ, PORT_ENV, DEFAULT_PORT, 1, 65535),
        "max_tasks": _int(environ, MAX_TASKS_ENV, DEFAULT_MAX_TASKS, 100, 1_000_000),
        # Task events are what the task list shows; Flower also asks workers for them.
        "enable_events": True,
        "purge_offline_workers": 600,
    }
    user = environ.get(USER_ENV, "").strip() or DEFAULT_USER
    password = environ.get(PASSWORD_ENV, "")
    if not password:
        if other_auth(environ, argv):
            return options
        raise ConfigError(
            f"{PASSWORD_ENV} is not set: Flower will not run without authentication "
            f"(set it, with {USER_ENV} for the user name, default {DEFAULT_USER!r})"
        )
    if ":" in user:
        raise ConfigError(f"{USER_ENV}: a user name cannot contain ':'")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(f"{PASSWORD_ENV}: use at least {MIN_PASSWORD_LENGTH} characters")
    # A list, not a string: Flower would split a string at commas.
    options["basic_auth"] = [f"{user}:{password}"]
    return options


def _options_or_exit(environ: Mapping[str, str], argv: Sequence[str]) -> dict[str, object]:
    try:
        return flower_options(environ, argv)
    except ConfigError as exc:
        print(f"mltasks flower: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> int:
    """``python -m mltasks.ops.flowerconfig``: say whether Flower would start, and how."""
    options = _options_or_exit(os.environ, sys.argv[1:])
    auth = "basic auth" if "basic_auth" in options else "authentication set outside this file"
    print(f"flower: {options['address']}:{options['port']}, {auth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif "__name__" not in globals():
    # Run by Flower (tornado executes the file in a bare namespace): set its options.
    globals().update(_options_or_exit(os.environ, sys.argv[1:]))
    # Flower's broker page picks its client by the URL's scheme, which names the transport
    # class when one is configured (mltasks.broker.transport): Flower itself takes kombu's own.
    # The app Flower runs (mltasks.celery's) is Celery's current one by then.
    from celery import current_app as _app

    _app.conf.broker_transport = None
