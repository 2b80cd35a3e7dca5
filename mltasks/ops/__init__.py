"""What an operator runs beside the serving path: ``status``, the metrics endpoint, ``dev``
(the whole service on private servers), the embedded servers, the launcher (how the
service's processes are started: command lines, config files, environment, a handle each),
the child processes and private servers beneath it (``processes``), and Flower's guarded
config."""
