"""What an operator runs beside the serving path: ``status``, the metrics endpoint, ``dev``
(the whole service on private servers), the embedded servers, and Flower's guarded config."""
