"""Disks on Ceph RBD images (subtype ``ceph``) through librbd's C API, asynchronously.

Public API:

- `CephHandler` — the handler registered for ``ceph`` (config string: `.config`).
- `CephDevice`, `RbdBackend`, `open_backend` — the device and its backend (`.device`, whose
  docstring states what is promised and why).
- `.librbd` — the cffi binding of librados / librbd.
"""

from .device import CephDevice, RbdBackend, open_backend
from .handler import CephHandler

__all__ = ["CephDevice", "CephHandler", "RbdBackend", "open_backend"]
