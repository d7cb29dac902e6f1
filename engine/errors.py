"""User-facing errors.

Every failure caused by input (a checkpoint, a config file, a CLI flag, a request) is raised as a
``RingleaderError`` whose message says what was wrong and where. Front ends print the message (CLI)
or turn it into an error response (HTTP); anything else that escapes is a bug in the runtime.
"""


class RingleaderError(Exception):
    """An error caused by the user's input; its message names what and where."""


class CheckpointError(RingleaderError):
    """A checkpoint directory, file or tensor that cannot be used."""


class RequestError(RingleaderError):
    """A generation request with an invalid prompt or parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
