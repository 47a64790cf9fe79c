"""Fault injection for the hostile tests: Dom0's platform and display layers fail on chosen
calls, the way the real ones do.

:class:`Faults` is the plan: ``faults.fail("grants.map_grants", ENOMEM, times=2)`` makes the
next two ``map_grants`` calls raise. :class:`FaultyPlatform` wraps a
:class:`~displback.xen.interfaces.Platform` (its event channels, gntdev and dma-buf calls
raise ``OSError`` as the ioctls do); :class:`FaultyOutputs` wraps the daemon's output map so
that the outputs it hands out raise what a KMS output raises for that errno (``OSError`` for
dumb buffers, :class:`ImportRefused` for imports, :class:`FlipPending` for ``EBUSY`` and
:class:`DisplayError` otherwise for flips and disables). :func:`inject` installs both in a
running machine: devices created afterwards use them, those already connected do not.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from displback.display.interface import DisplayError, FlipPending, ImportRefused
from displback.protocol.constants import EBUSY
from displback.sim.machine import SimMachine

__all__ = ["Faults", "FaultyOutputs", "FaultyPlatform", "inject"]


class Faults:
    """Which calls fail next, and which did."""

    def __init__(self) -> None:
        self._plan: dict[str, collections.deque[int]] = collections.defaultdict(
            collections.deque)
        self.raised: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def fail(self, call: str, errno: int, *, times: int = 1) -> None:
        """The next ``times`` calls of ``call`` (``"layer.method"``) fail with ``errno``."""
        self._plan[call].extend([errno] * times)

    def clear(self) -> None:
        """Forget the failures planned and not raised yet."""
        self._plan.clear()

    def pending(self, call: str) -> int:
        """Planned failures of ``call`` not raised yet."""
        return len(self._plan[call])

    def take(self, call: str) -> int | None:
        """Count a call of ``call``; the errno it must fail with, if any."""
        self.calls[call] += 1
        plan = self._plan.get(call)
        if not plan:
            return None
        self.raised[call] += 1
        return plan.popleft()

    def check(self, call: str) -> None:
        """Raise ``OSError`` if ``call`` is planned to fail now."""
        err = self.take(call)
        if err is not None:
            raise OSError(err, f"injected: {call}: {os.strerror(err)}")


class _Wrapper:
    """Delegates everything to ``inner`` except the methods a subclass fails."""

    _layer = ""

    def __init__(self, inner: Any, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self._faults.check(f"{self._layer}.{name}")
        return getattr(self._inner, name)(*args, **kwargs)


class _FaultyEventChannels(_Wrapper):
    _layer = "evtchn"

    def bind_interdomain(self, *args: Any) -> Any:
        return self._call("bind_interdomain", *args)

    def notify(self, *args: Any) -> Any:
        return self._call("notify", *args)

    def read_pending(self) -> Any:
        return self._call("read_pending")

    def unmask(self, *args: Any) -> Any:
        return self._call("unmask", *args)


class _FaultyGrants(_Wrapper):
    _layer = "grants"

    def map_grants(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("map_grants", *args, **kwargs)

    def copy_from_grant(self, *args: Any) -> Any:
        return self._call("copy_from_grant", *args)

    def dmabuf_export(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("dmabuf_export", *args, **kwargs)

    def dmabuf_wait_released(self, *args: Any) -> Any:
        return self._call("dmabuf_wait_released", *args)

    def dmabuf_import_to_refs(self, *args: Any) -> Any:
        return self._call("dmabuf_import_to_refs", *args)

    def dmabuf_import_release(self, *args: Any) -> Any:
        return self._call("dmabuf_import_release", *args)


class FaultyPlatform(_Wrapper):
    """A Platform whose devices and dma-buf calls fail as planned."""

    _layer = "platform"

    def open_event_channels(self) -> Any:
        return _FaultyEventChannels(self._call("open_event_channels"), self._faults)

    def open_grant_device(self) -> Any:
        return _FaultyGrants(self._call("open_grant_device"), self._faults)

    def open_dmabuf(self, fd: int) -> Any:
        return self._call("open_dmabuf", fd)

    def alloc_dmabuf(self, size: int) -> Any:
        return self._call("alloc_dmabuf", size)


class _FaultyOutput(_Wrapper):
    """An output failing like a KMS output does for the planned errno."""

    _layer = "output"

    def _display_error(self, name: str, kind: type[DisplayError] = DisplayError) -> None:
        err = self._faults.take(f"output.{name}")
        if err is None:
            return
        text = f"injected: output {self._inner.name}: {name}: {os.strerror(err)}"
        if kind is DisplayError and err == EBUSY:
            raise FlipPending(text)
        raise kind(text)

    def import_dmabuf(self, *args: Any, **kwargs: Any) -> Any:
        self._display_error("import_dmabuf", ImportRefused)
        return self._inner.import_dmabuf(*args, **kwargs)

    def create_dumb(self, **kwargs: Any) -> Any:
        return self._call("create_dumb", **kwargs)  # DRM_IOCTL_MODE_CREATE_DUMB: OSError

    async def flip(self, fb: Any) -> Any:
        self._display_error("flip")
        return await self._inner.flip(fb)

    def start_flip(self, fb: Any, on_landed: Any) -> bool:
        self._display_error("flip")  # the same page flip, without a waiting task
        return bool(self._inner.start_flip(fb, on_landed))

    def native_flip(self, fb: Any, on_landed: Any) -> None:
        return None  # every flip through start_flip, where its faults are injected

    async def disable(self) -> None:
        self._display_error("disable")
        await self._inner.disable()

    def release(self, fb: Any) -> None:
        self._inner.release(fb)


class FaultyOutputs(_Wrapper):
    """The daemon's output map, handing out outputs that fail as planned."""

    def __init__(self, inner: Any, faults: Faults) -> None:
        super().__init__(inner, faults)
        self._wrapped: dict[int, _FaultyOutput] = {}

    def acquire(self, domid: int, devid: int, connector: Any, guest: str | None = None) -> Any:
        output = self._inner.acquire(domid, devid, connector, guest)
        if output is None:
            return None
        wrapped = _FaultyOutput(output, self._faults)
        self._wrapped[id(wrapped)] = wrapped
        return wrapped

    def release(self, output: Any) -> None:
        self._wrapped.pop(id(output), None)
        inner = output._inner if isinstance(output, _FaultyOutput) else output
        self._inner.release(inner)


def inject(machine: SimMachine, faults: Faults) -> None:
    """Make devices the daemon creates from now on use faulty platform calls and outputs."""
    backend = machine.backend
    backend.platform = FaultyPlatform(backend.platform, faults)  # type: ignore[assignment]
    backend.outputs = FaultyOutputs(backend.outputs, faults)  # type: ignore[assignment]
