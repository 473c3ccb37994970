"""Errors a user can act on. Each message names what is wrong and where (file, line, module, query id)."""


class WhenceError(Exception):
    """Base class: the command line prints these as `whence CMD: error: ...` and exits with status 2."""


class ModelError(WhenceError):
    """The model directory or id is not a usable causal LM, or its modules cannot be tracked."""


class FactorsMismatchError(WhenceError):
    """Factors were fitted for another model, or with other tracked layers or shapes."""


class QueryError(WhenceError):
    """A query is malformed: a missing field, an empty completion, longer than the context window."""


class CorpusError(WhenceError):
    """A corpus row is malformed (raised in --strict mode; otherwise such rows are skipped and counted)."""


class RunStateError(WhenceError):
    """An output directory holds a run with other arguments; pass --overwrite to replace it."""
