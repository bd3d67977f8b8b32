"""Deduplicating disks (subtype ``dedup``): chunks stored once per distinct content in pools
shared by several disks.

Public API:

- `DedupHandler` — the handler registered for ``dedup`` (config string: see `handler`).
- `.config`: the YAML ``dedup_pools:`` section, status rows and ``tcmu-py dedup``.
- Pools (`store`): `create_pool`, `ensure_pool`, `read_pool_status`, `check_pool`;
  `acquire_pool` / `release_pool` (the process-wide shared open pool), `configure_collector`
  (`CollectorSettings`: its collector's interval and dead share); `DedupPool`,
  `DedupPoolConfig`, `DedupPoolStatus`, `CheckReport`, `CollectProgress`.
- `DedupBackend` — the BlockBackend a dedup device runs on.
"""

from .backend import DedupBackend
from .handler import DedupHandler
from .store import (
    DEFAULT_CHUNK,
    CheckReport,
    CollectorSettings,
    CollectProgress,
    DedupPool,
    DedupPoolConfig,
    DedupPoolStatus,
    acquire_pool,
    check_pool,
    collector_settings,
    configure_collector,
    create_pool,
    ensure_pool,
    read_pool_status,
    release_pool,
)

__all__ = [
    "DEFAULT_CHUNK",
    "CheckReport",
    "CollectProgress",
    "CollectorSettings",
    "DedupBackend",
    "DedupHandler",
    "DedupPool",
    "DedupPoolConfig",
    "DedupPoolStatus",
    "acquire_pool",
    "check_pool",
    "collector_settings",
    "configure_collector",
    "create_pool",
    "ensure_pool",
    "read_pool_status",
    "release_pool",
]
