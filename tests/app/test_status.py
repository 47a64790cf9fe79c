"""``displback status``: the daemon's status model served over its socket, end to end on the
simulated machine (virtual and KMS displays), and a socket no client can use to stall it."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import trio

from displback.app import status_socket
from displback.app.cli import main
from displback.app.status import StatusModel, render_table, to_json
from displback.app.status_socket import StatusUnavailable, fetch_status, serve_status
from displback.backend.buffers import ZeroCopyPolicy
from displback.backend.device import BackendSettings
from displback.kms.display import KmsDisplay, KmsOutputConfig
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import SimMachine
from tests.backend.support import connected_guest, flip_frame, release, show, wait_until
from tests.kms.fake import FakeCard, bochs_card, vkms_card

SPEC = "connectors=c0:320x240;c1:320x240"


@asynccontextmanager
async def status_served(machine: SimMachine, path: Path) -> AsyncIterator[StatusModel]:
    """The machine's daemon serving its status on ``path``, as ``displback run`` does."""
    model = StatusModel(machine.backend, machine.display.outputs)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(serve_status, lambda: to_json(model.report()), str(path))
        )
        yield model
        nursery.cancel_scope.cancel()


async def _fetch(path: Path) -> dict[str, Any]:
    return await trio.to_thread.run_sync(fetch_status, str(path))


async def _flips(guest: Any, bufs: list[Any], fbs: list[Any], count: int) -> None:
    """``count`` flips on connector 0, double buffered, each completed with its event."""
    for frame in range(2, 2 + count):
        await flip_frame(guest, 0, bufs[frame % 2], fbs[frame % 2], frame)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["status", *argv])
    return rc, out.getvalue(), err.getvalue()


async def test_status_shows_each_guest_connector_with_its_buffers_and_quota(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    path = tmp_path / "run" / "status.sock"
    with trio.fail_after(30):
        async with (
            connected_guest(hypervisor, tmp_path, SPEC) as (machine, guest),
            status_served(machine, path),
        ):
            bufs, fbs = await show(guest, 0, 320, 240)
            await _flips(guest, bufs, fbs, 3)
            doc = await _fetch(path)
            [g] = doc["guests"]
            assert (g["domid"], g["name"]) == (1, "guest1")
            [device] = g["devices"]
            assert device["state"] == "connected"
            assert (device["backend_state"], device["frontend_state"]) == (
                "CONNECTED",
                "CONNECTED",
            )
            c0, c1 = device["connectors"]
            assert (c0["output"], c0["guest_mode"], c1["guest_mode"]) == ("A", "320x240", None)
            assert c0["flips"] >= 3 and c0["events"] == c0["flips"]
            assert c0["frame_done_timeouts"] == 0
            assert device["buffers"]["zero_copy"] == 2 and device["copy_reasons"] == {}
            assert g["quota"]["buffers"] == {
                "used": 2,
                "limit": machine.backend.accounts[1].limits.max_buffers,
            }
            assert [o["name"] for o in doc["outputs"]] == ["A", "B", "C", "D"]

            rc, out, _ = await trio.to_thread.run_sync(_cli, "--socket", str(path))
            assert rc == 0
            assert "1 guest1  0    0     connected  CONNECTED  A" in out
            assert "2 zero-copy, 0 copy, 0 be-alloc" in out
            rc, out, _ = await trio.to_thread.run_sync(_cli, "--json", "--socket", str(path))
            assert rc == 0 and json.loads(out)["guests"][0]["domid"] == 1
            await release(guest, 0, bufs, fbs)


async def test_status_shows_the_dom0_grant_budget_held_for_be_alloc_buffers(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    path = tmp_path / "status.sock"
    with trio.fail_after(30):
        async with (
            connected_guest(hypervisor, tmp_path, "be-alloc=1,connectors=c0:320x240") as (
                machine,
                guest,
            ),
            status_served(machine, path),
        ):
            limit = machine.backend.grant_budget.limit
            assert (await _fetch(path))["dom0_grants"] == {"held": 0, "limit": limit}
            buf = await guest.create_dumb(320, 240, 32)  # 75 pages, granted by Dom0
            doc = await _fetch(path)
            assert doc["dom0_grants"] == {"held": 75, "limit": limit}
            assert f"Dom0 grant entries held for guests: 75 of {limit}" in render_table(doc)
            await guest.destroy_dumb(buf)
            # Destroyed memory is kept (the guest may still map it) with its grants held...
            doc = await _fetch(path)
            assert doc["dom0_grants"]["held"] == doc["retained_pages"] == 75
            # ...and a buffer of the same size reuses them: no new entry is held.
            await guest.create_dumb(320, 240, 32)
            assert (await _fetch(path))["dom0_grants"]["held"] == 75


async def test_each_copied_buffer_says_why_it_is_copied(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    path = tmp_path / "status.sock"
    with trio.fail_after(30):
        (tmp_path / "2").mkdir()
        async with (
            connected_guest(
                hypervisor, tmp_path, SPEC, settings=BackendSettings(zero_copy=ZeroCopyPolicy.OFF)
            ) as (machine, guest),
            status_served(machine, path),
        ):
            bufs, fbs = await show(guest, 0, 320, 240)
            [device] = (await _fetch(path))["guests"][0]["devices"]
            assert device["buffers"]["copy"] == 2
            assert device["copy_reasons"] == {"zero_copy is off": 2}
            await release(guest, 0, bufs, fbs)
        async with (
            connected_guest(
                hypervisor, tmp_path / "2", SPEC, display_options={"import_supported": False}
            ) as (machine, guest),
            status_served(machine, path),
        ):
            bufs, fbs = await show(guest, 0, 320, 240)
            [device] = (await _fetch(path))["guests"][0]["devices"]
            [(reason, count)] = device["copy_reasons"].items()
            assert reason.startswith("A refused the import: ") and count == 1
            assert "copied (1): A refused the import" in render_table(await _fetch(path))
            await release(guest, 0, bufs, fbs)


@pytest.fixture(params=["vkms", "bochs"])
def card(request: pytest.FixtureRequest) -> Iterator[FakeCard]:
    # The atomic card places its primary plane (as i915 or amdgpu do; vkms itself cannot).
    made = vkms_card(plane_can_position=True) if request.param == "vkms" else bochs_card()
    yield made
    made.close()


async def test_a_kms_output_shows_its_card_commit_path_and_frame_placement(
    hypervisor: HypervisorThread, tmp_path: Path, card: FakeCard
) -> None:
    def open_kms(platform: Any) -> Any:
        return KmsDisplay.open(
            [KmsOutputConfig("Virtual-1", 1024, 768)],
            device=card.device(),
            dmabuf_importer=platform.open_dmabuf,
            hotplug_poll_s=0,
        )

    path = tmp_path / "status.sock"
    with trio.fail_after(30):
        async with (
            connected_guest(hypervisor, tmp_path, SPEC, open_display=open_kms) as (
                machine,
                guest,
            ),
            status_served(machine, path),
        ):
            bufs, fbs = await show(guest, 0, 320, 240)
            await _flips(guest, bufs, fbs, 2)
            doc = await _fetch(path)
            [out] = doc["outputs"]
            kms = out["kms"]
            assert (kms["driver"], out["mode"]) == (card.driver, "1024x768@60")
            if card.driver == "vkms":
                assert (kms["commit"], kms["placement"]) == ("atomic", "plane position")
            else:
                assert (kms["commit"], kms["placement"]) == ("legacy", "letterbox")
                [reason] = doc["guests"][0]["devices"][0]["copy_reasons"]
                assert "cannot import dma-bufs (no PRIME import)" in reason
            assert kms["flip_timeouts"] == 0
            assert doc["guests"][0]["devices"][0]["connectors"][0]["output"] == "Virtual-1"
            text = render_table(doc)
            assert f"{kms['commit']} commits" in text and kms["placement"] in text
            await release(guest, 0, bufs, fbs)


async def test_opening_a_kms_output_logs_card_commit_path_and_placement_once(
    card: FakeCard, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="displback.kms.display")
    async with KmsDisplay.open(
        [KmsOutputConfig("Virtual-1", 800, 600)], device=card.device(), hotplug_poll_s=0
    ):
        pass
    [line] = [r.getMessage() for r in caplog.records if "output Virtual-1" in r.getMessage()]
    commit = "atomic" if card.driver == "vkms" else "legacy"
    assert f"{commit} commits" in line and "mode 800x600@60" in line
    assert ("plane position" if commit == "atomic" else "letterbox") in line


async def test_the_socket_is_root_only_and_replaces_a_stale_one_but_not_a_live_one(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    path = tmp_path / "run" / "displback" / "status.sock"
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path) as (machine, _):
            async with status_served(machine, path):
                assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                with pytest.raises(OSError, match="another daemon"):
                    await serve_status(dict, str(path))
            assert not path.exists()  # removed when the daemon stops
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stale.bind(str(path))
            stale.close()  # a socket file nobody listens on: a dead daemon's
            async with status_served(machine, path):
                assert (await _fetch(path))["guests"][0]["domid"] == 1


def test_status_without_a_daemon_says_so_and_exits_1(tmp_path: Path) -> None:
    rc, out, err = _cli("--socket", str(tmp_path / "none.sock"))
    assert (rc, out) == (1, "")
    assert "displback is not running" in err
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    rc, _, err = _cli("--socket", str(tmp_path / "dead.sock"))
    assert rc == 1 and "not running" in err


def test_a_socket_the_user_may_not_open_is_reported(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to drop to another user")
    os.chmod(tmp_path, 0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s.sock"))
    listener.listen()
    os.chmod(tmp_path / "s.sock", 0o600)
    pid = os.fork()
    if pid == 0:  # a non-root user, as an admin without sudo
        try:
            os.setuid(65534)
            fetch_status(str(tmp_path / "s.sock"))
        except StatusUnavailable as exc:
            os._exit(0 if "no permission" in str(exc) else 2)
        except BaseException:
            os._exit(3)
        os._exit(4)
    _, code = os.waitpid(pid, 0)
    listener.close()
    assert os.waitstatus_to_exitcode(code) == 0


async def test_clients_that_never_write_or_never_read_cannot_stall_the_daemon(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status_socket, "CLIENT_TIMEOUT_S", 0.5)
    path = tmp_path / "status.sock"
    hostile: list[trio.socket.SocketType] = []
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path, SPEC) as (machine, guest):
            model = StatusModel(machine.backend, machine.display.outputs)
            big = {"padding": "x" * (3 << 20)}  # far more than a socket buffer holds
            async with trio.open_nursery() as nursery:

                def document() -> dict[str, Any]:
                    return {**to_json(model.report()), **big}

                await nursery.start(functools.partial(serve_status, document, str(path)))
                bufs, fbs = await show(guest, 0, 320, 240)
                # Every client slot taken: half never send a request, half ask and never read.
                for i in range(status_socket.MAX_CLIENTS + 2):
                    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    await s.connect(str(path))
                    if i % 2:
                        with contextlib.suppress(OSError):  # over the limit: closed at once
                            await s.send(b"status\n")
                    hostile.append(s)
                # The daemon goes on serving its guest meanwhile.
                await _flips(guest, bufs, fbs, 5)
                # And once they are dropped, an honest client gets its answer.
                doc: dict[str, Any] = {}

                async def answered() -> None:
                    nonlocal doc
                    while True:
                        with contextlib.suppress(StatusUnavailable):
                            doc = await _fetch(path)
                            return
                        await trio.sleep(0.1)

                await answered()
                assert doc["guests"][0]["devices"][0]["connectors"][0]["flips"] >= 5
                for s in hostile:
                    with contextlib.suppress(OSError):
                        while await s.recv(1 << 20):  # dropped: end of file (or a reset)
                            pass
                    s.close()
                await release(guest, 0, bufs, fbs)
                nursery.cancel_scope.cancel()


async def test_a_bad_request_gets_an_error_document(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    path = tmp_path / "status.sock"

    def ask(request: bytes) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
            return json.loads(s.makefile("rb").read())

    with trio.fail_after(30):
        async with (
            connected_guest(hypervisor, tmp_path) as (machine, _),
            status_served(machine, path),
        ):
            answer = await trio.to_thread.run_sync(ask, b"reboot\n")
            assert "unknown request" in answer["error"]
            answer = await trio.to_thread.run_sync(ask, b"s" * 65)
            assert "at most 64 bytes" in answer["error"]
            answer = await trio.to_thread.run_sync(ask, b"status\n")
            assert answer["guests"][0]["domid"] == 1


async def test_the_demo_and_status_json_show_the_same_model(tmp_path: Path) -> None:
    from displback.app.demo import run_demo

    out = io.StringIO()
    with trio.fail_after(60):
        rc = await run_demo(seconds=1.0, fps=20, snapshots=tmp_path, out=out, status_interval=0.5)
    assert rc == 0, out.getvalue()
    assert "guest     dev  conn  state      frontend   output" in out.getvalue()
    assert "2 guest2  0    1     connected  CONNECTED  guest2-1" in out.getvalue()


def test_the_table_of_an_idle_daemon_says_there_is_no_guest() -> None:
    doc = {
        "version": "0",
        "pid": 1,
        "domid": 0,
        "uptime_s": 3.0,
        "outputs": [],
        "deferred": {},
        "retained_pages": 0,
        "guests": [],
    }
    assert "no guest devices" in render_table(doc)


def test_run_serves_status_on_the_default_socket_unless_told_otherwise() -> None:
    import argparse

    from displback.app.run import add_run_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_run_parser(parser.add_subparsers(dest="command"))
    config = config_from_args(parser.parse_args(["run"]))
    assert config.status_socket == "/run/displback/status.sock"
    config = config_from_args(parser.parse_args(["run", "--status-socket", ""]))
    assert config.status_socket is None


async def test_a_flip_event_later_than_the_guest_waits_counts_as_a_frame_done_timeout(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2 Hz output lands a flip up to 0.5 s after it was accepted: past a (shortened)
    # frame-done timeout of 0.2 s, the guest would have given up on its event.
    from displback.display.virtual import OutputConfig

    path = tmp_path / "status.sock"
    outputs = [OutputConfig("A", 320, 240, 2.0)]
    with trio.fail_after(30):
        async with (
            connected_guest(hypervisor, tmp_path, outputs=outputs) as (machine, guest),
            status_served(machine, path),
        ):
            bufs, fbs = await show(guest, 0, 320, 240)
            await _flips(guest, bufs, fbs, 2)
            [c] = (await _fetch(path))["guests"][0]["devices"][0]["connectors"]
            assert c["frame_done_timeouts"] == c["events_late"] == 0
            [connector] = machine.backend.statuses()[0].connectors
            monkeypatch.setattr(connector.flips, "late_after", 0.2)
            await _flips(guest, bufs, fbs, 2)
            [c] = (await _fetch(path))["guests"][0]["devices"][0]["connectors"]
            assert c["events_late"] >= 1 and c["frame_done_timeouts"] == c["events_late"]
            assert render_table(await _fetch(path)).count(f"{c['events_late']}/0") == 1
            await release(guest, 0, bufs, fbs)


async def test_run_serves_its_status_and_runs_on_without_a_usable_socket(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    from structlog.testing import capture_logs

    from displback.app.run import RunConfig, serve
    from displback.display.virtual import OutputConfig
    from displback.sim.platform import SimPlatform
    from displback.sim.toolstack import Toolstack
    from displback.sim.xenstored import running_xenstored

    (tmp_path / "file").touch()
    good, bad = tmp_path / "run" / "status.sock", tmp_path / "file" / "status.sock"
    with trio.fail_after(30):
        async with running_xenstored(str(tmp_path)) as xs:
            platform = SimPlatform(hypervisor.socket_path, xs.socket_path)
            toolstack = Toolstack(xs.xenstored, init_timeout=10.0, destroy_timeout=10.0)
            toolstack.create_domain(1, "guest1")
            await xs.add_domain_socket(1)
            for path in (good, bad):
                config = RunConfig(
                    virtual_outputs=[OutputConfig("left", 320, 240)], status_socket=str(path)
                )
                with capture_logs() as logs:
                    async with trio.open_nursery() as nursery:
                        backend = await nursery.start(
                            functools.partial(serve, config, platform=platform)
                        )
                        if path == good:
                            await toolstack.add_vdispl(1, "connectors=c0:320x240")
                        await wait_until(lambda b=backend: len(b.statuses()) == 1)
                        if path == good:
                            doc = await _fetch(good)
                            assert doc["guests"][0]["devices"][0]["devid"] == 0
                            assert doc["outputs"][0]["name"] == "left"
                        nursery.cancel_scope.cancel()
                if path == bad:
                    [warning] = [e for e in logs if e["event"].startswith("no status socket")]
                    assert warning["path"] == str(bad)
            assert not good.exists()  # removed when the daemon stopped
            platform.close()
