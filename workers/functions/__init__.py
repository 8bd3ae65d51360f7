"""The built-in functions: :mod:`.echo` (every event) and :mod:`.vrops` (maintenance mode)."""
