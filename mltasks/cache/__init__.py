"""Three Redis cache layers for the worker, switched off by a breaker while Redis is away.

- L1, working memory: the last states of each monster, for models that want history.
- L2, actions: the game's own ``ml:action:`` cache (CONTRACT.md section 4), same key and
  value, so an answer the service caches is a hit for the map server too and never
  reaches PostgreSQL.
- L3, model outputs: logits per (archetype, model type, quantized state), shared by all
  workers, so the same situation is not run through a model twice within seconds.

Redis speeds the service up but is never required: every Redis error is caught here,
and while it is unreachable every call answers a miss at once (see `CircuitBreaker`).
Reads are one MGET per batch; writes, hit counters included, are one pipeline.

One concern a module, imported from where it lives:

- `mltasks.cache.client`: `Cache` (the layers, the batch lookup and write), `get_cache`;
- `mltasks.cache.codec`: the keys and values of each layer (the game's L2 key and value);
- `mltasks.cache.writes`: the one script call that writes a batch;
- `mltasks.cache.stats`: the hit counters every worker keeps, and their rates;
- `mltasks.cache.breaker`: `CircuitBreaker`.
"""
