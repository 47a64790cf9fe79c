"""The status model: what the running daemon is doing, per guest, device and connector.

One model for every place that shows it: ``displback status`` (the daemon serves it over a
socket, :mod:`displback.app.status_socket`), the live table of ``displback demo`` and the
``status.json`` of ``--snapshot-dir``. :class:`StatusModel` reads the daemon's objects — the
devices' status, connector and buffer-store counters, the per-domain accounts, deferred
releases, kept be-alloc memory, and the display's outputs — into plain dataclasses that
:func:`to_json` turns into the JSON document and :func:`render_table` into text.
docs/operations.md ("Status and the journal") describes every field.

Reading is synchronous and allocates only the report: it runs in the event loop, between two
steps of the daemon, so what it shows is consistent. Frame rates are measured between two
reports at least :data:`FPS_WINDOW_S` apart (the first one since the connector connected).
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from displback import __version__
from displback.backend.daemon import Backend
from displback.backend.device import DeviceStatus
from displback.backend.quotas import RESOURCES
from displback.display.interface import Output

__all__ = [
    "FPS_WINDOW_S",
    "SCHEMA",
    "ConnectorReport",
    "DaemonReport",
    "DeviceReport",
    "GuestReport",
    "InputReport",
    "OutputReport",
    "StatusModel",
    "render_table",
    "to_json",
]

#: The version of the JSON document's shape (``schema``); bumped when a field changes meaning.
SCHEMA = 1
#: Frame rates are averaged over at least this many seconds.
FPS_WINDOW_S = 1.0


@dataclass(frozen=True, slots=True)
class OutputReport:
    """A display output: where guest connectors are shown."""

    name: str
    mode: str  # "WxH@Hz"
    enabled: bool
    flips_completed: int
    frames_shown: int
    missed_vblanks: int
    #: KMS only (else None): card, driver, commit path, CRTC, plane, placement, flip timeouts.
    kms: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ConnectorReport:
    """One guest connector and the output it is shown on."""

    index: int
    output: str | None
    guest_mode: str | None  # "WxH" of the guest's SET_CONFIG; None while it is disabled
    fps: float
    requests: int
    errors: int
    flips: int
    frames_shown: int
    flips_coalesced: int
    events: int
    events_delayed: int
    events_dropped: int
    events_late: int
    frame_done_timeouts: int
    flip_timeouts: int
    throttled: int
    wakeups: int
    spurious_wakeups: int
    wakeups_throttled: int
    queued_events: int


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """One vdispl device of a guest."""

    devid: int
    state: str  # the handshake's phase
    backend_state: str | None
    frontend_state: str | None
    connects: int
    violations: int
    #: Live buffers by kind, pages, framebuffers, destroys deferred, import fallbacks; None
    #: while not connected.
    buffers: dict[str, int] | None
    copy_reasons: dict[str, int]
    export_supported: bool | None  # whether Dom0 exports guest buffers (None: not tried)
    connectors: list[ConnectorReport]


@dataclass(frozen=True, slots=True)
class InputReport:
    """One vkbd device of a guest (input into it; docs/input.md)."""

    devid: int
    state: str  # the handshake's phase
    frontend_state: str | None
    connects: int
    violations: int
    target: str  # the guest connector it serves, "<domid>/<devid>/<index>"
    mode: str  # "abs+mt", "abs", "rel+mt", "rel"; "" while not connected
    queued: int  # events queued for the guest (all connections)
    published: int  # written to its page
    waiting: int  # queued now, for a guest that has not read its page
    dropped: int  # dropped: the queue was full, or the guest cannot take them


@dataclass(frozen=True, slots=True)
class GuestReport:
    """One guest domain: its account, what Dom0 keeps for it, its devices."""

    domid: int
    name: str | None
    quota: dict[str, dict[str, int]]  # resource -> {"used": n, "limit": m}
    requests_per_second: float
    request_burst: int
    deferred_releases: int
    retained_buffers: int
    retained_pages: int
    devices: list[DeviceReport]
    inputs: list[InputReport] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DaemonReport:
    """The whole daemon."""

    schema: int
    version: str
    pid: int
    domid: int
    uptime_s: float
    outputs: list[OutputReport]
    deferred: dict[str, int]  # pending, deferred, released, abandoned (all guests)
    retained_pages: int
    #: The daemon-wide Dom0 grant budget: entries ``held`` for all guests' be-alloc pages
    #: (live or kept) and its ``limit`` (``[limits] dom0_grant_entries``).
    dom0_grants: dict[str, int] = field(default_factory=dict)
    guests: list[GuestReport] = field(default_factory=list)


@dataclass(slots=True)
class _Sample:
    count: int
    time: float
    fps: float


class StatusModel:
    """Builds :class:`DaemonReport` snapshots of one daemon (and keeps frame-rate samples)."""

    def __init__(
        self,
        backend: Backend,
        outputs: Mapping[str, Output] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.outputs = outputs if outputs is not None else {}
        self._clock = clock
        self._started = clock()
        self._samples: dict[tuple[int, int, int, int], _Sample] = {}

    def report(self) -> DaemonReport:
        """A consistent snapshot of everything ``displback status`` shows."""
        now = self._clock()
        backend = self.backend
        statuses = backend.statuses()
        by_domid: dict[int, list[DeviceStatus]] = {}
        for status in statuses:
            by_domid.setdefault(status.domid, []).append(status)
        inputs: dict[int, list[InputReport]] = {}
        for vkbd in backend.input_statuses():
            sink = vkbd.sink
            inputs.setdefault(vkbd.domid, []).append(
                InputReport(
                    devid=vkbd.devid,
                    state=vkbd.state,
                    frontend_state=vkbd.frontend_state,
                    connects=vkbd.connects,
                    violations=vkbd.violations,
                    target=vkbd.target,
                    mode=vkbd.mode,
                    queued=vkbd.queued,
                    published=vkbd.published,
                    waiting=len(sink.queue) if sink is not None else 0,
                    dropped=vkbd.dropped,
                )
            )
        domids = sorted(
            set(by_domid) | set(inputs) | set(backend.accounts) | set(backend.retained.domains())
        )
        deferred = backend.deferred
        live: set[tuple[int, int, int, int]] = set()
        guests = []
        for domid in domids:
            devices = [self._device(s, now, live) for s in by_domid.get(domid, [])]
            account = backend.accounts.get(domid)
            quota: dict[str, dict[str, int]] = {}
            rate, burst = 0.0, 0
            if account is not None:
                usage = account.usage()
                limits = account.limits
                quota = {
                    resource: {"used": usage[resource], "limit": int(getattr(limits, name))}
                    for resource, name in RESOURCES.items()
                }
                rate, burst = limits.requests_per_second, limits.request_burst
            names = [s.name for s in by_domid.get(domid, []) if s.name]
            guests.append(
                GuestReport(
                    domid=domid,
                    name=names[0] if names else None,
                    quota=quota,
                    requests_per_second=rate,
                    request_burst=burst,
                    deferred_releases=deferred.pending(domid) if deferred is not None else 0,
                    retained_buffers=len(backend.retained.entries(domid)),
                    retained_pages=backend.retained.pages(domid),
                    devices=devices,
                    inputs=inputs.get(domid, []),
                )
            )
        # Samples of connectors that are gone are dropped with them.
        for key in set(self._samples) - live:
            del self._samples[key]
        stats = deferred.stats if deferred is not None else None
        return DaemonReport(
            schema=SCHEMA,
            version=__version__,
            pid=os.getpid(),
            domid=backend.platform.domid,
            uptime_s=round(now - self._started, 3),
            outputs=[_output(o) for o in self.outputs.values()],
            deferred=dataclasses.asdict(stats) if stats is not None else {},
            retained_pages=backend.retained.pages(),
            dom0_grants={"held": backend.grant_budget.held, "limit": backend.grant_budget.limit},
            guests=guests,
        )

    def _device(
        self, status: DeviceStatus, now: float, live: set[tuple[int, int, int, int]]
    ) -> DeviceReport:
        store = status.store
        connectors = []
        for connector in status.connectors:
            key = (status.domid, status.devid, connector.index, status.connects)
            live.add(key)
            s = connector.stats
            output = connector.output
            kms = getattr(output, "kms_info", None)
            mode = connector.mode_fb
            connectors.append(
                ConnectorReport(
                    index=connector.index,
                    output=output.name if output is not None else None,
                    guest_mode=f"{mode[0]}x{mode[1]}" if mode is not None else None,
                    fps=self._fps(key, s.frames_shown, connector.started_at, now),
                    requests=s.requests,
                    errors=s.errors,
                    flips=s.flips_accepted,
                    frames_shown=s.frames_shown,
                    flips_coalesced=s.flips_coalesced,
                    events=s.events_sent,
                    events_delayed=s.events_delayed,
                    events_dropped=s.events_dropped,
                    events_late=s.events_late,
                    frame_done_timeouts=s.events_late + s.events_dropped,
                    flip_timeouts=kms.flip_timeouts if kms is not None else 0,
                    throttled=s.throttled,
                    wakeups=s.wakeups,
                    spurious_wakeups=s.spurious_wakeups,
                    wakeups_throttled=s.wakeups_throttled,
                    queued_events=connector.queued_events,
                )
            )
        buffers = None
        reasons: dict[str, int] = {}
        if store is not None:
            b = store.stats
            buffers = {
                "zero_copy": b.zero_copy,
                "copy": b.copy,
                "be_alloc": b.backend_allocated,
                "buffers": b.buffers,
                "pages": b.pages,
                "framebuffers": b.framebuffers,
                "deferred_destroys": b.deferred,
                "import_fallbacks": b.import_fallbacks,
            }
            reasons = store.copy_reasons()
        return DeviceReport(
            devid=status.devid,
            state=status.state,
            backend_state=status.backend_state,
            frontend_state=status.frontend_state,
            connects=status.connects,
            violations=status.violations,
            buffers=buffers,
            copy_reasons=reasons,
            export_supported=store.export_supported if store is not None else None,
            connectors=connectors,
        )

    def _fps(self, key: tuple[int, int, int, int], count: int, since: float, now: float) -> float:
        sample = self._samples.get(key)
        if sample is None:
            # First report of this connector: its rate since it connected.
            sample = _Sample(0, since, 0.0)
        if now - sample.time >= FPS_WINDOW_S or key not in self._samples:
            elapsed = now - sample.time
            fps = (count - sample.count) / elapsed if elapsed > 0 else 0.0
            self._samples[key] = _Sample(count, now, round(fps, 2))
        return self._samples[key].fps


def _output(output: Output) -> OutputReport:
    mode = output.mode
    stats = output.stats
    kms = getattr(output, "kms_info", None)
    return OutputReport(
        name=output.name,
        mode=f"{mode.width}x{mode.height}@{round(mode.refresh_hz, 2):g}",
        enabled=output.enabled,
        flips_completed=stats.flips_completed,
        frames_shown=stats.frames_shown,
        missed_vblanks=stats.missed_vblanks,
        kms=dataclasses.asdict(kms) if kms is not None else None,
    )


def to_json(report: DaemonReport) -> dict[str, Any]:
    """The report as the JSON document ``displback status --json`` prints."""
    return dataclasses.asdict(report)


# --- the table -----------------------------------------------------------------------------

_CONNECTOR_COLUMNS = (
    "guest",
    "dev",
    "conn",
    "state",
    "frontend",
    "output",
    "mode",
    "fps",
    "flips",
    "events",
    "timeouts",
    "throttled",
)


def _table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def render_table(doc: Mapping[str, Any]) -> str:
    """The JSON document (:func:`to_json`) as the text ``displback status`` prints."""
    lines = [
        f"displback {doc['version']} (pid {doc['pid']}) in domain {doc['domid']}, "
        f"up {_duration(doc['uptime_s'])}"
    ]
    outputs = {o["name"]: o for o in doc["outputs"]}
    rows: list[list[str]] = []
    for guest in doc["guests"]:
        who = f"{guest['domid']}" + (f" {guest['name']}" if guest["name"] else "")
        for device in guest["devices"]:
            base = [who, str(device["devid"])]
            state = device["state"]
            frontend = device["frontend_state"] or "-"
            if not device["connectors"]:
                rows.append([*base, "-", state, frontend, *["-"] * 7])
            for c in device["connectors"]:
                out = outputs.get(c["output"] or "")
                mode = c["guest_mode"] or "off"
                if out is not None:
                    mode += f" on {out['mode']}"
                timeouts = f"{c['frame_done_timeouts']}/{c['flip_timeouts']}"
                throttled = f"{c['throttled']}/{c['wakeups_throttled']}"
                rows.append(
                    [
                        *base,
                        str(c["index"]),
                        state,
                        frontend,
                        c["output"] or "-",
                        mode,
                        f"{c['fps']:.1f}",
                        str(c["flips"]),
                        str(c["events"]),
                        timeouts,
                        throttled,
                    ]
                )
    if rows:
        lines += ["", *_table(_CONNECTOR_COLUMNS, rows)]
    else:
        lines += ["", "no guest devices"]
    lines += _guest_lines(doc)
    lines += _output_lines(doc)
    return "\n".join(lines)


def _guest_lines(doc: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for guest in doc["guests"]:
        title = f"guest {guest['domid']}" + (f" ({guest['name']})" if guest["name"] else "")
        lines += ["", f"{title}:"]
        for device in guest["devices"]:
            b = device["buffers"]
            if b is None:
                lines.append(f"  device {device['devid']}: no buffers (not connected)")
                continue
            lines.append(
                f"  device {device['devid']}: buffers {b['zero_copy']} zero-copy, "
                f"{b['copy']} copy, {b['be_alloc']} be-alloc ({b['pages']} pages, "
                f"{b['framebuffers']} framebuffers); {b['import_fallbacks']} import fallbacks"
            )
            lines.append(
                f"    connects {device['connects']}, protocol violations "
                f"{device['violations']}, deferred destroys {b['deferred_destroys']}"
            )
            for reason, count in device["copy_reasons"].items():
                lines.append(f"    copied ({count}): {reason}")
        quota = guest["quota"]
        if quota:
            used = ", ".join(f"{k} {v['used']}/{v['limit']}" for k, v in quota.items())
            lines += textwrap.wrap(
                f"quota used/limit: {used}", 96, initial_indent="  ", subsequent_indent="    "
            )
            lines.append(
                f"  request rate: {guest['requests_per_second']:g}/s, "
                f"burst {guest['request_burst']}"
            )
        for vkbd in guest.get("inputs", []):
            lines.append(
                f"  vkbd {vkbd['devid']} → {vkbd['target']}: {vkbd['state']}"
                + (f" {vkbd['mode']}" if vkbd["mode"] else "")
                + f", events {vkbd['published']} written, {vkbd['waiting']} waiting, "
                f"{vkbd['dropped']} dropped; connects {vkbd['connects']}, protocol "
                f"violations {vkbd['violations']}"
            )
        lines.append(
            f"  deferred releases {guest['deferred_releases']}; be-alloc memory kept: "
            f"{guest['retained_buffers']} buffers, {guest['retained_pages']} pages"
        )
    return lines


def _output_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = ["", "outputs:"]
    for out in doc["outputs"]:
        line = (
            f"  {out['name']}: {out['mode']}, {'on' if out['enabled'] else 'off'}, "
            f"{out['flips_completed']} flips, {out['missed_vblanks']} missed vblanks"
        )
        kms = out["kms"]
        lines.append(line)
        if kms is not None:
            lines.append(
                f"    {kms['card']} ({kms['driver']}), CRTC {kms['crtc']}, {kms['commit']} "
                f"commits, {kms['flip_timeouts']} flip timeouts, {kms['native_flips']} flips by "
                "copy threads"
                + ("" if kms["connected"] else ", unplugged")
            )
            lines.append(
                f"    frame on screen: {kms['placement']}; other sizes: {kms['other_sizes']}"
            )
    d = doc["deferred"]
    if d:
        lines.append(
            f"deferred releases: {d['pending']} pending ({d['deferred']} deferred, "
            f"{d['released']} released, {d['abandoned']} abandoned since start)"
        )
    lines.append(f"be-alloc memory kept for guests: {doc['retained_pages']} pages")
    grants = doc.get("dom0_grants")
    if grants:
        lines.append(
            f"Dom0 grant entries held for guests: {grants['held']} of {grants['limit']} "
            "([limits] dom0_grant_entries)"
        )
    return lines


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f} s"
    h, rem = divmod(s, 3600)
    return f"{h} h {rem // 60} min" if h else f"{rem // 60} min {rem % 60} s"
