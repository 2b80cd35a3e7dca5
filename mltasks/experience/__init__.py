"""Experience recording (issue 29): every answered decision kept as a transition (state,
action, next state of the same monster) for the next model, off the answer path.

- ``recorder``: `mltasks experience record`, a process of its own that moves answered rows
  into ``ai_experience`` every few seconds, set-based in PostgreSQL (sql/experience.sql).
- ``metrics``: its Prometheus counters and gauges, on a registry and port of its own.
- ``export``: `mltasks experience export DIR`, one ``.npz`` per archetype.
- ``cli``: the two subcommands.
"""
