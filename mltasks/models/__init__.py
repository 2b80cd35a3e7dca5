"""The model family: signatures (``family``), what the exporter writes and which file wins
(``discovery``), loading and running (``loaded``, ``engine``), fusion, working-memory windows
(``history``), precisions (``variants``), versions, canaries, and the demo models."""
