"""``python -m bridge``: run one bridge until SIGINT or SIGTERM."""

import signal
import threading

from bridge.loop import Bridge
from mltasks.config import config_or_exit, get_config
from mltasks.heap import freeze_startup_objects


def main() -> None:
    from mltasks.logs import configure_logging
    from mltasks.ops.exporter import start_bridge_metrics

    config = get_config()
    configure_logging(config.logging)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    m = config.monitoring
    server = start_bridge_metrics(config, m.metrics_host, m.bridge_metrics_port)
    try:
        bridge = Bridge(config)
        freeze_startup_objects()  # a full collection then skips what lives as long as we do
        bridge.run(stop)
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    config_or_exit("bridge")  # an invalid configuration: one line naming file and key, exit 2
    main()
