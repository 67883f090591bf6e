"""Errors a user can cause, whose message is one line that says what to do."""


class DataError(Exception):
    """Data that is missing or malformed; raise it from `Task.data` for a one-line error instead of a traceback."""


class TaskError(Exception):
    """A --task that cannot be found or is not a valid Task."""
