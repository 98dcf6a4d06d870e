"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class ForcelabError(Exception):
    """A problem with the user's input (a file, a key, a shape) - never an internal bug.

    The message says what was wrong, where (file, key) and what to do."""


class ConfigError(ForcelabError, KeyError):
    """A config file or override that does not fit the schema."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(ForcelabError):
    """A checkpoint that is missing, corrupt, or does not match the model."""
