"""A configured Dom0 input device feeding a guest: found, grabbed, unplugged, found again —
over a FIFO standing in for the evdev node (an injected ioctl answers the evdev requests),
end to end into a simulated xen-kbdfront, and over a real uinput device where the kernel
offers one."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from displback.evdev import uapi
from displback.evdev.device import EvdevDevice
from displback.evdev.source import EvdevSource, InputAssignment
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import sim_machine
from tests.backend.support import wait_until
from tests.recorder import Recorder

KEY_A = 30


class FakeKernel:
    """The evdev ioctls of one device: its name, no absolute axes, and its grab."""

    def __init__(self, name: str = "Fake Keyboard") -> None:
        self.name = name
        self.grabs = 0
        self.busy = False

    def ioctl(self, fd: int, request: int, arg: Any) -> Any:
        if request == uapi.EVIOCGRAB:
            if self.busy:
                raise OSError(errno.EBUSY, "grabbed by another client")
            self.grabs += 1
            return 0
        if request == uapi.EVIOCGNAME(len(arg)):
            raw = self.name.encode()
            arg[: len(raw)] = raw
            return len(raw)
        if (request & 0xFFFF) == (ord("E") << 8 | 0x20 + uapi.EV_ABS):
            return 0  # no absolute axes (the buffer stays zero)
        raise OSError(errno.ENOTTY, f"unexpected ioctl {request:#x}")

    def opener(self) -> Callable[[str], EvdevDevice]:
        return lambda path: EvdevDevice(path, ioctl=self.ioctl)


class Plug:
    """A FIFO at ``path`` with a writer: the device is plugged while it exists."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def plug(self) -> None:
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)

    def send(self, *events: tuple[int, int, int]) -> None:
        assert self.fd is not None
        os.write(self.fd, b"".join(uapi.pack_event(*e) for e in events))

    def unplug(self) -> None:
        assert self.fd is not None
        self.path.unlink()
        os.close(self.fd)
        self.fd = None


KEY_PRESS = ((uapi.EV_KEY, KEY_A, 1), (uapi.EV_SYN, uapi.SYN_REPORT, 0))


async def test_the_device_is_grabbed_read_released_when_unplugged_and_found_again(
    tmp_path: Path,
) -> None:
    kernel, sink, plug = FakeKernel(), Recorder(), Plug(tmp_path / "event-kbd")
    source = EvdevSource(
        InputAssignment(guest=1, device=str(plug.path)), sink, poll_s=0.01,
        open_device=kernel.opener(),
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.run)
            await trio.sleep(0.05)  # absent: looked for, nothing opened
            assert source.opened == 0
            plug.plug()
            await wait_until(lambda: source.present)
            assert kernel.grabs == 1
            plug.send(*KEY_PRESS)
            await wait_until(lambda: ("frame",) in sink.events)
            assert sink.events[:2] == [("key", KEY_A, True), ("frame",)]
            plug.unplug()
            await wait_until(lambda: not source.present)
            assert sink.events[-1] == ("release_all",)
            plug.plug()
            await wait_until(lambda: source.opened == 2)
            plug.send(*KEY_PRESS)
            await wait_until(lambda: sink.events.count(("frame",)) == 2)
            nursery.cancel_scope.cancel()
    plug.unplug()


async def test_a_device_another_client_holds_is_retried_until_it_lets_go(tmp_path: Path) -> None:
    kernel, sink, plug = FakeKernel(), Recorder(), Plug(tmp_path / "event-kbd")
    kernel.busy = True
    plug.plug()
    source = EvdevSource(
        InputAssignment(guest=1, device=str(plug.path)), sink, poll_s=0.01,
        open_device=kernel.opener(),
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.run)
            await trio.sleep(0.05)
            assert not source.present and kernel.grabs == 0
            kernel.busy = False
            await wait_until(lambda: source.present)
            nursery.cancel_scope.cancel()
    plug.unplug()


async def test_a_device_found_by_name_types_into_the_guest_named_in_the_config(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    inputs = tmp_path / "input"
    inputs.mkdir()
    Plug(inputs / "event0").plug()  # another device first
    kernel = FakeKernel("Keyboard B")
    other = FakeKernel("Keyboard A")
    plug = Plug(inputs / "event1")
    plug.plug()

    def opener(path: str) -> EvdevDevice:
        return (kernel if path.endswith("event1") else other).opener()(path)

    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as machine:
            await machine.add_guest(3, "connectors=c0:640x480")
            await machine.add_vkb(3)
            port = machine.backend.inputs.named_port("guest3")
            source = EvdevSource(
                InputAssignment(guest="guest3", name="Keyboard B"), port, poll_s=0.01,
                input_dir=str(inputs), open_device=opener,
            )
            async with machine.kbdfront(3) as front:
                machine.nursery.start_soon(source.run)
                await wait_until(lambda: source.present)
                await wait_until(lambda: machine.backend.inputs.domid_of("guest3") == 3)
                plug.send(*KEY_PRESS)
                await front.wait_for(lambda f: KEY_A in f.keys_down)
                plug.send((uapi.EV_KEY, KEY_A, 0), (uapi.EV_SYN, uapi.SYN_REPORT, 0))
                await front.wait_for(lambda f: not f.keys_down)
            machine.nursery.cancel_scope.cancel()
    for fifo in inputs.iterdir():
        fifo.unlink()


UINPUT = "/dev/uinput"


@pytest.mark.skipif(
    not os.access(UINPUT, os.R_OK | os.W_OK),
    reason=f"{UINPUT} is missing or not writable here (containers have no uinput); "
    "the FIFO tests above cover the source, tests/vm the real kernel path",
)
async def test_a_uinput_keyboard_is_grabbed_and_its_keys_reach_the_sink() -> None:
    name = f"displback test {os.getpid()} {time.monotonic_ns()}"
    fd = os.open(UINPUT, os.O_WRONLY | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, uapi.UI_SET_EVBIT, uapi.EV_KEY)
        fcntl.ioctl(fd, uapi.UI_SET_KEYBIT, KEY_A)
        setup = uapi.UINPUT_SETUP.pack(0x03, 0x1234, 0x5678, 1, name.encode()[:79], 0)
        fcntl.ioctl(fd, uapi.UI_DEV_SETUP, setup)
        fcntl.ioctl(fd, uapi.UI_DEV_CREATE)
        sink = Recorder()
        source = EvdevSource(InputAssignment(guest=1, name=name), sink, poll_s=0.05)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(source.run)
                await wait_until(lambda: source.present)
                os.write(fd, uapi.pack_event(uapi.EV_KEY, KEY_A, 1)
                         + uapi.pack_event(uapi.EV_SYN, uapi.SYN_REPORT, 0))
                await wait_until(lambda: ("key", KEY_A, True) in sink.events)
                fcntl.ioctl(fd, uapi.UI_DEV_DESTROY)
                await wait_until(lambda: not source.present)
                assert sink.events[-1] == ("release_all",)
                nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
