"""The ``ceph`` subtype's config string and YAML options.

Config string (``key=value`` items, ``;``-separated; ``,`` too, for targetcli)::

    ceph/image=rbd/vol1;conf=/etc/ceph/ceph.conf;id=admin;create=1

tcmu-runner's ``rbd`` form, the image first without a key, is taken too (`parse`), so that its
backstores move over by changing the subtype: ``ceph/rbd/vol1;osd_op_timeout=30;conf=...``
(``osd_op_timeout``, ``conf`` and ``id`` are the same keys in both).

- ``image`` (required): ``POOL/IMAGE`` or ``POOL/NAMESPACE/IMAGE``;
- ``conf``: the cluster's ceph.conf (default ``/etc/ceph/ceph.conf``);
- ``id``: the client id (``admin`` for client.admin, the default);
- ``keyring``: that client's keyring (default: what the conf file says);
- ``create``: ``1`` creates the image (and its namespace) with the device's size when it does
  not exist (a device of size 0, "the image's size", cannot); ``0`` (default) refuses a
  missing image;
- ``lock``: ``exclusive`` (default: take the image's exclusive lock at open, which needs the
  image's ``exclusive-lock`` feature; another client holding it makes the device NOT READY)
  or ``shared`` (no lock taken: several gateways share the image, and the initiators must
  coordinate);
- ``osd_op_timeout``: seconds before a stalled OSD operation fails with a retryable error
  (default `default_osd_op_timeout` of the device's ``cmd_time_out``: 14 s with the kernel's
  default 30; keep a value given below half the device's ``cmd_time_out``);
- ``rbd_cache``: ``1`` runs librbd's cache (writes acknowledged from the daemon's memory once
  the initiator has sent its first flush; WCE=1, FUA and SYNCHRONIZE CACHE flush it); ``0``
  (default): no cache, every write acknowledged is on the OSDs (WCE=0). The device's
  ``write_cache`` does not turn it on: unlike the page cache behind an image file, librbd's
  cache dies with the daemon, and another gateway on the image does not see it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tcmu_py.errors import ConfigError
from tcmu_py.handler import parse_options

#: RBD pool, namespace and image names and client ids: no ``/``, ``;`` or ``,`` (the config
#: string's separators), no ``@`` (``rbd`` reads ``image@snap`` as a snapshot: an image named so
#: could be made by librbd but not addressed by ``rbd info`` or ``rbd rm``), not empty.
_NAME = re.compile(r"[A-Za-z0-9_.:-]+\Z")
LOCK_MODES = ("exclusive", "shared")
#: `default_osd_op_timeout`'s ceiling.
OSD_OP_TIMEOUT_MAX = 30
#: The kernel's default ``cmd_time_out`` of a TCMU device (seconds): `parse`'s when not told.
KERNEL_CMD_TIME_OUT = 30


def default_osd_op_timeout(cmd_time_out: int) -> int:
    """``osd_op_timeout`` for a config string that gives none, on a device whose kernel
    command timeout is `cmd_time_out` seconds (0: none): less than half of it (14 s for the
    kernel's default 30), at most `OSD_OP_TIMEOUT_MAX`, at least 1; the maximum when the kernel
    has no timeout. A command the kernel times out first fails LOGICAL UNIT COMMUNICATION
    FAILURE 02h/08h/00h, which sd does not retry (an I/O error for the application), where
    librbd's timeout answers the retryable NOT READY 02h/04h/01h; and in a long cluster stall
    librbd answers a WRITE after up to two of its timeouts (it held the write behind another to
    the same object: 9 s measured with 5 s, 45 s with 25 s), so two must fit."""
    if cmd_time_out <= 0:
        return OSD_OP_TIMEOUT_MAX
    return max(1, min(OSD_OP_TIMEOUT_MAX, (cmd_time_out - 1) // 2))


@dataclass(frozen=True)
class CephConfig:
    pool: str
    namespace: str
    image: str
    conf: str = "/etc/ceph/ceph.conf"
    client: str = "admin"
    keyring: str | None = None
    create: bool = False
    lock: str = "exclusive"
    osd_op_timeout: int = default_osd_op_timeout(KERNEL_CMD_TIME_OUT)  # see `parse`
    rbd_cache: bool = False

    @property
    def spec(self) -> str:
        """``pool/[namespace/]image`` as written in the config."""
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)


def _image(value: str) -> tuple[str, str, str]:
    parts = value.split("/")
    if len(parts) not in (2, 3) or not all(_NAME.match(p) for p in parts):
        raise ValueError("expected POOL/IMAGE or POOL/NAMESPACE/IMAGE (names of letters, "
                         "digits, _ . : -)")
    return (parts[0], "", parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return value == "1"


def _lock(value: str) -> str:
    if value not in LOCK_MODES:
        raise ValueError(f"expected one of {', '.join(LOCK_MODES)}")
    return value


def _abs_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("expected an absolute path")
    return value


def _timeout(value: str) -> int:
    n = int(value) if value.isdigit() else 0
    if not 1 <= n <= 3600:
        raise ValueError("expected whole seconds, 1..3600")
    return n


def _client(value: str) -> str:
    client = value.removeprefix("client.")
    if not _NAME.match(value) or not _NAME.match(client):
        raise ValueError("expected a client id such as admin or iscsi.gw1")
    return client


def _keyed(cfgstring: str) -> str:
    """`cfgstring` with tcmu-runner's leading ``POOL/[NAMESPACE/]IMAGE`` (no key) given its
    ``image=`` key; any other string as it is."""
    head = re.split(r"[;,]", cfgstring, maxsplit=1)[0]
    if "/" in head and "=" not in head:
        return f"image={cfgstring}"
    return cfgstring


def osd_timeout_warning(osd_op_timeout: int, cmd_time_out: int) -> str | None:
    """Why an ``osd_op_timeout`` not below half the device's ``cmd_time_out`` (0: none) hurts,
    or None when it is below."""
    if not 0 < cmd_time_out <= 2 * osd_op_timeout:
        return None
    return (f"osd_op_timeout {osd_op_timeout} s is not below half the device's cmd_time_out "
            f"{cmd_time_out} s: in a long cluster stall librbd answers a write after up to two "
            "of its timeouts, and the kernel fails commands itself first (LOGICAL UNIT "
            "COMMUNICATION FAILURE, an I/O error for the application) instead of the retryable "
            f"NOT READY; expected at most {default_osd_op_timeout(cmd_time_out)}")


def parse(cfgstring: str, cmd_time_out: int = KERNEL_CMD_TIME_OUT) -> CephConfig:
    """The config of `cfgstring` for a device whose kernel command timeout is `cmd_time_out`
    (it sets the default ``osd_op_timeout``); `ConfigError` names the key that is wrong."""
    items = parse_options(_keyed(cfgstring), {
        "image": _image, "conf": _abs_path, "id": _client, "keyring": _abs_path,
        "create": _flag, "lock": _lock, "osd_op_timeout": _timeout, "rbd_cache": _flag,
    })
    if "image" not in items:
        raise ConfigError(f"config string {cfgstring!r}: key 'image' missing; expected "
                          "image=POOL/[NAMESPACE/]IMAGE")
    pool, namespace, image = items.pop("image")
    if "id" in items:
        items["client"] = items.pop("id")
    items.setdefault("osd_op_timeout", default_osd_op_timeout(cmd_time_out))
    return CephConfig(pool, namespace, image, **items)
