"""mltasks: the inference service behind the ML monster AI of an rAthena map server.

A request's path: the game inserts into ``ai_requests`` -> ``bridge`` claims it and sends a
batch to a Celery queue -> ``mltasks.serving.batch.infer_batch`` runs the ONNX models
(``mltasks.models``) -> ``mltasks.serving.answers`` writes ``ai_responses``, which the game
polls. The Celery app is ``mltasks.celery.app`` (``celery -A mltasks ...``); importing this
package makes nothing.
"""
