"""Imported by Celery when it first reads its configuration (never before).

For ``celery -A mltasks worker|beat|flower`` that is while Celery parses its command line:
an invalid configuration ends the command here, in one line (mltasks.config.config_or_exit).
"""

from mltasks.broker.celery_app import settings_for
from mltasks.config import config_or_exit

globals().update(settings_for(config_or_exit("mltasks")))
