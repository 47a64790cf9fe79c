"""``displback run``: options, start-up refusals, and serving guests until a signal.

Serving is exercised on the simulated machine (its platform stands in for the real one, as
:func:`displback.app.run.serve` accepts any platform); the signal is a real SIGTERM to this process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import pytest
import trio

from displback.app.run import RunConfig, StartupError, add_run_parser, config_from_args, serve
from displback.backend.buffers import ZeroCopyPolicy
from displback.display.virtual import OutputConfig
from displback.protocol import layout
from displback.protocol.xenbus import XenbusState, parse_state
from displback.sim.hypervisor import HypervisorThread
from displback.sim.platform import SimPlatform, client_resources
from displback.sim.toolstack import Toolstack
from displback.sim.xenstored import running_xenstored
from tests.backend.support import wait_until


def _states(snapshots: Path) -> list[str]:
    try:
        doc = json.loads((snapshots / "status.json").read_text())
        return [device["state"] for guest in doc["guests"] for device in guest["devices"]]
    except FileNotFoundError:
        return []


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["run", *argv])


def test_options_become_the_config() -> None:
    args = _parse(
        "--xenstore",
        "/dev/xen/xenbus",
        "--virtual-output",
        "left=1024x768",
        "--virtual-output",
        "right=800x600@30",
        "--assign",
        "1/0/1=left",
        "--zero-copy",
        "off",
        "--wait-free-ms",
        "100",
        "--snapshot-dir",
        "/tmp/x",
        "--log-format",
        "json",
    )
    config = config_from_args(args)
    assert config.xenstore == "/dev/xen/xenbus"
    assert [(o.name, o.width, o.height, o.refresh_hz) for o in config.virtual_outputs] == [
        ("left", 1024, 768, 60.0),
        ("right", 800, 600, 30.0),
    ]
    assert config.assign == {"1/0/1": "left"}
    assert config.zero_copy is ZeroCopyPolicy.OFF
    assert config.wait_free_ms == 100
    assert config.snapshot_dir == Path("/tmp/x")
    assert config.log_format == "json"
    assert args.func.__name__ == "run_command"


@pytest.mark.parametrize("bad", ["left", "left=10", "left=0x10", "=10x10", "a b=1x1"])
def test_malformed_virtual_outputs_are_refused(bad: str) -> None:
    with pytest.raises(SystemExit):
        _parse("--virtual-output", bad)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (RunConfig(), r"needs at least one output \(--virtual-output"),
        (
            RunConfig(virtual_outputs=[OutputConfig("a", 8, 8), OutputConfig("a", 8, 8)]),
            "duplicate output name 'a'",
        ),
        (
            RunConfig(virtual_outputs=[OutputConfig("a", 8, 8)], assign={"1/0/0": "b"}),
            "--assign: names output 'b', which is not one of the virtual_outputs",
        ),
        (RunConfig(display="kms", card="/dev/dri/card0"), r"at least one connector \(--connector"),
        (RunConfig(display="kms", connectors=["Virtual-1=0x1"]), "--connector: 'Virtual-1=0x1'"),
    ],
)
async def test_inconsistent_options_refuse_to_start(config: RunConfig, message: str) -> None:
    with pytest.raises(StartupError, match=message):
        await serve(config)


async def test_sigterm_releases_every_guest_resource_and_tells_the_guest_closed(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    from displback.sim.guest import SimGuest

    snapshots = tmp_path / "snap"
    config = RunConfig(
        virtual_outputs=[OutputConfig("left", 320, 240)],
        snapshot_dir=snapshots,
        snapshot_interval_s=0.05,
    )
    with trio.fail_after(15):
        async with running_xenstored(str(tmp_path)) as xs:
            platform = SimPlatform(hypervisor.socket_path, xs.socket_path)
            toolstack = Toolstack(xs.xenstored, init_timeout=10.0, destroy_timeout=10.0)
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def run_daemon() -> None:
                    await serve(config, platform=platform)
                    done.set()

                nursery.start_soon(run_daemon)
                toolstack.create_domain(1, "guest1")
                await xs.add_domain_socket(1)
                await toolstack.add_vdispl(1, "connectors=c0:320x240")
                async with SimGuest.open(
                    hypervisor_path=hypervisor.socket_path,
                    xenstore_path=xs.domain_sockets[1],
                    domid=1,
                ) as guest:
                    await guest.wait_connected()
                    await wait_until(lambda: _states(snapshots) == ["connected"])
                    assert (snapshots / "left.png").exists()
                    os.kill(os.getpid(), signal.SIGTERM)
                    await done.wait()
                    state = xs.xenstored.tree.node(f"{layout.backend_dir(0, 1, 0)}/{layout.STATE}")
                    assert state is not None
                    assert parse_state(state.value) is XenbusState.CLOSED
            platform.close()
    assert client_resources() == {"connections": 0, "mappings": 0, "eventfds": 0, "dmabuf_refs": 0}
