class ZooError(Exception):
    """A user-facing error with one clear message."""
