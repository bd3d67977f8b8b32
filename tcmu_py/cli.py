"""`tcmu-py`: the operator's command line.

    tcmu-py serve [-c CONFIG] [-v] [--metrics ADDR:PORT]
                                      run the daemon (with -c: create the config's LIO objects too;
                                      with --metrics: a Prometheus endpoint)
    tcmu-py apply [-c CONFIG]         create the configuration's backstores and exports
    tcmu-py down  [-c CONFIG]         remove what tcmu-py created, nothing else
    tcmu-py check [-c CONFIG]         validate a configuration file, create nothing
    tcmu-py status [-i S] [--json]    devices, counters, IOPS/throughput/latency over S seconds
    tcmu-py log-level LEVEL           the running daemon's log level (debug, info, ...), no restart
    tcmu-py lab [-c CONFIG] [-- CMD]  boot the distribution kernel in QEMU and serve there
    tcmu-py vtl ...                   virtual tape library administration
    tcmu-py thin ...                  thin pool administration
    tcmu-py <name> ...                a command of an installed handler (`Handler.commands`)

Without -c the embedded default configuration is used (one disk under /var/lib/tcmu-py, exported
locally through tcm_loop and over iSCSI on 127.0.0.1).

Exit status: 0 success, 1 operational failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tcmu_py.daemon import DEFAULT_DATA_PLANE, DEFAULT_NATIVE_LOOP, DEFAULT_POLL_US
from tcmu_py.daemon.control import LOG_LEVELS, RUN_DIR
from tcmu_py.errors import LIO_EXTRA_HINT, ConfigError, MissingExtra, TcmuError

if TYPE_CHECKING:
    from tcmu_py.handler import CliCommand, Handler

# Each subcommand imports what it needs when it runs: `status` and `down` must start fast (in
# the lab's emulated guest every module imported costs tens of milliseconds).


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, thread, message, and the device when
    known."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        device = getattr(record, "device", None)
        if device is not None:
            out["device"] = device
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(verbose: int, as_json: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if as_json
        # the thread's name (`tcmu:<device>`, `reopen-<device>`, `tcmu-udev`, ...): which of
        # the daemon's threads did what, when a race is to be told from a log
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(threadName)s]: "
                               "%(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler])


def _installed() -> dict[str, type[Handler]]:
    """Every registered handler that imports (the registry logs the others)."""
    from tcmu_py.handler import load_handlers

    registry = load_handlers()
    out = {}
    for name in registry:
        try:
            out[name] = registry[name]
        except KeyError:  # failed to import: logged by the registry; its devices get reported
            continue
    return out


def _load(path: str | None) -> Any:
    from tcmu_py.daemon import config as cfg

    registry = _installed()
    checks = {name: handler.check_config for name, handler in registry.items()}
    if path is None:
        return cfg.load_default_config(handlers=checks, registry=registry)
    return cfg.load_config(path, handlers=checks, registry=registry)


def prepare_handlers(config: Any) -> None:
    """Run every installed handler's `Handler.prepare` (thin creates or updates the YAML's
    pools), after the whole file validated and before any LIO object is created."""
    for handler in _installed().values():
        handler.prepare(config)


def _need_rtslib(command: str) -> None:
    """The commands that create or remove LIO objects need rtslib-fb (the `lio` extra): say so
    in one line (exit 2) before anything is read or created."""
    from importlib.util import find_spec

    # find_spec, not import: `serve -c` serves the rings before it imports rtslib-fb (slow).
    if find_spec("rtslib_fb") is None:
        raise MissingExtra(
            f"{command} needs rtslib-fb, which is not installed: {LIO_EXTRA_HINT}")


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the YAML (with each handler's check of its options: a thin pool's pool.json is
    read) and the LIO state file of its state_dir, which `apply` and `down` would read next."""
    from tcmu_py.daemon import lio

    config = _load(args.config)
    lio.read_state(config.state_dir)
    registry = _installed()
    for dev in config.devices:
        handler = registry.get(dev.handler)
        for warning in handler.device_warnings(dev) if handler is not None else ():
            print(f"{args.config or '<default>'}: warning: device {dev.name}: {warning}",
                  file=sys.stderr)
    print(f"{args.config or '<default>'}: OK ({len(config.devices)} device(s))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the rings first, then everything slower: a restarted daemon must answer the
    commands waiting on its rings before the kernel's command timeout, so the YAML, netlink,
    udev and LIO (rtslib) are loaded only once every present device is served."""
    from tcmu_py.daemon.serve import Daemon

    if args.config or args.default:
        _need_rtslib("serve -c")
    metrics = None
    if args.metrics:
        from tcmu_py.daemon.metrics import parse_address

        metrics = parse_address(args.metrics)
    daemon = Daemon(workers=args.workers, poll_us=args.poll_us, run_dir=Path(args.run_dir),
                    data_plane=args.data_plane, native_loop=args.native_loop,
                    dbus_bus=None if args.no_dbus else "SYSTEM")
    daemon.start_serving()
    try:
        if metrics is not None:
            daemon.serve_metrics(*metrics)
        config = _load(args.config) if (args.config or args.default) else None
        daemon.subscribe()
        if config is not None:
            from tcmu_py.daemon import lio

            prepare_handlers(config)
            # Backstores first, then the daemon serves them, then the LUNs (whose scan reaches
            # the ring at once): see vm-lab.md.
            daemon.reopen_failed()  # devices naming a pool or library the YAML declares
            lio.apply_backstores(config)
            daemon.rescan()
            lio.apply_exports(config)
    except BaseException:
        daemon.shutdown()
        raise
    ready = getattr(args, "ready_file", None)
    if ready:
        Path(ready).write_text("ready\n")
    from tcmu_py.daemon.sdnotify import notify

    notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {len(daemon.served)} device(s)")
    try:
        daemon.run()
    finally:
        notify("STOPPING=1")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from tcmu_py.daemon import lio

    _need_rtslib("apply")
    config = _load(args.config)
    prepare_handlers(config)
    lio.apply_backstores(config)
    lio.apply_exports(config)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Remove what the state file records; of the YAML only ``state_dir`` is read (a file that
    no longer validates, or names a handler no longer installed, can still be taken down)."""
    from tcmu_py.daemon import lio
    from tcmu_py.daemon.config import load_state_dir

    lio.down(load_state_dir(args.config))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tcmu_py.daemon.control import query_status
    from tcmu_py.daemon.status import add_windows, render_status

    run_dir = Path(args.run_dir)
    try:
        status = query_status(run_dir)
        if args.interval > 0:  # rates over a window, as iostat: two snapshots `interval` apart
            earlier = status
            time.sleep(args.interval)
            status = query_status(run_dir)
            add_windows(status, earlier)
        else:
            add_windows(status, None)
    except TcmuError as exc:
        print(f"tcmu-py: {exc}", file=sys.stderr)
        status = None
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print(render_status(status, args.config))
    return 0 if status is not None else 1


def cmd_log_level(args: argparse.Namespace) -> int:
    """Change the running daemon's log level at once (no restart)."""
    from tcmu_py.daemon.control import request

    answer = request(Path(args.run_dir), f"log-level {args.level}")
    if "error" in answer:
        print(f"tcmu-py: {answer['error']}", file=sys.stderr)
        return 2
    print(f"log level: {answer['level']} (was {answer['previous']})")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from tcmu_py import lab

    return int(lab.main(args.rest))


#: Subcommands that parse their own options (everything after the name goes to them).
_DELEGATED = {"lab": cmd_lab}
#: The commands of tcmu-py itself: a handler's command of one of these names is ignored.
_BUILTIN = frozenset({"serve", "apply", "down", "check", "status", "log-level", *_DELEGATED})


def handler_commands() -> dict[str, CliCommand]:
    """Every installed handler's `Handler.commands` by name (a name taken by tcmu-py itself or
    by an earlier handler is logged and ignored)."""
    out: dict[str, CliCommand] = {}
    for subtype, handler in _installed().items():
        try:
            commands = handler.commands()
        except Exception:  # a broken third-party handler must not take the CLI down
            logging.getLogger(__name__).exception("handler %r: commands() failed", subtype)
            continue
        for name, command in commands.items():
            if name in _BUILTIN or name in out:
                logging.getLogger(__name__).error(
                    "handler %r: command %r is taken; ignored", subtype, name)
                continue
            out[name] = command
    return out


def _run_command(command: CliCommand) -> Any:
    def fn(args: argparse.Namespace) -> int:
        return int(command.main(args.rest))

    return fn


def build_parser(handler_commands_listed: bool = True) -> argparse.ArgumentParser:
    """The parser of tcmu-py's own commands; with ``handler_commands_listed`` the installed
    handlers' commands are listed too (for --help: that imports every handler)."""
    p = argparse.ArgumentParser(prog="tcmu-py", description="Userspace SCSI devices for Linux LIO")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log each CDB (debug)")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("-c", "--config", help="YAML configuration: create its LIO objects too")
    s.add_argument("--default", action="store_true", help="use the embedded default configuration")
    s.add_argument("--workers", type=int, default=4, help="I/O threads per device (default 4)")
    s.add_argument(
        "--poll-us",
        type=int,
        default=DEFAULT_POLL_US,
        metavar="US",
        help="busy-poll at queue depth 1: after serving a lone command, watch the ring up to "
        "US microseconds for the next one before sleeping (only while commands follow each "
        "other within US on average, and with the native loop only while watching brings "
        "more commands: it probes every 2 s); lower latency for CPU, 0 turns it off "
        f"(default {DEFAULT_POLL_US})",
    )
    s.add_argument(
        "--data-plane",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_DATA_PLANE,
        help="serve plain READ/WRITE of devices whose data is a file extent (raw, thin) in C; "
        "--no-data-plane keeps every command in Python, for debugging and comparison "
        f"(default {'on' if DEFAULT_DATA_PLANE else 'off'})",
    )
    s.add_argument(
        "--native-loop",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_NATIVE_LOOP,
        help="with the data plane, give each such device a C thread that owns its ring and "
        "hands Python only the commands C does not execute; --no-native-loop runs the plane "
        "in the Python loop thread instead "
        f"(default {'on' if DEFAULT_NATIVE_LOOP else 'off'})",
    )
    s.add_argument("--ready-file", help="write this file once every device is served")
    s.add_argument("--no-dbus", action="store_true",
                   help="do not offer org.kernel.TCMUService1 on the system bus (targetcli "
                   "then lists no tcmu-py subtype)")
    s.add_argument("--run-dir", default=str(RUN_DIR), help=f"lock and control socket ({RUN_DIR})")
    s.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (off by default; needs the "
        "'metrics' extra). :PORT listens on every address",
    )
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("log-level", help="change the running daemon's log level")
    s.add_argument("level", choices=LOG_LEVELS)
    s.add_argument("--run-dir", default=str(RUN_DIR), help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_log_level)

    for name, fn, text in (
        ("apply", cmd_apply, "create the configuration's LIO objects"),
        ("down", cmd_down, "remove the LIO objects tcmu-py created"),
        ("check", cmd_check, "validate a configuration"),
        ("status", cmd_status, "show devices and counters"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("-c", "--config", help="YAML configuration (default: embedded)")
        s.add_argument("--run-dir", default=str(RUN_DIR), help=argparse.SUPPRESS)
        s.set_defaults(fn=fn)
        if name == "status":
            s.add_argument(
                "-i",
                "--interval",
                type=float,
                default=1.0,
                help="seconds between the two samples the rates are taken from "
                "(default 1; 0: since each device started)",
            )
            s.add_argument(
                "--json", action="store_true", help="print the raw status (with rates) as JSON"
            )

    # Listed for --help; their arguments are parsed by their own modules (see _DELEGATED).
    sub.add_parser(
        "lab", help="boot the distribution kernel in QEMU and serve there (tcmu-py lab --help)"
    )
    if handler_commands_listed:
        for name, command in sorted(handler_commands().items()):
            sub.add_parser(name, help=command.help)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = 0
    as_json = False
    while argv[:1] in (["-v"], ["--verbose"], ["--log-json"]):
        if argv.pop(0) == "--log-json":
            as_json = True
        else:
            verbose += 1
    builtin = bool(argv) and argv[0] in _BUILTIN
    commands = {} if not argv or builtin else handler_commands()
    if argv[:1] and argv[0] in _DELEGATED:
        args = argparse.Namespace(fn=_DELEGATED[argv[0]], rest=argv[1:], verbose=verbose)
    elif argv[:1] and argv[0] in commands:
        args = argparse.Namespace(fn=_run_command(commands[argv[0]]), rest=argv[1:],
                                  verbose=verbose)
    else:
        args = build_parser(not builtin).parse_args(["-v"] * verbose + argv)
    _setup_logging(args.verbose, as_json)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        text = str(exc)  # one problem: one line; several: a count, then one line each
        sep = "\n" if "\n" in text else " "
        print(f"tcmu-py: configuration error:{sep}{text}", file=sys.stderr)
        return 2
    except MissingExtra as exc:
        print(f"tcmu-py: {exc}", file=sys.stderr)
        return 2
    except TcmuError as exc:
        print(f"tcmu-py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    threading.current_thread().name = "main"
    sys.exit(main())
