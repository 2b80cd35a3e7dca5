"""The Celery application ``mltasks``: ``celery -A mltasks worker|beat|flower`` runs this.

Celery finds it by itself: the ``mltasks`` package has no ``app``, so ``-A mltasks`` imports
``mltasks.celery`` and takes its ``app``. It is the one place the app is made, with what a
worker adds to Celery (its bootsteps) and the guard that keeps Flower behind authentication;
importing any other module of mltasks (its config, its state layouts) makes no app.
Settings are read from our config when Celery first needs them (`mltasks.broker.celery_settings`).
"""

from __future__ import annotations

from celery import Celery

from mltasks.broker.celery_app import SETTINGS_MODULE

# The modules whose shared tasks and signal handlers a worker takes.
TASK_MODULES = ("mltasks.serving.batch", "mltasks.serving.jobs", "mltasks.serving.process")


def create_app() -> Celery:
    """The app, its worker bootsteps and Flower's guard (call it once: `app` below)."""
    from mltasks.models.shadow import ModelsStep
    from mltasks.ops.flowerguard import install as guard_flower
    from mltasks.serving.bootsteps import ConsumingStep, MonitorStep

    made = Celery("mltasks", include=list(TASK_MODULES))
    made.config_from_object(SETTINGS_MODULE)
    made.steps["worker"].add(MonitorStep)
    made.steps["worker"].add(ModelsStep)
    made.steps["consumer"].add(ConsumingStep)
    # `celery -A mltasks flower`, however it is called, never serves without authentication.
    guard_flower()
    return made


app = create_app()
