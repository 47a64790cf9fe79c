"""A real compositor for the Wayland tests and the pacing bench: weston, headless.

Debian 12's weston 10 runs with ``--backend=headless-backend.so --use-pixman`` (without the
pixman renderer the headless output renders nothing and screenshots are empty) and
``--debug``, which lets any client (``weston-screenshooter``) take screenshots through
weston's own ``weston_screenshooter`` protocol. Its headless output announces 60 Hz but
finishes a frame 16 ms after repainting it and repaints the next one "repaint window"
before the following vblank: with the default 7 ms window a frame takes ~26 ms (38 a
second); ``repaint-window=16`` (weston.ini) makes it 16.7 ms, the announced 60 Hz. The headless
backend has no input devices, so no ``wl_seat``: input cannot be injected here (weston's
test protocol is not in Debian's build), and the seat routing is tested without weston.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

WESTON = shutil.which("weston")
SCREENSHOOTER = shutil.which("weston-screenshooter")
#: What weston's desktop shell paints where no window is (weston.ini below).
BACKGROUND = (0x20, 0x20, 0x20)

_INI = """\
[core]
repaint-window=16
idle-time={idle_time}
[shell]
panel-position=none
background-color=0xff202020
locking=false
animation=none
startup-animation=none
"""


@dataclass
class Weston:
    """A running weston: its socket (absolute path), runtime dir and process."""

    runtime_dir: Path
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def socket(self) -> str:
        return str(self.runtime_dir / self.name)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "WAYLAND_DISPLAY": self.name,
        }

    def screenshot(self, directory: Path) -> Path:
        """A PNG of the whole output, taken by weston itself (``weston-screenshooter``)."""
        assert SCREENSHOOTER is not None
        directory.mkdir(parents=True, exist_ok=True)
        before = set(directory.glob("wayland-screenshot-*.png"))
        subprocess.run([SCREENSHOOTER], cwd=directory, env=self.env, check=True, timeout=20)
        made = sorted(set(directory.glob("wayland-screenshot-*.png")) - before)
        assert made, "weston-screenshooter wrote no PNG"
        return made[-1]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_weston(
    runtime_dir: Path,
    *,
    name: str = "displback-test",
    width: int = 1280,
    height: int = 720,
    idle_time: int = 0,
) -> Weston:
    """Start weston headless on ``runtime_dir/name`` and wait until its shell has drawn;
    ``idle_time`` seconds without input put its output to sleep (0: never)."""
    assert WESTON is not None
    runtime_dir.mkdir(parents=True, exist_ok=True)
    runtime_dir.chmod(0o700)
    ini = runtime_dir / "weston.ini"
    ini.write_text(_INI.format(idle_time=idle_time))
    log = runtime_dir / f"{name}.log"
    process = subprocess.Popen(
        [
            WESTON,
            "--backend=headless-backend.so",
            "--use-pixman",
            "--debug",
            f"--config={ini}",
            f"--socket={name}",
            f"--width={width}",
            f"--height={height}",
        ],
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    weston = Weston(runtime_dir, name, process, log)
    deadline = time.monotonic() + 20
    while not (runtime_dir / f"{name}.lock").exists() or not (runtime_dir / name).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            weston.stop()
            raise RuntimeError(f"weston did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    # The shell's background client starts after the socket; until it has drawn, weston
    # shows white. Screenshots are what the tests check, so wait for the background there.
    while True:
        with tempfile.TemporaryDirectory(dir=runtime_dir) as shots:
            corner = load_rgb(weston.screenshot(Path(shots)))[0, 0]
        if tuple(int(c) for c in corner) == BACKGROUND:
            return weston
        if time.monotonic() > deadline:
            weston.stop()
            raise RuntimeError(f"weston's shell drew no background: {corner}")
        time.sleep(0.1)


@contextmanager
def running_weston(**options: int | str) -> Iterator[Weston]:
    """weston in a fresh runtime directory (short: socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="dbwl-") as tmp:
        weston = start_weston(Path(tmp), **options)  # type: ignore[arg-type]
        try:
            yield weston
        finally:
            weston.stop()


RgbArray = npt.NDArray[np.uint8]


def load_rgb(path: Path) -> RgbArray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def find_windows(shot: RgbArray) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) of every rectangle of non-background pixels whose top-left
    corner has background to its left and above (a window without decorations)."""
    mask = np.any(shot != np.array(BACKGROUND, np.uint8), axis=2)
    found = []
    padded = np.pad(mask, ((1, 0), (1, 0)))
    corners = mask & ~padded[:-1, 1:] & ~padded[1:, :-1]
    for y, x in zip(*np.nonzero(corners), strict=True):
        row, col = mask[y, x:], mask[y:, x]
        width = int(np.argmin(row)) if not row.all() else len(row)
        height = int(np.argmin(col)) if not col.all() else len(col)
        found.append((int(x), int(y), width, height))
    return found
