"""The `vdev` command line."""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import resource
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import trio

from vdev import __version__
from vdev.config import ConfigError, DeviceSpec, build_device, load_config
from vdev.ctl.server import ControlServer, default_control_path, name_devices
from vdev.domain.spec import DOMAIN_KINDS, MEMORY_POLICIES, DomainSpec
from vdev.net import format_mac, parse_mac
from vdev.plugins import PluginError, plugins
from vdev.protocol.describe import known_request_names
from vdev.qemu import ACCELS, QemuError, mem_mib, render_args
from vdev.server import DeviceServer, ServerError
from vdev.trace import DEVICE_FEATURES, TraceError, TraceOptions, Tracer
from vdev.trioutil import unwrap_single
from vdev.units import parse_size

log = logging.getLogger("vdev")

EXIT_USAGE = 2


class _HasName(Protocol):
    name: str


_Named = TypeVar("_Named", bound=_HasName)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole_number(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing")
    return names


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.replace("-", "_"), value


RUN_EPILOG = """\
examples:
  vdev run blk --socket /tmp/disk.sock --backend file --path disk.img
  vdev run blk --socket /tmp/ram.sock --backend ram --size 1G --queues 2
  vdev run net --socket /tmp/nic.sock --backend tap --tap vdev0 --bridge br0
  vdev run net --socket /tmp/nic.sock --backend echo
  vdev run --config devices.toml

Options not listed here go to the backend (or a third-party device) as -o KEY=VALUE.
Then start QEMU with the options `vdev qemu-args` prints.
"""


def _build_parser() -> Parser:
    parser = Parser(
        prog="vdev",
        description="Userspace virtio devices over vhost-user: serve disks and NICs to "
        "QEMU (or any vhost-user front-end) from Python backends.",
    )
    parser.add_argument("--version", action="version", version=f"vdev {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="debug logging (-vv: libraries too)"
    )
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    run = sub.add_parser(
        "run",
        help="serve devices on vhost-user sockets",
        description="Serve a device on a vhost-user socket until interrupted.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("type", nargs="?", help="device type: blk, net, or a plugin device")
    run.add_argument("--config", type=Path, help="TOML file listing several devices")
    run.add_argument("--socket", type=Path, help="vhost-user socket path")
    run.add_argument(
        "--client",
        action="store_true",
        help="connect to the front-end's socket instead of listening (QEMU server=on)",
    )
    run.add_argument(
        "--poll-us",
        type=_whole_number,
        default=50,
        metavar="US",
        help="let queue workers spin up to US microseconds on an idle ring before sleeping "
        "(adaptive: only while sleeps turn out short; default 50, 0: never spin)",
    )
    run.add_argument(
        "--queue-threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker threads serving each block or plugin device's queues (default 1: "
        "Python threads share one lock, so more only pay off for backends that wait "
        "outside it); a NIC always has one per queue pair",
    )
    run.add_argument(
        "--trace",
        action="store_true",
        help="log every vhost-user message of the sessions, decoded (one line each)",
    )
    run.add_argument(
        "--control",
        metavar="PATH",
        help="the control socket `vdev ctl` talks to (mode 0600; default: the first device's "
        "socket path plus .ctl, e.g. /tmp/disk.sock.ctl; none: no control socket)",
    )
    run.add_argument("--backend", help="backend name (see `vdev backends`)")
    run.add_argument("--queues", type=_positive_int, help="queues (blk) or queue pairs (net)")
    blk = run.add_argument_group("block backends")
    blk.add_argument("--path", help="image file (file backend)")
    blk.add_argument("--size", help="size such as 512M or 1G (ram, null backends)")
    blk.add_argument("--readonly", action="store_true", default=None, help="read-only disk")
    blk.add_argument("--direct", action="store_true", default=None, help="O_DIRECT I/O")
    blk.add_argument("--serial", help="serial number the guest sees")
    net = run.add_argument_group("net backends")
    net.add_argument("--tap", help="TAP interface name (created if missing)")
    net.add_argument("--bridge", help="attach the TAP to this bridge")
    net.add_argument("--netns", help="network namespace of the TAP")
    net.add_argument("--mac", help="guest MAC address")
    net.add_argument("--mtu", type=_positive_int, help="MTU")
    dom = run.add_argument_group("service model")
    dom.add_argument(
        "--domain",
        choices=DOMAIN_KINDS,
        default="inprocess",
        help="run the backend in this process (default) or in a driver-domain child process",
    )
    dom.add_argument(
        "--domain-memory",
        choices=MEMORY_POLICIES,
        default="map",
        help="driver domain: map guest memory in the child (default) or copy via a bounce buffer",
    )
    dom.add_argument("--domain-user", metavar="USER", help="driver domain: run the child as USER")
    dom.add_argument(
        "--domain-netns",
        metavar="NS",
        help="driver domain: run the child in this network namespace",
    )
    run.add_argument(
        "-o",
        "--option",
        dest="extra",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="any other backend or device option",
    )
    run.set_defaults(func=_cmd_run)

    backends = sub.add_parser(
        "backends",
        help="list installed device types and backends",
        description="List device types and backends installed as entry points. Each is "
        "imported; one that fails to import is reported on stderr in one line (entry point, "
        "distribution, error), the others are still listed, and the exit status is 2.",
    )
    backends.set_defaults(func=_cmd_backends)

    qemu = sub.add_parser(
        "qemu-args",
        help="print the QEMU options that attach a vdev device",
        description="Print the QEMU options that give a guest shared memory (-m and its "
        "memory backend) and attach a vdev device on SOCKET (templates from qemu-configs/). "
        "Paste them into your QEMU command line, e.g. "
        "qemu-system-x86_64 $(vdev qemu-args blk --socket S --mem 2G) -kernel ... "
        "With --libvirt, print the same as libvirt domain XML to merge into a domain.",
    )
    qemu.add_argument("type", choices=("blk", "net"), help="device type")
    qemu.add_argument("--socket", type=Path, required=True, help="vhost-user socket path")
    qemu.add_argument("--queues", type=_positive_int, default=1, help="queues / queue pairs")
    qemu.add_argument("--mem", default="1G", help="guest memory size (-m), default 1G")
    qemu.add_argument("--id", default=None, help="QEMU device id (default vdev-TYPE0)")
    qemu.add_argument(
        "--mac",
        type=_mac,
        help="net: the guest's MAC (default: derived from the socket path); "
        "give `vdev run net` the same --mac",
    )
    qemu.add_argument(
        "--libvirt",
        action="store_true",
        help="print libvirt domain XML (memory, memoryBacking, the device) instead",
    )
    qemu.set_defaults(func=_cmd_qemu_args)

    trace = sub.add_parser(
        "trace",
        help="show what a vhost-user front-end and back-end say to each other",
        description="Listen on --listen for a front-end (QEMU, DPDK virtio-user, ...) and\n"
        "connect to the back-end listening on --connect, once per front-end connection.\n"
        "Every message and fd is forwarded unchanged both ways and printed decoded:\n"
        "direction, request, flags, payload fields, fds, time since the previous message.\n"
        "Malformed messages are printed as errors with their bytes in hex.",
        epilog=TRACE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    trace.add_argument("--listen", type=Path, required=True, help="socket the front-end uses")
    trace.add_argument("--connect", type=Path, required=True, help="the back-end's socket")
    trace.add_argument("--json", action="store_true", help="one JSON object per line")
    trace.add_argument(
        "--only",
        type=_names,
        metavar="NAME,...",
        help="print only these requests, e.g. SET_MEM_TABLE,GET_FEATURES (errors always)",
    )
    trace.add_argument(
        "--device",
        choices=sorted(DEVICE_FEATURES),
        help="name the device-specific feature bits of this device type",
    )
    trace.add_argument(
        "--output", type=Path, metavar="FILE", help="write the trace to FILE (default stdout)"
    )
    trace.set_defaults(func=_cmd_trace)

    _add_ctl_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="boot a Linux guest on vdev devices and show what happened",
        description="Serve a temporary disk image from this process, boot a Linux guest on "
        "it under QEMU; the guest formats it (ext4), writes and reads back files; then "
        "print the guest's output, the device's request counts, bytes moved and times.",
    )
    demo.add_argument(
        "--keep-image", type=Path, metavar="PATH", help="keep the guest's disk image at PATH"
    )
    _accel_option(demo)
    demo.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="give up after this long (default 300)",
    )
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="compare vdev with the C references on the same guest and workloads",
        description="Boot the same guest on each target in turn (vdev, qemu-storage-daemon's "
        "vhost-user-blk export, QEMU's built-in virtio-blk) and run the same fio workloads "
        "in it; print medians over the repetitions and ratios to qemu-storage-daemon. "
        "Each run is reported on stderr as it starts, with the runs left and an estimate "
        "of the time left (-q: not).",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run: 1 repetition, 1 s per workload, 64 MiB image",
    )
    bench.add_argument(
        "-n", "--repetitions", type=_positive_int, help="runs per target (default 5)"
    )
    bench.add_argument(
        "--runtime", type=_positive_float, metavar="SECONDS", help="per workload (default 10)"
    )
    bench.add_argument(
        "--ramp", type=_non_negative_float, metavar="SECONDS", help="warm-up (default 2)"
    )
    bench.add_argument("--size", help="disk image size (default 1G)")
    bench.add_argument(
        "--targets", type=_names, metavar="NAME,...", help="rows to run (default: all)"
    )
    bench.add_argument(
        "--workloads", type=_names, metavar="NAME,...", help="workloads to run (default: all)"
    )
    bench.add_argument(
        "--dir", type=Path, metavar="DIR", help="where the image goes (default: temp dir)"
    )
    bench.add_argument(
        "--kind",
        choices=("blk", "net", "pmd"),
        default="blk",
        help="blk: disks under fio (default); net: guest NICs, vdev tap vs QEMU's tap "
        "(root); pmd: DPDK testpmd against vdev echo vs DPDK vhost, no guest",
    )
    bench.add_argument(
        "--qsd-aio",
        choices=("threads", "native", "io_uring"),
        default="threads",
        help="qemu-storage-daemon's aio= (default threads, as vdev and builtin-blk use)",
    )
    _accel_option(bench)
    bench.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    bench.add_argument("--png", type=Path, metavar="FILE", help="draw a bar chart (matplotlib)")
    bench.set_defaults(func=_cmd_bench)
    return parser


CTL_EPILOG = """\
actions:
  list                     devices: front-end, sessions, queues, requests in flight, domain
  stats [DEVICE]           state and counters of one device or all, and of their queues
  resize DEVICE SIZE       give a disk SIZE bytes (e.g. 2G) and tell its front-end
  link DEVICE up|down      set a NIC's link (NICs served with -o config_space=on)

DEVICE is a name `vdev ctl list` shows (the socket's file name without suffix) or a
socket path. Exit status: 0 done, 1 the daemon is not there or refused, 2 bad usage.

examples:
  vdev run blk --socket /tmp/disk.sock --backend file --path disk.img &
  vdev ctl --socket /tmp/disk.sock list
  vdev ctl --socket /tmp/disk.sock stats --json
  vdev ctl --control /tmp/disk.sock.ctl resize disk 2G
"""


def _cmd_ctl(args: argparse.Namespace) -> int:
    from vdev.ctl.client import CtlError, request
    from vdev.ctl.render import render_reply

    if (args.control is None) == (args.socket is None):
        raise ConfigError("give the daemon's --control PATH or its device --socket PATH")
    path = args.control or default_control_path(args.socket)
    message: dict[str, object] = {"cmd": args.action}
    device = getattr(args, "device", None)
    if device is not None:  # a relative socket path means one relative to us, not the daemon
        message["device"] = os.path.abspath(device) if "/" in device else device
    if args.action == "resize":
        message["size"] = args.size
    elif args.action == "link":
        message["up"] = args.state == "up"
    try:
        reply = request(path, message)
    except CtlError as exc:
        print(f"vdev ctl: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2) if args.json else render_reply(args.action, reply))
    return 0


def _ctl_options(parser: argparse.ArgumentParser, *, after_action: bool = False) -> None:
    """--control, --socket, --json: accepted before and after the action. After it they
    default to SUPPRESS, so that an action's parser does not overwrite with its defaults
    what was given before it."""
    quiet: dict[str, Any] = {"default": argparse.SUPPRESS} if after_action else {}
    parser.add_argument("--control", type=Path, metavar="PATH", help="the control socket", **quiet)
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="DEVICE_SOCKET",
        help="the daemon's (first) device socket: its control socket is DEVICE_SOCKET.ctl",
        **quiet,
    )
    parser.add_argument("--json", action="store_true", help="print the JSON reply", **quiet)


def _add_ctl_parser(sub: Any) -> None:
    ctl = sub.add_parser(
        "ctl",
        help="query and steer a running `vdev run` daemon over its control socket",
        description="Ask a `vdev run` daemon, over its control socket, for its devices' "
        "state and statistics, or to resize a disk or set a NIC's link. Prints a table, or "
        "the daemon's JSON reply with --json.",
        epilog=CTL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _ctl_options(ctl)
    ctl.set_defaults(func=_cmd_ctl)
    actions = ctl.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    actions.required = True
    parsers = {
        name: actions.add_parser(name, help=text)
        for name, text in (
            ("list", "list the devices"),
            ("stats", "state and counters of devices and queues"),
            ("resize", "resize a disk"),
            ("link", "set a NIC's link up or down"),
        )
    }
    for parser in parsers.values():
        _ctl_options(parser, after_action=True)
    parsers["stats"].add_argument("device", nargs="?", metavar="DEVICE", help="default: all")
    parsers["resize"].add_argument("device", metavar="DEVICE")
    parsers["resize"].add_argument("size", type=_size, metavar="SIZE", help="e.g. 2G")
    parsers["link"].add_argument("device", metavar="DEVICE")
    parsers["link"].add_argument("state", choices=("up", "down"))


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _accel_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accel",
        choices=ACCELS,
        default="auto",
        help="QEMU accelerator (default auto: KVM only where it really boots a guest)",
    )


_RUN_OPTIONS = (
    "queues", "path", "size", "readonly", "direct", "serial",
    "tap", "bridge", "netns", "mac", "mtu",
)  # fmt: skip


def _specs_from_args(args: argparse.Namespace) -> list[DeviceSpec]:
    if args.config is not None:
        if args.type or args.socket or args.backend:
            raise ConfigError(
                "--config cannot be combined with a device type, --socket or --backend"
            )
        return load_config(args.config)
    if not args.type:
        raise ConfigError("give a device type (blk, net, ...) or --config FILE")
    if args.socket is None:
        raise ConfigError("--socket is required")
    options: dict[str, Any] = {
        k: getattr(args, k) for k in _RUN_OPTIONS if getattr(args, k) is not None
    }
    options.update(args.extra)
    try:
        domain = DomainSpec(args.domain, args.domain_memory, args.domain_user, args.domain_netns)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return [DeviceSpec(args.type, args.socket, args.backend, options, args.client, domain)]


def _raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one: each guest memory region costs fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
        return
    log.debug("open file limit raised from %d to %d", soft, hard)


def _tune_gc() -> None:
    """The data path makes short-lived objects by the million and almost no cycles:
    keep what start-up built out of every collection, and collect the young
    generation ten times less often (10-20% of the per-frame cost otherwise)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young * 10, middle, old)


def _cmd_run(args: argparse.Namespace) -> int:
    specs = _specs_from_args(args)
    _raise_fd_limit()
    devices = []
    try:
        for spec in specs:
            devices.append(build_device(spec))
            devices[-1].queue_threads = args.queue_threads
        _tune_gc()
        servers = [
            DeviceServer(
                d, s.socket, client=s.client, poll_max=args.poll_us * 1e-6, trace=args.trace
            )
            for d, s in zip(devices, specs, strict=True)
        ]
        # The control socket listens first: once a device socket does, it answers.
        trio.run(_serve_until_signal, [*_control_servers(args.control, specs, servers), *servers])
    finally:
        for device in devices:
            device.close()
    return 0


def _control_servers(
    option: str | None, specs: Sequence[DeviceSpec], servers: Sequence[DeviceServer]
) -> list[ControlServer]:
    """The daemon's control socket (none with ``--control none``)."""
    if option == "none":
        return []
    path = Path(option) if option else default_control_path(specs[0].socket)
    if any(path.absolute() == spec.socket.absolute() for spec in specs):
        raise ConfigError(f"--control: {path} is a device socket")
    devices = name_devices([(s.type, server) for s, server in zip(specs, servers, strict=True)])
    return [ControlServer(devices, path)]


async def _serve_until_signal(servers: Sequence[DeviceServer | Tracer | ControlServer]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, unwrap_single():
        async with trio.open_nursery() as nursery:
            for server in servers:
                await nursery.start(server.serve)
            log.info("ready: %s", ", ".join(str(s.path) for s in servers))
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _cmd_backends(args: argparse.Namespace) -> int:
    """List the installed plugins that import; report each one that does not (exit 2)."""
    rows = []
    broken = 0
    for plugin in plugins():
        try:
            plugin.load()
        except PluginError as exc:
            print(f"vdev backends: error: {exc}", file=sys.stderr)
            broken += 1
        else:
            rows.append((plugin.kind.label, plugin.name, plugin.distribution, plugin.target))
    widths = [max(len(r[i]) for r in [("KIND", "NAME", "PACKAGE", ""), *rows]) for i in range(3)]
    for row in [("KIND", "NAME", "PACKAGE", "ENTRY POINT"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[3])
    return EXIT_USAGE if broken else 0


def _mac(text: str) -> str:
    try:
        return format_mac(parse_mac(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def default_mac(socket: Path) -> str:
    """A stable, locally administered MAC for the NIC on `socket` (QEMU's prefix 52:54:00)."""
    return format_mac(b"\x52\x54\x00" + hashlib.sha256(bytes(socket)).digest()[:3])


def _cmd_qemu_args(args: argparse.Namespace) -> int:
    try:
        mib = mem_mib(args.mem)
    except ValueError as exc:
        raise ConfigError(f"--mem: {exc} (a whole number of MiB)") from None
    if args.mac is not None and args.type != "net":
        raise ConfigError("--mac: only a net device has a MAC")
    socket = args.socket.resolve()
    device_id = args.id or f"vdev-{args.type}0"
    mac = args.mac or default_mac(socket)
    if args.libvirt:
        from vdev import libvirt

        try:
            xml = libvirt.domain_snippet(
                args.type, socket, mib=mib, device_id=device_id, queues=args.queues, mac=mac
            )
        except ValueError as exc:
            raise ConfigError(f"--id: {exc}") from None
        print(libvirt.to_text(xml), end="")
        return 0
    mem = f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"
    params: dict[str, Any] = {"socket": socket, "id": device_id, "queues": args.queues}
    if args.type == "net":
        params["mq"] = args.queues > 1
    argv = ["-m", mem, *render_args("memory", mem_size=mem)]
    argv += render_args(f"vdev-{args.type}", **params)
    if args.type == "net":
        nic = next(i for i, arg in enumerate(argv) if arg.startswith("virtio-net-pci,"))
        argv[nic] += f",mac={mac}"
    print(shlex.join(argv))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vdev.demo import DemoError, DemoOptions, run_demo
    from vdev.testing.guest import GuestError

    options = DemoOptions(keep_image=args.keep_image, accel=args.accel, timeout=args.timeout)
    if options.keep_image is not None and not options.keep_image.parent.is_dir():
        raise ConfigError(f"--keep-image: directory {options.keep_image.parent} does not exist")
    try:
        report = trio.run(run_demo, options)
    except (DemoError, GuestError) as exc:
        print(f"vdev demo: failed: {exc}", file=sys.stderr)
        return 1
    print(report.render())
    return 0 if report.ok else 1


TRACE_EPILOG = """\
example: trace QEMU's negotiation with a vdev disk
  vdev run blk --socket /tmp/disk.sock --backend file --path disk.img &
  vdev trace --listen /tmp/trace.sock --connect /tmp/disk.sock --device blk
  # then start QEMU on /tmp/trace.sock (vdev qemu-args blk --socket /tmp/trace.sock)
"""


def _cmd_trace(args: argparse.Namespace) -> int:
    only = None
    if args.only is not None:
        only = frozenset(name.upper() for name in args.only)
        if unknown := sorted(only - known_request_names()):
            raise ConfigError(f"--only: unknown request {', '.join(unknown)}")
    try:
        output = sys.stdout if args.output is None else args.output.open("w", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--output: cannot open {args.output}: {exc.strerror}") from None
    options = TraceOptions(args.listen, args.connect, output, args.json, only, args.device)
    tracer = Tracer(options)
    try:
        trio.run(_trace_until_signal, tracer)
    finally:
        if output is not sys.stdout:
            with contextlib.suppress(OSError):  # reported already, if it failed
                output.close()
    return 0


async def _trace_until_signal(tracer: Tracer) -> None:
    await tracer.check_backend()
    await _serve_until_signal([tracer])


BENCH_EPILOG = """\
blk targets: vdev (the file backend in a `vdev run` daemon, in-process), qsd
  (qemu-storage-daemon, the reference), builtin (QEMU's own virtio-blk), driver-map and
  driver-copy (the same backend in a driver domain)
blk workloads: randread-4k-qd1, randread-4k-qd32, read-1m-qd8, write-1m-qd8
--kind net and --kind pmd have their own targets and workloads (see vdev/bench/net.py)

examples:
  vdev bench                                 # 5 repetitions, about 15 minutes
  vdev bench --quick                         # a smoke run of a minute or so
  vdev bench -n 3 --json bench.json --png bench.png
"""


def _select(items: Sequence[_Named], names: Sequence[str] | None, option: str) -> list[_Named]:
    if names is None:
        return list(items)
    known = {item.name: item for item in items}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return [known[name] for name in names]


def _cmd_bench(args: argparse.Namespace) -> int:
    from vdev.bench import blk, net, report
    from vdev.bench.core import BenchError, BenchSettings, run_bench
    from vdev.testing.guest import GuestError

    quick = {"repetitions": 1, "runtime": 1.0, "ramp": 0.0, "size": "64M"} if args.quick else {}
    chosen = {k: getattr(args, k) for k in ("repetitions", "runtime", "ramp", "size")}
    values = {**quick, **{k: v for k, v in chosen.items() if v is not None}}
    try:
        size = parse_size(values.pop("size", "1G"), multiple_of=1 << 20)
    except ValueError as exc:
        raise ConfigError(f"--size: {exc} (a whole number of MiB)") from None
    if args.dir is not None and not args.dir.is_dir():
        raise ConfigError(f"--dir: {args.dir} is not a directory")
    settings = BenchSettings(
        **values, size=size, accel=args.accel, workdir=args.dir, qsd_aio=args.qsd_aio
    )
    all_targets, all_workloads = {
        "blk": (blk.TARGETS, blk.WORKLOADS),
        "net": (net.GUEST_TARGETS, net.GUEST_WORKLOADS),
        "pmd": (net.PMD_TARGETS, net.PMD_WORKLOADS),
    }[args.kind]
    targets = _select(all_targets, args.targets, "--targets")
    workloads = _select(all_workloads, args.workloads, "--workloads")
    progress = sys.stderr if args.quiet == 0 else None  # -q: no progress lines
    if args.kind == "pmd":
        run = partial(net.run_pmd_bench, targets, workloads, settings, progress)
    else:
        prepare = blk.prepare_image if args.kind == "blk" else net.no_image
        run = partial(run_bench, targets, workloads, settings, prepare=prepare, progress=progress)
    try:
        if args.png is not None:
            report.pyplot()  # fail now rather than after the runs
        result = trio.run(run)
    except (BenchError, GuestError) as exc:
        print(f"vdev bench: failed: {exc}", file=sys.stderr)
        return 1
    print(report.table(result))
    if args.json is not None:
        report.write_json(result, args.json)
    if args.png is not None:
        report.write_png(result, args.png)
    return 0


#: Loggers that -v turns to DEBUG; -vv does it for every library too (pyroute2 floods).
_OWN_LOGGERS = ("vdev", "vdev_backends")


def _setup_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO, 1: logging.INFO}.get(
        max(verbosity, -2), logging.DEBUG
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 1 else logging.NOTSET)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose - args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, ServerError, QemuError, TraceError) as exc:
        print(f"vdev {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `vdev ctl stats | head`: the reader went away, as with cat
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
