"""The one exception type users see: a one-line message saying what and where."""


class StreamqError(Exception):
    """A user-facing failure (bad input, impossible flags, full disk). The CLI prints it and exits 2."""
