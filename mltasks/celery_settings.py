"""Imported by Celery when it first reads its configuration (never before)."""

from mltasks.celery_app import settings_for
from mltasks.config import get_config

globals().update(settings_for(get_config()))
