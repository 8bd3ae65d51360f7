"""Exceptions a function raises to say how its failure should be treated."""


class PermanentError(Exception):
    """Retrying cannot help (bad request, unknown resource, malformed event): the event goes
    straight to the dead letters with this message as the reason."""


class PoisonMessage(PermanentError):
    """The task message itself is unusable: undecodable, not a CloudEvent, unknown pool."""
