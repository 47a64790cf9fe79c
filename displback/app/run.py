"""``displback run``: the backend daemon on a real Dom0, until SIGTERM or SIGINT.

It opens the real platform (:class:`~displback.xen.real.RealPlatform`: ``/dev/xen/evtchn``,
``/dev/xen/gntdev``, XenStore), a display, and serves every vdispl device of this domain with
:class:`~displback.backend.daemon.Backend`. The display is ``virtual`` (outputs in memory,
named ``--virtual-output NAME=WxH``), ``kms`` (DRM/KMS connectors of a card, named
``--connector NAME[=WxH]``) or ``wayland`` (a window of the compositor at
``--wayland-display`` per guest connector; needs the ``wayland`` extra, pywayland, which is
imported only then); with ``--snapshot-dir`` every output is written as a PNG, with a
``status.json`` of the devices, every ``--snapshot-interval`` seconds.

Options are gathered in :class:`RunConfig`, whose field names are the TOML keys of
``--config FILE`` (:mod:`displback.app.config`). Before anything is opened the whole effective
configuration is checked (:func:`effective_config`: the file's keys, then
:func:`config_problems` across keys) and every mistake is reported at once, with its line
in the file; ``displback check-config`` runs the same check alone.
What gntdev can do with dma-bufs is probed once at start and logged in one line; with
``--zero-copy require`` a Dom0 that cannot export guest grants refuses to start.

Shutdown (SIGTERM/SIGINT) goes through each device's handshake (``Backend.shutdown``): its
connection releases its mappings, ports and buffers, its backend state is set to ``Closed``
so the guest sees the backend gone (and re-handshakes with the next daemon), and the device
is forgotten; then the daemon's remaining tasks are cancelled.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import signal
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
import trio

from displback.app.config import (
    LOG_FORMATS,
    ConfigError,
    Problem,
    apply_config,
    option_name,
    parse_connector_spec,
    parse_output_spec,
    read_config,
)
from displback.app.logs import LOG_LEVELS, LogFormat, configure_logging, default_log_format
from displback.app.status import StatusModel, to_json
from displback.app.status_socket import DEFAULT_SOCKET, serve_status
from displback.app.tomllines import KeyPath
from displback.app.validators import (
    copy_workers,
    domid,
    input_queue,
    input_size,
    option,
    positive,
    refresh_hz,
    socket_path,
    wait_free_ms,
    wayland_socket,
)
from displback.backend.buffers import ZeroCopyPolicy
from displback.backend.daemon import Backend
from displback.backend.device import BackendSettings
from displback.backend.input import InputRouter
from displback.backend.outputs import OutputMap
from displback.backend.quotas import LimitOverrides
from displback.display.input import InputSink
from displback.display.interface import Display
from displback.display.virtual import OutputConfig, VirtualDisplay
from displback.evdev.source import EvdevSource, InputAssignment
from displback.systemd.fdstore import FdStore, inherited_fds
from displback.systemd.sdnotify import Notifier
from displback.xen.interfaces import Platform
from displback.xen.real import (
    DmaBufSupport,
    RealPlatform,
    default_xenstore_path,
    read_own_domid,
)

__all__ = [
    "RunConfig",
    "add_run_parser",
    "config_problems",
    "effective_config",
    "run_command",
    "serve",
]


@dataclass
class RunConfig:
    """What ``displback run`` is told; field names are the TOML keys of the config file."""

    xenstore: str | None = None  # None: xenstored's socket if present, else /dev/xen/xenbus
    domid: int | None = None  # None: read "domid" from XenStore (0 when absent)
    display: Literal["virtual", "kms", "wayland"] = "virtual"
    virtual_outputs: list[OutputConfig] = field(default_factory=list)
    snapshot_dir: Path | None = None
    snapshot_interval_s: float = 1.0
    card: str | None = None  # None: the first card with the connectors
    connectors: list[str] = field(default_factory=list)  # "NAME" or "NAME=WxH[@HZ]"
    wayland_display: str | None = None  # None: $WAYLAND_DISPLAY, else "wayland-0"
    wayland_refresh_hz: float = 60.0  # flips of hidden windows land at this rate
    assign: dict[str, str] = field(default_factory=dict)  # "domid/devid/index" -> output
    zero_copy: ZeroCopyPolicy = ZeroCopyPolicy.AUTO
    wait_free_ms: int = 2000
    copy_workers: int | None = None  # None: the CPUs this process may use
    log_level: str = "info"
    log_format: LogFormat | None = None  # None: journal under systemd, else console
    limits: LimitOverrides = field(default_factory=LimitOverrides)  # the file's [limits]
    # The status socket of `displback status`; None (a RunConfig made in code): none. The
    # command line's default is DEFAULT_SOCKET; "" there means none too.
    status_socket: str | None = None
    input: list[InputAssignment] = field(default_factory=list)  # the file's [[input]]
    input_queue: int = 256
    input_size: tuple[int, int] = (1024, 768)


def parse_output(text: str) -> OutputConfig:
    """``NAME=WxH`` or ``NAME=WxH@HZ`` → an output config (``ArgumentTypeError`` if bad)."""
    try:
        return parse_output_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_assign(text: str) -> tuple[str, str]:
    key, sep, output = text.partition("=")
    if not sep or not key or not output:
        raise argparse.ArgumentTypeError(f"expected DOMID/DEVID/INDEX=OUTPUT, not {text!r}")
    return key, output


def add_run_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    run: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="run the backend daemon on this Xen domain (Dom0 or a driver domain)",
        description="Serve every vdispl device of this domain until SIGTERM/SIGINT.",
    )
    run.add_argument(
        "--xenstore",
        metavar="PATH",
        default=None,
        help="xenstored socket or xenbus device (default: /run/xenstored/socket if present, "
        "else /dev/xen/xenbus)",
    )
    run.add_argument(
        "--domid", type=option(domid, int), default=None, help="this domain's id (from XenStore)"
    )
    run.add_argument(
        "--display",
        choices=("virtual", "kms", "wayland"),
        default="virtual",
        help="where guest connectors are shown (virtual: in memory, see --snapshot-dir; "
        "wayland: a window per guest connector)",
    )
    run.add_argument(
        "--virtual-output",
        dest="virtual_outputs",
        metavar="NAME=WxH[@HZ]",
        type=parse_output,
        action="append",
        default=[],
        help="one virtual output (repeat; at least one for --display virtual)",
    )
    run.add_argument("--snapshot-dir", type=Path, default=None, help="write <output>.png here")
    run.add_argument(
        "--snapshot-interval",
        dest="snapshot_interval_s",
        type=option(positive, float),
        default=1.0,
        help="seconds between snapshots (1)",
    )
    run.add_argument("--card", default=None, help="DRM card for --display kms (/dev/dri/cardN)")
    run.add_argument(
        "--connector",
        dest="connectors",
        action="append",
        default=[],
        metavar="NAME[=WxH[@HZ]]",
        help="KMS connector for --display kms, with the guest resolution wanted (repeat)",
    )
    run.add_argument(
        "--wayland-display",
        metavar="NAME|PATH",
        type=option(wayland_socket),
        default=None,
        help="the compositor's socket for --display wayland ($WAYLAND_DISPLAY, else wayland-0)",
    )
    run.add_argument(
        "--wayland-refresh-hz",
        type=option(refresh_hz, float),
        default=60.0,
        help="rate at which flips of a hidden window complete (60)",
    )
    run.add_argument(
        "--assign",
        metavar="DOMID/DEVID/INDEX=OUTPUT",
        type=_parse_assign,
        action="append",
        default=[],
        help="show a guest connector (or unique-id) on a named output (repeat; wayland: "
        "its window fullscreen on that compositor output)",
    )
    run.add_argument(
        "--zero-copy",
        choices=[p.value for p in ZeroCopyPolicy],
        default=ZeroCopyPolicy.AUTO.value,
        help="scan guest buffers out directly: auto (when possible), require, off",
    )
    run.add_argument(
        "--wait-free-ms",
        type=option(wait_free_ms, int),
        default=2000,
        help="how long a buffer destroy waits for the display to let go (2000)",
    )
    run.add_argument(
        "--copy-workers",
        type=option(copy_workers, int),
        default=None,
        help="worker threads copying frames in copy mode (default: the CPUs it may use)",
    )
    run.add_argument(
        "--input-queue",
        type=option(input_queue, int),
        default=256,
        help="input events kept for a guest that does not read them (256; vkbd)",
    )
    run.add_argument(
        "--input-size",
        metavar="WxH",
        type=option(input_size),
        default=(1024, 768),
        help="pointer space of a vkbd device whose guest has no display connector (1024x768)",
    )
    run.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="console, json or journal (default: journal when started by systemd, else console)",
    )
    run.add_argument(
        "--status-socket",
        metavar="PATH",
        type=option(socket_path),
        default=DEFAULT_SOCKET,
        help=f"where `displback status` asks ({DEFAULT_SOCKET}; '' for none)",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=None,
        help="TOML file of these settings (see config/displback.toml); options given here win",
    )
    run.set_defaults(func=run_command, run_parser=run)
    return run


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` an ``argparse`` namespace of ``displback run`` describes."""
    return RunConfig(
        xenstore=args.xenstore,
        domid=args.domid,
        display=args.display,
        virtual_outputs=list(args.virtual_outputs),
        snapshot_dir=args.snapshot_dir,
        snapshot_interval_s=args.snapshot_interval_s,
        card=args.card,
        connectors=list(args.connectors),
        wayland_display=args.wayland_display,
        wayland_refresh_hz=args.wayland_refresh_hz,
        assign=dict(args.assign),
        zero_copy=ZeroCopyPolicy(args.zero_copy),
        wait_free_ms=args.wait_free_ms,
        copy_workers=args.copy_workers,
        log_level=args.log_level,
        log_format=args.log_format,
        status_socket=args.status_socket or None,
        input_queue=args.input_queue,
        input_size=args.input_size,
    )


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def config_problems(config: RunConfig) -> list[tuple[KeyPath, str]]:
    """Every inconsistency of ``config`` as a whole, each with the key it is about."""
    problems: list[tuple[KeyPath, str]] = []
    names: list[str] = []
    if config.display == "virtual":
        if not config.virtual_outputs:
            problems.append(
                (
                    ("virtual_outputs",),
                    'display "virtual" needs at least one output (--virtual-output NAME=WxH)',
                )
            )
        names = [o.name for o in config.virtual_outputs]
        outputs_key = "virtual_outputs"
    elif config.display == "wayland":
        # Windows are made per guest connector; [assign] names compositor outputs, which
        # only the compositor knows.
        if importlib.util.find_spec("pywayland") is None:
            problems.append(
                (
                    ("display",),
                    'display "wayland" needs pywayland, which is not installed: install '
                    'the wayland extra (pip install "displback[wayland]")',
                )
            )
        outputs_key = "connectors"
    else:
        if importlib.util.find_spec("displback.kms") is None:
            problems.append(
                (
                    ("display",),
                    'display "kms" is not available in this build '
                    '(displback.kms is missing); use "virtual"',
                )
            )
        if not config.connectors:
            problems.append(
                (
                    ("connectors",),
                    'display "kms" needs at least one connector (--connector NAME[=WxH])',
                )
            )
        for index, spec in enumerate(config.connectors):
            try:
                names.append(parse_connector_spec(spec)[0])
            except ValueError as exc:
                problems.append((("connectors", index), f"{spec!r}: {exc}"))
        outputs_key = "connectors"
    for index, name in enumerate(names):
        if name in names[:index]:
            problems.append(((outputs_key, index), f"duplicate output name {name!r}"))
    if names:
        for connector, output in config.assign.items():
            if output not in names:
                known = ", ".join(names)
                problems.append(
                    (
                        ("assign", connector),
                        f"names output {output!r}, which is not one of the {outputs_key} ({known})",
                    )
                )
    return problems


def check_config(config: RunConfig) -> None:
    """Refuse inconsistent options before touching any device, naming every mistake."""
    problems = config_problems(config)
    if problems:
        raise StartupError("; ".join(f"{option_name(key)}: {message}" for key, message in problems))


def effective_config(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of ``displback run``'s ``args`` and its ``--config`` file,
    checked as a whole: ``ConfigError`` lists every problem, each with its key and line.

    A check across keys about a key the file got wrong is left out (it would only repeat
    that mistake); one about a value given on the command line names the option."""
    if args.config is None:
        config = config_from_args(args)
        problems = config_problems(config)
        if problems:
            raise ConfigError(
                "command line", [Problem(key, message, where="option") for key, message in problems]
            )
        return config
    file = read_config(args.config)
    merged = apply_config(args.run_parser, args, file.settings)
    config = config_from_args(merged)
    config.limits = file.settings.get("limits", LimitOverrides())
    config.input = file.settings.get("input", [])
    defaults = {a.dest: a.default for a in args.run_parser._actions}
    wrong = {p.key[0] for p in file.problems if p.key}
    found = list(file.problems)
    for key, message in config_problems(config):
        name = str(key[0])
        if name in wrong:
            continue
        if name in vars(args) and getattr(args, name) != defaults.get(name):
            found.append(Problem(key, message, where="option"))
        else:
            found.append(file.problem(key, message))
    if found:
        raise ConfigError(file.path, found)
    return config


def _kms_output(spec: str) -> Any:
    """``NAME`` or ``NAME=WxH[@HZ]`` → a ``KmsOutputConfig`` (``StartupError`` if bad)."""
    from displback.kms.display import KmsOutputConfig

    try:
        name, mode = parse_connector_spec(spec)
    except ValueError as exc:
        raise StartupError(f"--connector {spec!r}: {exc}") from None
    if mode is None:
        return KmsOutputConfig(name)
    hz = mode.refresh_hz if "@" in spec else None
    return KmsOutputConfig(name, mode.width, mode.height, hz)


def wayland_socket_of(config: RunConfig) -> str:
    """The compositor ``display = "wayland"`` connects to."""
    return config.wayland_display or os.environ.get("WAYLAND_DISPLAY") or "wayland-0"


def _open_display(
    config: RunConfig, platform: Platform, inputs: InputRouter | None = None
) -> AbstractAsyncContextManager[Any]:
    if config.display == "wayland":
        from displback.wayland.display import WaylandDisplay

        return WaylandDisplay.open(
            wayland_socket_of(config),
            refresh_hz=config.wayland_refresh_hz,
            fullscreen=config.assign,
            input_ports=inputs,  # the windows' seat types into the guests' vkbd devices
        )
    if config.display == "kms":
        from displback.kms.display import KmsDisplay

        return KmsDisplay.open(
            [_kms_output(spec) for spec in config.connectors],
            card=config.card,
            dmabuf_importer=platform.open_dmabuf,
        )
    return VirtualDisplay.open(config.virtual_outputs, dmabuf_importer=platform.open_dmabuf)


async def serve(
    config: RunConfig,
    *,
    platform: Platform | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled or signalled; ``task_status.started(backend)``."""
    log = structlog.get_logger("displback.app.run")
    check_config(config)
    xenstore = config.xenstore or default_xenstore_path()
    own = platform is None
    if platform is None:
        domid = config.domid if config.domid is not None else await read_own_domid(xenstore)
        platform = RealPlatform(xenstore, domid)
    try:
        support: DmaBufSupport | None = getattr(platform, "dmabuf_support", None)
        log.info(
            "platform",
            domid=platform.domid,
            xenstore=platform.xenstore_path,
            dmabuf_export=support.export_supported if support else None,
            dmabuf_import=support.import_supported if support else None,
            detail=support.reason if support else "not probed",
        )
        if (
            config.zero_copy is ZeroCopyPolicy.REQUIRE
            and support is not None
            and not support.export_supported
        ):
            raise StartupError(f"--zero-copy require, but {support.reason}")
        settings = BackendSettings(
            zero_copy=config.zero_copy,
            wait_free_ms=config.wait_free_ms,
            copy_workers=config.copy_workers,
            limit_overrides=config.limits,
            input_queue=config.input_queue,
            input_size=config.input_size,
        )
        notifier = Notifier()
        # be-alloc memory guests may still map, kept by systemd while we restarted.
        inherited = inherited_fds()
        inputs = InputRouter()
        async with _open_display(config, platform, inputs) as display:
            # The Wayland display makes a window per connector; the others have fixed outputs.
            outputs = (
                display
                if config.display == "wayland"
                else OutputMap(display.outputs, config.assign)
            )
            backend = Backend(
                platform,
                outputs,
                settings,
                log=log,
                fdstore=FdStore(notifier),
                inherited=inherited,
                inputs=inputs,
            )
            model = StatusModel(backend, display.outputs)
            async with trio.open_nursery() as nursery:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    await nursery.start(backend.run)
                    for assignment in config.input:
                        source = EvdevSource(assignment, input_port(backend, assignment), log=log)
                        nursery.start_soon(source.run)
                    if config.status_socket:
                        await _start_status_socket(nursery, model, config.status_socket, log)
                    if config.snapshot_dir is not None:
                        nursery.start_soon(_snapshots, display, model, config)
                    task_status.started(backend)
                    notifier.ready(f"serving vdispl devices of domain {platform.domid}")
                    if notifier.watchdog_s is not None:
                        nursery.start_soon(_watchdog, notifier, backend)
                    async for signum in signals:
                        log.info("shutting down", signal=signal.Signals(signum).name)
                        notifier.stopping()
                        break
                await backend.shutdown()
                nursery.cancel_scope.cancel()
            if config.snapshot_dir is not None:
                with contextlib.suppress(OSError):
                    await _write_snapshots(display, model, config.snapshot_dir)
    finally:
        if own:
            platform.close()


def input_port(backend: Backend, assignment: InputAssignment) -> InputSink:
    """The port of the guest connector an ``[[input]]`` entry feeds: by domid, or by the
    domain's name (followed across reboots, which change the domid)."""
    if isinstance(assignment.guest, int):
        return backend.inputs.port(assignment.guest, assignment.devid, assignment.connector)
    return backend.inputs.named_port(assignment.guest, assignment.devid, assignment.connector)


async def _watchdog(notifier: Notifier, backend: Backend) -> None:
    """Ping systemd from the event loop at half its watchdog interval, with a status line."""
    assert notifier.watchdog_s is not None
    while True:
        statuses = backend.statuses()
        connected = sum(1 for s in statuses if s.state == "connected")
        notifier.send(watchdog=1, status=f"{len(statuses)} vdispl devices, {connected} connected")
        await trio.sleep(notifier.watchdog_s / 2)


async def _start_status_socket(
    nursery: trio.Nursery, model: StatusModel, path: str, log: Any
) -> None:
    """Serve ``displback status`` on ``path``; a socket that cannot be made is logged, and
    the daemon serves its guests without it."""
    try:
        await nursery.start(
            functools.partial(serve_status, lambda: to_json(model.report()), path, log=log)
        )
    except OSError as exc:
        log.warning(
            "no status socket: displback status will not work",
            path=path,
            error=exc.strerror or str(exc),
        )


async def _write_snapshots(display: Display, model: StatusModel, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, output in display.outputs.items():
        try:
            images[name] = output.snapshot()
        except Exception as exc:  # a zero-copy KMS frame may not be mappable
            structlog.get_logger(__name__).debug("no snapshot", output=name, error=str(exc))
    status = json.dumps(to_json(model.report()), indent=1, default=str)

    def write() -> None:
        for name, image in images.items():
            tmp = directory / f".{name}.png.tmp"
            image.write_png(tmp)
            os.replace(tmp, directory / f"{name}.png")
        tmp = directory / ".status.json.tmp"
        tmp.write_text(status)
        os.replace(tmp, directory / "status.json")

    await trio.to_thread.run_sync(write)


async def _snapshots(display: Display, model: StatusModel, config: RunConfig) -> None:
    assert config.snapshot_dir is not None
    while True:
        await _write_snapshots(display, model, config.snapshot_dir)
        await trio.sleep(config.snapshot_interval_s)


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``displback run``: 0 after a signalled shutdown, 1 if it cannot start."""
    try:
        config = effective_config(args)
    except ConfigError as exc:
        configure_logging("error")
        log = structlog.get_logger("displback.app.run")
        for problem in exc.problems:
            log.error("configuration", problem=problem.format(exc.path))
        log.error("cannot start", reason=f"{len(exc.problems)} configuration problem(s)")
        return 1
    configure_logging(config.log_level, fmt=config.log_format or default_log_format())
    log = structlog.get_logger("displback.app.run")
    try:
        trio.run(serve, config)
    except StartupError as exc:
        log.error("cannot start", reason=str(exc))
        return 1
    except OSError as exc:
        log.error("cannot start", error=str(exc), path=exc.filename)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m displback.app.run``: the same as ``displback run`` (until cli.py wires it)."""
    parser = argparse.ArgumentParser(prog="displback")
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["run", *(argv if argv is not None else [])])
    return int(args.func(args))


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
