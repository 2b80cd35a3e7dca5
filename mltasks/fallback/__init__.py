"""The fallback ladder: the one table of levels (``ladder``), which level serves
(``levels``), which workers consume which queues (``registry``), what each worker's host can
take (``probes``), climbing back up (``recovery``), and level 4's rule-based policy
(``policy``, ``rules``)."""
