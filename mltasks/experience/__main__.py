"""``python -m mltasks.experience``: the recorder, as `mltasks experience record` runs it."""

from __future__ import annotations

import sys

from mltasks.experience.recorder import main

if __name__ == "__main__":
    sys.exit(main())
