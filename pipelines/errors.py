"""Errors a user can act on. Each message names the file, field or value and what was expected."""


class GenieSimaError(Exception):
    """Base class: the CLI prints these as one clean line instead of a traceback."""


class ConfigError(GenieSimaError, ValueError):
    """A config field or CLI flag has a wrong type or value."""


class SourceError(GenieSimaError, ValueError):
    """A ``--source`` spec does not name a game we can collect from."""


class FileProblemError(GenieSimaError):
    """A problem with one file: ``"<kind> <path>: <problem>"``. Raised inside a Ray task or actor, it must cross
    back to the caller intact, hence ``__reduce__``."""

    kind = "file"

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.kind} {self.path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


class ShardError(FileProblemError):
    """An HDF5 episode shard is missing, truncated, corrupt or of another schema."""

    kind = "shard"


class ManifestError(FileProblemError):
    """The Parquet manifest is missing, unreadable or disagrees with the shards."""

    kind = "manifest"


class CheckpointError(FileProblemError):
    """A training checkpoint is unreadable or holds more than tensors and plain data (it could run code)."""

    kind = "checkpoint"
