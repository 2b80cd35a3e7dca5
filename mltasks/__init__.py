"""mltasks: the inference service behind the ML monster AI of an rAthena map server.

A request's path: the game inserts into ``ai_requests`` -> ``bridge`` claims it and sends a
batch to a Celery queue -> ``mltasks.serving.tasks.infer_batch`` runs the ONNX model
(``mltasks.engine``) -> ``mltasks.serving.answers`` writes ``ai_responses``, which the game polls.
"""

from mltasks.broker.celery_app import app

__all__ = ["app"]
