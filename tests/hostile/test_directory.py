"""Page directory corruption (reference §6): chains that loop, end early or run on, refs no
one granted, counts the directory cannot hold, and directories rewritten after the fact.
Each is refused with ``-EINVAL`` before anything stays mapped; the attacker's next honest
buffer works."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from displback.protocol.constants import Op
from displback.protocol.messages import DbufCreateReq
from displback.sim.guest import GuestBuffer, GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import flip_frame, release, show, shown
from tests.hostile.support import Arena, run_attack, set_field

#: 1024×1500×32 bpp: 1500 pages, two directory pages (1023 + 477 refs).
BIG = (1024, 1500, 32)
#: 1024×3000×32 bpp: 3000 pages, three directory pages.
HUGE = (1024, 3000, 32)


async def _refused_then_served(a: Arena, g: SimGuest, shape: tuple[int, int, int] = BIG,
                               expect: int = errno.EINVAL) -> None:
    """DBUF_CREATE of ``shape`` is refused with ``expect``, leaves nothing mapped or
    charged, and the same request without the forgery succeeds."""
    with pytest.raises(GuestRequestError) as exc:
        await g.create_dumb(*shape)
    assert exc.value.errno == expect
    g.hostile.on_directory = None
    g.hostile.set_request_hook(Op.DBUF_CREATE, None)
    assert g.pending_end_access == 0  # the backend kept nothing mapped
    [store] = a.stores(g.domid)
    assert store.stats.buffers == 0 and store.quota.pages == 0
    buf = await g.create_dumb(*shape)
    await g.destroy_dumb(buf)
    assert g.pending_end_access == 0


def _forge(g: SimGuest, page: int, offset: int, value: int | str) -> None:
    """Before the next DBUF_CREATE, overwrite one u32 of its directory page ``page``
    (``"self"``: that page's own gref, ``"first"``: page 0's)."""

    def scribble(buf: GuestBuffer) -> None:
        number = {"self": buf.dir_grefs[page], "first": buf.dir_grefs[0]}.get(str(value))
        g.hostile.scribble_directory(buf, page, offset, struct.pack(
            "<I", int(value) if number is None else number))

    g.hostile.on_directory = scribble


@pytest.mark.parametrize(
    ("shape", "page", "offset", "value"),
    [
        (BIG, 0, 0, "self"),  # page 0 chains to itself
        (HUGE, 2, 0, "first"),  # the last of three pages chains back to the first
        (BIG, 0, 0, 0),  # the chain ends one page early
        (BIG, 1, 0, 12345),  # the last page chains on to a page no one granted
        (BIG, 1, 0, "first"),  # the last page chains on to a granted directory page
        (BIG, 0, 4 + 4 * 500, 0xFFFF_FFF0),  # a buffer page no one granted
        (BIG, 1, 4 + 4 * 3, 0),  # a zero ref among the buffer pages
        (BIG, 1, 4 + 4 * 476, 0),  # the very last ref is zero
    ],
    ids=["self-loop", "three-page-loop", "short-chain", "chain-past-the-end",
         "chain-past-the-end-into-itself", "bad-ref", "zero-ref", "zero-last-ref"],
)
async def test_a_forged_directory_is_refused_and_leaves_nothing_mapped(
    hypervisor: HypervisorThread, tmp_path: Path, shape: tuple[int, int, int], page: int,
    offset: int, value: int | str
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        _forge(g, page, offset, value)
        await _refused_then_served(a, g, shape)

    await run_attack(hypervisor, tmp_path, attack)


@pytest.mark.parametrize(
    ("extra", "expect"),
    [(4096, errno.EINVAL), (1 << 31, errno.EINVAL)],
    ids=["one-page-more", "two-gigabytes"],
)
async def test_a_buffer_size_beyond_its_directory_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path, extra: int, expect: int
) -> None:
    """buffer_sz claims more pages than the directory lists: one page more reads a zero
    ref from the unused tail; 2 GiB more passes every quota."""
    size = BIG[0] * BIG[1] * BIG[2] // 8

    async def attack(a: Arena, g: SimGuest) -> None:
        g.hostile.set_request_hook(
            Op.DBUF_CREATE, set_field(DbufCreateReq, "buffer_sz", size + extra)
        )
        await _refused_then_served(a, g, BIG, expect)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_directory_rewritten_after_create_changes_nothing(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The backend copied the refs at DBUF_CREATE: rewriting the directory later (refs no
    one granted, a looping chain) neither breaks the buffer nor reaches the backend."""

    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, fbs = await show(g, 0, 320, 240, frame=3)
        for buf in bufs:
            g.hostile.scribble_directory(buf, 0, 0, struct.pack("<I", buf.dir_grefs[0]))
            g.hostile.scribble_directory(buf, 0, 4, struct.pack("<I", 0xFFFF_FFF0) * 75)
        for frame in (4, 5, 6):
            await flip_frame(g, 0, bufs[frame % 2], fbs[frame % 2], frame)
            assert shown(a.machine.output("B"), 320, 240) == (0, frame)
        await release(g, 0, bufs, fbs)

    await run_attack(hypervisor, tmp_path, attack)
