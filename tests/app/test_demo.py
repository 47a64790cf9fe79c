"""`displback demo` runs the whole simulated system and its PNGs show the guests' patterns."""

import io
from pathlib import Path

import numpy as np
import trio
from PIL import Image

from displback.app.demo import DEMO_GUESTS, run_demo
from displback.sim.guest_pattern import decode_pattern


async def test_demo_flips_on_every_output_and_snapshots_show_each_guests_pattern(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    with trio.fail_after(60):
        rc = await run_demo(seconds=1.5, fps=20, snapshots=tmp_path, out=out, status_interval=0.5)
    report = out.getvalue()
    assert rc == 0, report
    assert "nothing leaked" in report
    for spec in DEMO_GUESTS:
        for index, (width, height) in enumerate(spec.resolutions):
            image = Image.open(tmp_path / f"{spec.output_name(index)}.png")
            assert image.size == (width, height)
            connector, frame = decode_pattern(np.asarray(image.convert("RGB")))
            assert connector == index
            assert frame > 0
