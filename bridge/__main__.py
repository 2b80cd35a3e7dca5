"""``python -m bridge``: run one bridge until SIGINT or SIGTERM."""

from bridge.loop import main
from mltasks.config import config_or_exit

if __name__ == "__main__":
    config_or_exit("bridge")  # an invalid configuration: one line naming file and key, exit 2
    main()
