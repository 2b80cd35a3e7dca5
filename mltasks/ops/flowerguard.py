"""Flower never serves this app without authentication, whatever its command line.

``celery -A mltasks flower`` loads the app (this package) after Celery's command plugins,
so Flower's application class is already imported: `install` wraps its constructor. A
Flower about to start without authentication (no ``--basic-auth`` with a password, no
OAuth ``--auth``; ``--auth=`` is none) takes its basic auth from
``MLTASKS_FLOWER_PASSWORD`` when that is set, and otherwise refuses to start, exit status
2, with the message ``mltasks flower`` gives. An address left at Flower's default (all
interfaces) becomes ``MLTASKS_FLOWER_ADDRESS`` (127.0.0.1). Flower's ``/metrics``, which
Flower itself leaves open, asks for the same credentials (only ``/healthcheck`` stays open,
for container health checks).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from typing import Any

from mltasks.errors import ConfigError

_GUARDED = "_mltasks_auth_guard"


def has_auth(options: Any) -> bool:
    """Whether Flower's options require credentials: a user:password with a password, or
    an OAuth pattern."""
    basic = getattr(options, "basic_auth", None) or []
    if isinstance(basic, str):
        basic = basic.split(",")
    if any(":" in entry and entry.split(":", 1)[1] for entry in basic):
        return True
    return bool(str(getattr(options, "auth", "") or "").strip())


def require_auth(options: Any, environ: Mapping[str, str] = os.environ) -> None:
    """Give ``options`` our basic auth if they have none; ConfigError when there is none
    to give (the message of `mltasks flower`)."""
    from mltasks.ops.flowerconfig import ADDRESS_ENV, DEFAULT_ADDRESS, flower_options

    if not getattr(options, "address", ""):
        options.address = environ.get(ADDRESS_ENV, "").strip() or DEFAULT_ADDRESS
    if has_auth(options):
        return
    ours = flower_options(environ)  # raises ConfigError without a password
    options.basic_auth = ours["basic_auth"]


def install() -> None:
    """Wrap Flower's application constructor, if Flower is loaded (idempotent)."""
    module = sys.modules.get("flower.app")
    if module is None:
        return
    cls = module.Flower
    if getattr(cls, _GUARDED, False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def guarded(self: Any, options: Any = None, *args: Any, **kwargs: Any) -> None:
        if options is None:
            from flower.options import default_options

            options = default_options
        try:
            require_auth(options)
        except ConfigError as exc:
            print(f"mltasks flower: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        original(self, options, *args, **kwargs)

    cls.__init__ = guarded
    setattr(cls, _GUARDED, True)
    _metrics_behind_auth()


def _metrics_behind_auth() -> None:
    try:
        from flower.views.monitor import Metrics
        from tornado.web import authenticated
    except ImportError:  # another Flower layout: its own rules apply
        return
    if not getattr(Metrics.get, _GUARDED, False):
        get = authenticated(Metrics.get)
        setattr(get, _GUARDED, True)
        Metrics.get = get
