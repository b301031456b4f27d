"""The one exception type the CLI turns into a clear message instead of a traceback."""


class LmforgeError(Exception):
    """A user-facing error: bad input, bad config, missing or corrupt files."""
