"""Exception roots shared by every layer."""


class TcmuError(Exception):
    """Root of every error tcmu-py raises on purpose."""


class ConfigError(TcmuError, ValueError):
    """A configuration value is wrong; the message names the file, key, value and expectation."""


class RingError(TcmuError):
    """The ring is inconsistent (unknown or double completion, malformed entry)."""


class StateFileError(ConfigError):
    """A file tcmu-py wrote earlier (pool.json, the LIO state file) is unreadable or malformed;
    the message names the file, the key, the value and what was expected. A ConfigError: the
    command line exits 2, the operator has to look at the file."""


class MissingExtra(TcmuError):
    """An optional dependency the command needs is not installed; the message names the extra
    to install (a usage error: the command line exits 2)."""


#: What `pip install` adds rtslib-fb, for the commands that create or remove LIO objects.
LIO_EXTRA_HINT = "pip install 'tcmu-py[lio]'"
