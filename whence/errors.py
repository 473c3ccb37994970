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


class StorageError(WhenceError, OSError):
    """A file or directory on a filesystem (local or a pyarrow one: S3, GCS, ...) cannot be read or written:
    unreachable, no such bucket, no permission. The message names the location (credentials redacted)."""


class NonFiniteError(WhenceError):
    """A NaN or inf where values are made (model weights, activations, output gradients, prepared queries,
    scores); the message names the parameter or layer and, where known, the sequences."""

    def __init__(self, message: str, layer: str | None = None, rows: list[int] | None = None):
        super().__init__(message)
        self.layer, self.rows = layer, list(rows or [])

    def __reduce__(self):  # keep layer and rows when Ray pickles the error across processes
        return (NonFiniteError, (self.args[0], self.layer, self.rows))

    def naming(self, sequences: list[str]) -> "NonFiniteError":
        """The same error with the affected batch rows named by `sequences` (one label per batch row)."""
        named = [sequences[row] for row in self.rows if row < len(sequences)]
        more = f" in sequences {', '.join(named[:8])}" + (" ..." if len(named) > 8 else "") if named else ""
        return NonFiniteError(f"{self.args[0]}{more}", self.layer, self.rows)


class SettingsError(WhenceError, ValueError):
    """A setting out of its range (a negative damping, a one-token window, ...); `setting` names the field, which
    the command line turns into its option (--seq-len)."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting

    def __reduce__(self):  # keep the field name when Ray pickles the error across processes
        return (SettingsError, (self.args[0], self.setting))


class ClusterError(WhenceError):
    """Ray could not be started or joined (a busy machine's start-up timeout, an unreachable address)."""
