"""Exception roots shared by every layer."""


class TcmuError(Exception):
    """Root of every error tcmu-py raises on purpose."""


class ConfigError(TcmuError, ValueError):
    """A configuration value is wrong; the message names the file, key, value and expectation."""


class RingError(TcmuError):
    """The ring is inconsistent (unknown or double completion, malformed entry)."""
