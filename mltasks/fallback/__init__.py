"""The fallback ladder: which level serves (``levels``), what each worker's host can take
(``probes``), climbing back up (``recovery``), and level 4's rule-based policy (``policy``,
``rules``)."""
