"""Errors a user can act on. Each message names the file, field or value and what was expected."""


class GenieSimaError(Exception):
    """Base class: the CLI prints these as one clean line instead of a traceback."""


class ConfigError(GenieSimaError, ValueError):
    """A config field or CLI flag has a wrong type or value."""


class SourceError(GenieSimaError, ValueError):
    """A ``--source`` spec does not name a game we can collect from."""


class ShardError(GenieSimaError):
    """An HDF5 episode shard is missing, truncated, corrupt or of another schema."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"shard {self.path}: {problem}")

    def __reduce__(self):  # raised inside a Ray task, it must cross back to the caller intact
        return type(self), (self.path, self.problem)


class ManifestError(GenieSimaError):
    """The Parquet manifest is missing, unreadable or disagrees with the shards."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"manifest {self.path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)
