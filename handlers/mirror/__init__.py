"""Replicated disks (subtype ``mirror``): one disk over 2-3 legs (image files, block devices,
NBD exports through libnbd), a persisted write-intent bitmap, resync, split brain refused.

Public API:

- `MirrorHandler` — the handler registered for ``mirror`` (config string: `.config`).
- `Mirror`, `MirrorConfig`, `QuorumLost` — the BlockBackend and its settings (`.mirror`, whose
  docstring holds the on-leg format and the ordering rules).
- `open_leg`, `FileLeg`, `NbdLeg` — the legs; `.nbd` — the libnbd binding.
"""

from .handler import MirrorHandler
from .legs import FileLeg, NbdLeg, open_leg
from .mirror import Mirror, MirrorConfig, QuorumLost

__all__ = ["FileLeg", "Mirror", "MirrorConfig", "MirrorHandler", "NbdLeg", "QuorumLost",
           "open_leg"]
