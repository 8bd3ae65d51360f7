"""The ``vrops`` pool: mirrors host maintenance mode into vRealize Operations (see issue 3)."""
