"""The worker's side of a request, in the order a batch meets it: ``tasks`` (the Celery task
that receives it), ``validation`` (what a row must be), ``inference`` (look up the cache,
run the fusion, build answers),
``answers`` (one statement into ``ai_responses``), ``records`` (the typed rows and answers
that travel from the bridge's claim to that statement), ``worker`` (the worker process: queues,
readiness, heartbeats)."""
