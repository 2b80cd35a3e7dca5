"""The worker's side of a request, in the order a batch meets it: ``batch`` (the Celery task
that receives it), ``validation`` (what a row must be), ``plan`` (the batch's members and
its one cache lookup), ``voices`` (each fusion member's say), ``inference`` (fuse and build
the answers), ``answers`` (one statement into ``ai_responses``), ``records`` (the typed rows
and answers that travel from the bridge's claim to that statement). Around it: ``process``
(what a worker process holds), ``warm`` (its warm-up before the first batch), ``bootsteps``
and ``monitor`` (queues, heartbeats, probes), ``jobs`` (beat's periodic jobs)."""
