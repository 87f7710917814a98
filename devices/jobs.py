"""What the device agent answers a refused or failed job with (shared by ``devices.agent`` and its HTTP layer)."""


class JobError(Exception):
    """A job refused or failed: the HTTP status to answer with, and (503) when to retry."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
