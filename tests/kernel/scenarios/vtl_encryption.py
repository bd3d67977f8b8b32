"""Tape data encryption through the real kernel, driven by Debian's `stenc` (1.0.7), as an
administrator would: set a key on a drive (SECURITY PROTOCOL OUT, SSC-5 8.5.3.2), write with
dd through st, check `stenc --detail` (pages 0020h and 0021h), read back with the key, turn
encryption off and read again (the drive refuses: DATA PROTECT, no plain text), and look at
the cartridge's files on the library directory: none holds the plain text or the key (nor does
the daemon's log).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

from guestlib import Context, run, scenario, wait_for

from scenarios.vtl import load, mt, mtx_status_with, serve_library, sh, slot_of

BARCODE = "ABC000L8"
MARKER = b"TCMU-PY-PLAINTEXT-MARKER-7f3a9c"
BLOCK = 64 << 10


def stenc(ctx: Context, *argv: str, check: bool = True) -> str:
    res = run(["stenc", *argv], timeout=ctx.remaining(60), check=False)
    out = res.stdout + res.stderr
    with open(ctx.artifacts / "stenc.log", "a") as f:
        f.write(f"$ stenc {' '.join(argv)}\n{out}\n")
    if check:
        assert res.returncode == 0, f"stenc {' '.join(argv)}: exit {res.returncode}\n{out}"
    return out


def dd_read(ctx: Context, tape: Path, out: Path) -> int:
    res = run(["dd", f"if={tape}", f"of={out}", f"bs={BLOCK}"], timeout=ctx.remaining(60),
              check=False)
    return res.returncode


@scenario(timeout=300)
def stenc_key_write_read_and_refusal(ctx: Context) -> None:
    """stenc -e on -k key -a 1; dd write; --detail shows encryption on and the volume
    decryptable; dd read back identical; stenc -e off; dd read fails without plain text; the
    cartridge's files and the daemon's log hold neither the plain text nor the key."""
    assert shutil.which("stenc"), "stenc missing (bootstrap installs it)"
    lab = serve_library(ctx)
    st = wait_for(lambda: mtx_status_with(ctx, lab, BARCODE), ctx.remaining(60),
                  "the changer to report the cartridge")
    load(ctx, lab, slot_of(st, BARCODE), 0)
    tape = lab.tapes[0]
    mt(ctx, tape, "setblk", "0")

    key = random.Random(20).randbytes(32)
    keyfile = ctx.workdir / "lab.key"
    keyfile.write_text(key.hex() + "\nlab-key-2026\n")  # stenc: hex key, then a description
    os.chmod(keyfile, 0o600)
    out = stenc(ctx, "-f", str(tape), "-e", "on", "-k", str(keyfile), "-a", "1")
    assert "Success" in out, out

    payload = bytearray()
    rng = random.Random(7)
    for i in range(32):
        payload += MARKER + f"-{i:04d}-".encode() + rng.randbytes(BLOCK - len(MARKER) - 6)
    src = ctx.workdir / "payload"
    src.write_bytes(payload)
    sh(ctx, "dd", f"if={src}", f"of={tape}", f"bs={BLOCK}")
    mt(ctx, tape, "rewind")

    detail = stenc(ctx, "-f", str(tape), "--detail")
    ctx.details["stenc_detail"] = detail
    assert "Drive Encryption:        on" in detail or "Drive Encryption:on" in detail.replace(
        " ", ""), detail
    assert "Encrypting" in detail and "Decrypting" in detail, detail
    assert "lab-key-2026" in detail, detail  # the U-KAD stenc sent with the key
    assert "Encrypted and able to decrypt" in detail, detail
    mt(ctx, tape, "rewind")

    back = ctx.workdir / "back"
    assert dd_read(ctx, tape, back) == 0
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(payload).digest()

    out = stenc(ctx, "-f", str(tape), "-e", "off")
    assert "Success" in out, out
    mt(ctx, tape, "rewind")
    detail_off = stenc(ctx, "-f", str(tape), "--detail")
    ctx.details["stenc_detail_off"] = detail_off
    assert "unable to decrypt" in detail_off, detail_off
    mt(ctx, tape, "rewind")
    refused = ctx.workdir / "refused"
    assert dd_read(ctx, tape, refused) != 0, "reading without the key succeeded"
    assert MARKER not in (refused.read_bytes() if refused.exists() else b"")

    # The cartridge's files as the daemon wrote them (<library>/media/<barcode>): neither the
    # marker nor the key in any of them; nor is the key in the daemon's log.
    mt(ctx, tape, "rewind")
    cart = lab.library / "media" / BARCODE
    files = sorted(p for p in cart.iterdir() if p.is_file())
    assert any(p.name == "data" for p in files), files
    for p in files:
        raw = p.read_bytes()
        assert MARKER not in raw, f"{p} holds the plain text"
        assert key not in raw and key.hex().encode() not in raw, f"{p} holds the key"
    ctx.details["cartridge_files"] = {p.name: p.stat().st_size for p in files}
    daemon_log = (ctx.artifacts / "daemon.log").read_bytes()
    assert key.hex().encode() not in daemon_log and key not in daemon_log
