"""Evaluation errors a user can act on (WhenceError subclasses: the command line exits with status 2)."""

from whence.errors import WhenceError


class EvaluationError(WhenceError):
    """An evaluation's settings or inputs are unusable: a fraction outside (0, 1), a query without a source."""


class ModelTooLargeError(EvaluationError):
    """The tracked layers hold too many parameters for the exact (dense) damped Fisher."""
