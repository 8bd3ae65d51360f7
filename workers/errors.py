"""What a function raises to say how its failure should be treated (defined in the kernel's
error tree, :mod:`vebaq.core.errors`, and offered here where function authors look)."""

from vebaq.core.errors import PermanentError, PoisonMessage

__all__ = ["PermanentError", "PoisonMessage"]
