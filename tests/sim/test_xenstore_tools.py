"""Debian's xenstore-utils C tools (libxenstore 4.17) work unchanged against our xenstored.

The tools find the daemon through ``XENSTORED_PATH``. Tools given several paths wrap their work
in one transaction (``xenstore-write a 1 b 2``, ``xenstore-rm -t``, ``xenstore-chmod``, …).
The tools are a declared test dependency (Makefile ``apt-deps``: ``xenstore-utils``): if they
are missing these tests fail, they do not skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from displback.sim.toolstack import Toolstack, ToolstackError
from displback.sim.xenstore_tree import parse_perms
from displback.sim.xenstored import RunningXenStored, running_xenstored

TOOLS = ("xenstore", "xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-list",
         "xenstore-exists", "xenstore-rm", "xenstore-chmod", "xenstore-watch")


@pytest.fixture
async def xsd(tmp_path: Path) -> AsyncIterator[RunningXenStored]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"xenstore-utils tools missing: {', '.join(missing)}; install the Debian "
                    "package xenstore-utils (`make apt-deps`)")
    async with running_xenstored(tmp_path, domains=(5,)) as running:
        yield running


async def tool(
    xsd: RunningXenStored, *argv: str, domid: int = 0, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    path = xsd.socket_path if domid == 0 else xsd.domain_sockets[domid]
    env = dict(os.environ, XENSTORED_PATH=path)
    with trio.fail_after(10):
        result = await trio.run_process(list(argv), env=env, capture_stdout=True,
                                        capture_stderr=True, check=False)
    if check:
        assert result.returncode == 0, (argv, result.stderr)
    return result


async def test_write_then_read(xsd: RunningXenStored) -> None:
    await tool(xsd, "xenstore-write", "/t/a", "hello world")
    assert (await tool(xsd, "xenstore-read", "/t/a")).stdout == b"hello world\n"
    assert xsd.tree.session(0).read("/t/a") == b"hello world"
    assert (await tool(xsd, "xenstore", "read", "/t/a")).stdout == b"hello world\n"


async def test_write_of_several_pairs_uses_one_transaction(xsd: RunningXenStored) -> None:
    before = xsd.tree.transactions_started
    await tool(xsd, "xenstore-write", "/t/a", "1", "/t/b", "2")
    assert xsd.tree.transactions_started == before + 1
    assert (await tool(xsd, "xenstore-read", "/t/a", "/t/b")).stdout == b"1\n2\n"


async def test_read_of_missing_node_fails(xsd: RunningXenStored) -> None:
    result = await tool(xsd, "xenstore-read", "/missing", check=False)
    assert result.returncode != 0
    assert b"couldn't read path /missing" in result.stderr


async def test_list_and_ls_and_exists(xsd: RunningXenStored) -> None:
    await tool(xsd, "xenstore-write", "/t/x", "1", "/t/y/z", "2")
    assert (await tool(xsd, "xenstore-list", "/t")).stdout == b"x\ny\n"
    assert (await tool(xsd, "xenstore-ls", "/t")).stdout == b'x = "1"\ny = ""\n z = "2"\n'
    assert (await tool(xsd, "xenstore-exists", "/t/y/z")).returncode == 0
    assert (await tool(xsd, "xenstore-exists", "/t/nope", check=False)).returncode == 1


async def test_rm_in_a_transaction_removes_the_subtree(xsd: RunningXenStored) -> None:
    await tool(xsd, "xenstore-write", "/t/sub/a", "1", "/t/sub/b", "2", "/t/keep", "3")
    before = xsd.tree.transactions_started
    await tool(xsd, "xenstore-rm", "-t", "/t/sub")
    assert xsd.tree.transactions_started > before
    assert (await tool(xsd, "xenstore-list", "/t")).stdout == b"keep\n"


async def test_chmod_controls_what_a_guest_may_do(xsd: RunningXenStored) -> None:
    await tool(xsd, "xenstore-write", "/t/n", "v")
    denied = await tool(xsd, "xenstore-read", "/t/n", domid=5, check=False)
    assert denied.returncode != 0
    await tool(xsd, "xenstore-chmod", "/t/n", "n0", "r5")
    assert (await tool(xsd, "xenstore-read", "/t/n", domid=5)).stdout == b"v\n"
    forged = await tool(xsd, "xenstore-write", "/t/n", "forged", domid=5, check=False)
    assert forged.returncode != 0
    assert "(n0,r5)" in (await tool(xsd, "xenstore-ls", "-p", "/t")).stdout.decode()


async def test_guest_tool_writes_relative_to_its_home(xsd: RunningXenStored) -> None:
    dom0 = xsd.tree.session(0)
    dom0.mkdir("/local/domain/5")
    dom0.set_perms("/local/domain/5", parse_perms(["n5"]))
    await tool(xsd, "xenstore-write", "data/greeting", "hi", domid=5)
    assert dom0.read("/local/domain/5/data/greeting") == b"hi"


async def test_watch_prints_initial_and_change_events(xsd: RunningXenStored) -> None:
    env = dict(os.environ, XENSTORED_PATH=xsd.socket_path)
    output: list[bytes] = []

    async def run_watch() -> None:
        result = await trio.run_process(["xenstore-watch", "-n", "3", "/w"], env=env,
                                        capture_stdout=True, capture_stderr=True)
        output.append(result.stdout)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_watch)
            while not any(path == "/w" for conn in xsd.xenstored.connections
                          for path, _token in conn.session.watches):
                await trio.sleep(0.01)
            dom0 = xsd.tree.session(0)
            dom0.write("/w/a", b"1")
            dom0.write("/w", b"2")
    assert output == [b"/w\n/w/a\n/w\n"]


async def test_ls_p_shows_the_permissions_libxl_gives_a_vdispl_device(
    xsd: RunningXenStored,
) -> None:
    """The C client decodes our GET_PERMS answers as we do: the libxl 4.17 layout, as seen by
    ``xenstore-ls -p`` (the device is left half-made: no backend answers here)."""
    ts = Toolstack(xsd.xenstored, init_timeout=0.05)
    ts.create_domain(5, "guest")
    with pytest.raises(ToolstackError):
        await ts.add_vdispl(5, "connectors=id0:640x480")
    listing = (await tool(xsd, "xenstore-ls", "-p", "/local/domain/5/device")).stdout.decode()
    seen = [(line.split("=")[0].strip(), line.rsplit("(", 1)[1].rstrip(")"))
            for line in listing.splitlines()]
    assert sorted(seen) == sorted([
        ("suspend", "n0,r5"), ("event-channel", "n5"),
        ("vdispl", "n0,r5"), ("0", "n5,r0"), ("backend", "n5,r0"), ("backend-id", "n5,r0"),
        ("state", "n5,r0"), ("be-alloc", "n0,r5"), ("0", "n5,r0"), ("resolution", "n0,r5"),
        ("unique-id", "n0,r5"),
    ])
