"""Exception roots shared by every layer."""


class TcmuError(Exception):
    """Root of every error tcmu-py raises on purpose."""


class ConfigError(TcmuError, ValueError):
    """A configuration value is wrong; the message names the file, key, value and expectation."""


class DeviceUnavailable(TcmuError):
    """Raised by a handler's ``open`` when what the device needs cannot be reached *for now* (a
    Ceph cluster not answering, a server down), as opposed to a configuration that can never
    work. The daemon then serves the device NOT READY, LOGICAL UNIT IS IN PROCESS OF BECOMING
    READY (02h/04h/01h: initiators retry) and opens it again in the background until it opens
    or is removed (`tcmu_py.daemon.serve`)."""


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
