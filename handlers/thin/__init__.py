"""Thin-provisioned disks (subtype ``thin``): sparse files in shared, capacity-limited pools.

Public API:

- `ThinHandler` — the handler registered for ``thin`` (config string: see `handler`).
- `.config`: the YAML `pools:` section (`PoolSpec`), status rows and `tcmu-py thin`.
- Pools: `create_pool`, `ensure_pool`, `read_pool_status` (admin, for the CLI/daemon);
  `acquire_pool` / `release_pool` (the process-wide shared open pool); `Pool` (an open pool),
  `PoolConfig`, `PoolStatus`, `DiskStatus`, `DEFAULT_UNIT`.
- `register_pool` / `unregister_pool` — let config strings name a pool (``pool=<name>``).
- `ThinBackend`, `ThinProvisioningInfo` — the BlockBackend a thin device runs on.
"""

from .backend import ThinBackend, ThinProvisioningInfo
from .handler import ThinHandler, register_pool, unregister_pool
from .pool import (
    DEFAULT_UNIT,
    DiskStatus,
    Pool,
    PoolConfig,
    PoolStatus,
    acquire_pool,
    create_pool,
    ensure_pool,
    read_pool_status,
    release_pool,
)

__all__ = [
    "DEFAULT_UNIT",
    "DiskStatus",
    "Pool",
    "PoolConfig",
    "PoolStatus",
    "ThinBackend",
    "ThinHandler",
    "ThinProvisioningInfo",
    "acquire_pool",
    "create_pool",
    "ensure_pool",
    "read_pool_status",
    "register_pool",
    "release_pool",
    "unregister_pool",
]
