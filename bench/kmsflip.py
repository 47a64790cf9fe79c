"""``python -m bench.kmsflip``: what one flip costs the KMS output, in counts, not seconds.

``bench.flipcost`` counts a whole backend flipping on the virtual display; this counts the
KMS output's share of a flip alone, on the fake card of the KMS tests (``tests/kms/fake.py``:
an atomic vkms or a legacy bochs kernel answering the ioctls in this process). A driver task
starts each flip with ``Output.start_flip``, as the connector does, waits for its landing
callback and starts the next. Per flip it counts trio's run-loop passes and the task steps of
the display's tasks (the driver's own are left out, as the connector's wake-up pays them
anyway), the ioctls and card fd reads, and the Python calls (cProfile; the profiler is paused
inside the fake kernel's ioctls, which a real kernel does in C). Counts do not move with the
machine's load; under emulation (the nested VM) each of them costs far more than natively.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from bench.flipcost import FlipCounter
from displback.display.interface import FlipResult
from displback.kms.display import KmsDisplay, KmsOutputConfig
from displback.kms.output import KmsOutput
from displback.protocol.constants import PixelFormat
from tests.kms.fake import FakeCard, bochs_card, vkms_card

__all__ = ["kms_flip_cost"]

CARDS: dict[str, Callable[[], FakeCard]] = {"vkms": vkms_card, "bochs": bochs_card}


async def _flip(output: KmsOutput, fbs: list[Any], count: int) -> None:
    """``count`` flips, alternating between ``fbs``, each started once the last landed."""
    for n in range(count):
        landed = trio.Event()

        def on_landed(_result: FlipResult | None, landed: trio.Event = landed) -> None:
            landed.set()

        if not output.start_flip(fbs[n % len(fbs)], on_landed):
            raise RuntimeError(f"{output} declined a flip (a blocking modeset?)")
        await landed.wait()


def _profiled_calls(profiler: cProfile.Profile, flips: int, limit: int) -> dict[str, Any]:
    """Python calls per flip in all, and the functions called most (the pause not counted)."""
    stats = pstats.Stats(profiler)
    rows = [
        (func, calls)
        for func, (_, calls, _, _, _) in stats.stats.items()  # type: ignore[attr-defined]
        if "_lsprof.Profiler" not in func[2] and func[2] != "paused"
    ]
    rows.sort(key=lambda row: row[1], reverse=True)
    top = []
    for (file, line, name), calls in rows[:limit]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        top.append(f"{calls / flips:5.1f}  {name} ({where})")
    return {"python_calls": sum(calls for _, calls in rows) / flips, "most_called": top}


async def kms_flip_cost(
    *, card: str = "vkms", flips: int = 300, warmup: int = 10, top: int = 25
) -> dict[str, Any]:
    """Counts per flip over a window of ``flips`` flips of one 1024x768 output of ``card``."""
    fake = CARDS[card]()
    reads = 0
    try:
        async with KmsDisplay.open(
            [KmsOutputConfig("Virtual-1", 1024, 768)], device=fake.device(), hotplug_poll_s=0
        ) as display:
            output = display.outputs["Virtual-1"]
            fbs = [
                output.create_dumb(width=1024, height=768, fourcc=PixelFormat.XRGB8888)
                for _ in range(2)
            ]
            await output.flip(fbs[1])  # the modeset (a thread, on legacy KMS)
            read_events = display.device.read_events

            def counted_read() -> Any:
                nonlocal reads
                reads += 1
                return read_events()

            display.device.read_events = counted_read  # type: ignore[method-assign]
            await _flip(output, fbs, warmup)
            counter = FlipCounter()  # made in this task: the driver's steps are not counted
            calls, reads = len(fake.calls), 0
            trio.lowlevel.add_instrument(counter)
            await _flip(output, fbs, flips)
            trio.lowlevel.remove_instrument(counter)
            result: dict[str, Any] = {
                "card": card,
                "flips": flips,
                "ioctls": (len(fake.calls) - calls) / flips,
                "card_fd_reads": reads / flips,
                **counter.per_flip(flips),
            }
            profiler = cProfile.Profile()
            real_ioctl = fake.ioctl

            def paused(fd: int, request: int, arg: Any) -> None:
                profiler.disable()
                try:
                    real_ioctl(fd, request, arg)
                finally:
                    profiler.enable()

            fake.ioctl = paused  # type: ignore[method-assign]
            profiler.enable()
            await _flip(output, fbs, flips)
            profiler.disable()
            fake.ioctl = real_ioctl  # type: ignore[method-assign]
            result.update(_profiled_calls(profiler, flips, top))
            result["flip_timeouts"] = output.flip_timeouts
    finally:
        fake.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kmsflip", description=__doc__)
    parser.add_argument("--card", choices=sorted(CARDS), default="vkms",
                        help="vkms: atomic commits; bochs: legacy page flips")
    parser.add_argument("--flips", type=int, default=300, help="flips per window")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--top", type=int, default=25, help="most-called functions shown")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    result = trio.run(lambda: kms_flip_cost(
        card=args.card, flips=args.flips, warmup=args.warmup, top=args.top
    ))
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
