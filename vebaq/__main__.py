"""``python -m vebaq`` is the ``vebaq`` command."""

from vebaq.cli import main

main()
