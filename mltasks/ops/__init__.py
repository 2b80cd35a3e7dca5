"""What an operator runs beside the serving path: ``status``, the metrics endpoint, ``dev``
(the whole service on private servers), the embedded servers, the child processes and
private servers everything here starts (``processes``), and Flower's guarded config."""
