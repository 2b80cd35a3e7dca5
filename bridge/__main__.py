"""``python -m bridge``: run one bridge until SIGINT or SIGTERM."""

from bridge.loop import main

if __name__ == "__main__":
    main()
