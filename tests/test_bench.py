"""The benchmark's pieces still run end to end, at tiny sizes (no timing is asserted: only
that every measurement pairs, counts and reports what it claims to)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import bench.__main__ as bench_main
from bench import buffers, flipcost, flips, kmsflip, memory
from bench.report import GOALS, Goal, Metric, Report, Target, percentile

TINY = (64, 48)


async def test_round_trip_pairs_every_guest_flip_with_the_backends_display_flip(
    tmp_path: Path,
) -> None:
    result = await flips.flip_round_trip(tmp_path, flips=20, size=TINY, warmup=2)
    assert result["flips"] == 20
    assert result["not_done"] == 0
    # Per flip, round trip = overhead + display wait exactly, so the same holds for means.
    rt, over, wait = result["round_trip"], result["overhead"], result["display_wait"]
    assert rt["mean_ms"] == pytest.approx(over["mean_ms"] + wait["mean_ms"])
    assert 0 < over["p50_ms"] <= rt["max_ms"]


async def test_echo_round_trip_times_every_round(tmp_path: Path) -> None:
    result = await flips.echo_round_trip(tmp_path, rounds=30, warmup=3)
    assert result["rounds"] == 30
    echo = result["echo"]
    assert 0 < echo["p50_ms"] <= echo["p99_ms"] <= echo["max_ms"]


@pytest.mark.parametrize("copy", [False, True], ids=["zero-copy", "copy"])
async def test_cpu_per_flip_measures_flips_of_the_intended_buffer_kind(
    tmp_path: Path, copy: bool
) -> None:
    result = await flips.cpu_per_flip(
        tmp_path, size=TINY, copy=copy, seconds=0.3, warmup=0.1, idle_seconds=0.1
    )
    assert result["flips"] > 0
    assert result["buffers"] == ({"zero_copy": 0, "copy": 2} if copy
                                 else {"zero_copy": 2, "copy": 0})
    assert result["cpu_per_flip_us"] > 0
    assert result["percent_of_core_per_60fps"] == pytest.approx(
        result["cpu_per_flip_us"] * 60 / 1e4)


@pytest.mark.parametrize("copy", [False, True], ids=["zero-copy", "copy"])
async def test_dbuf_create_time_creates_and_destroys_through_the_buffer_store(
    tmp_path: Path, copy: bool
) -> None:
    result = await buffers.dbuf_create_time(tmp_path, copy=copy, runs=2, width=600, height=20)
    assert result["kind"] == ("copy" if copy else "zero-copy")
    assert (result["pages"], result["directory_pages"]) == (12, 1)
    assert len(result["create_s"]["samples"]) == 2
    assert len(result["bare_map_s"]["samples"]) == 2
    assert result["create_over_map"] == pytest.approx(
        result["create_s"]["p50"] / result["bare_map_s"]["p50"])


async def test_copy_bandwidth_copies_through_present_on_and_copy_frame(tmp_path: Path) -> None:
    memcpy = buffers.memcpy_bandwidth(1 << 16, repeats=2, targets=2)
    assert memcpy["baseline_bps"] > 0 and memcpy["targets"] == 2
    result = await buffers.copy_bandwidth(tmp_path, [TINY], repeats=2)
    assert result["64x48"]["bytes"] == 64 * 48 * 4
    assert result["64x48"]["percent_of_same_size_memcpy"] > 0
    odd = buffers.copy_frame_bandwidth(30, 10, repeats=2)
    assert (odd["guest_pitch"], odd["dumb_pitch"]) == (120, 128)


async def test_copy_scaling_copies_with_one_thread_and_with_several_in_turn(
    tmp_path: Path,
) -> None:
    result = await buffers.copy_scaling(tmp_path, size=TINY, guests=2, workers=2,
                                        window=0.1, rounds=2)
    one, many = result["one_worker"], result["all_workers"]
    assert [r["workers"] for r in one + many] == [1, 1, 2, 2]
    assert all(r["frames"] > 0 for r in one + many)
    # One thread: one copy at a time, and one next in its line.
    assert max(r["most_running"] for r in one) <= 2
    assert result["ratio"] == pytest.approx(percentile(result["ratios"], 50))


@pytest.mark.parametrize("copy", [False, True], ids=["zero-copy", "copy"])
async def test_capacity_steps_up_and_accounts_the_backend_and_the_guests_apart(
    tmp_path: Path, copy: bool
) -> None:
    result = await flips.capacity(tmp_path, copy=copy, max_connectors=4, stride=2, size=TINY,
                                  window=0.3, settle=0.2, guests_per_process=2)
    first = result["steps"][0]
    assert (first["guests"], first["connectors"]) == (1, 2)
    assert result["mode"] == ("copy" if copy else "zero-copy")
    assert result["vblank_phases"] == flips.CAPACITY_PHASES
    # Whether a step passed depends on the machine's load; what follows from it does not.
    passing = [step["connectors"] for step in result["steps"] if step["passed"]]
    assert result["largest_passing_connectors"] == max(passing, default=0)
    assert result["cap_reached"] == (result["largest_passing_connectors"] == 4)
    for step in result["steps"]:
        assert step["failed_flips"] == 0
        assert step["backend_percent_of_core"] > 0 and step["guests_percent_of_core"] >= 0


@pytest.mark.parametrize(("limit", "tries"), [
    (0, [4, 2, 1]), (3, [4, 2, 3]), (4, [4, 8, 6, 5]), (5, [4, 8, 6, 5]), (10, [4, 8, 10]),
    (9, [4, 8, 10, 9]),
])
async def test_largest_passing_steps_up_then_bisects(limit: int, tries: list[int]) -> None:
    measured: list[int] = []

    async def passes(n: int) -> bool:
        measured.append(n)
        return n <= limit

    assert await flips.largest_passing(passes, 10, 4) == limit
    assert measured == tries


async def test_guests_share_a_process_when_asked(tmp_path: Path) -> None:
    from bench.machine import bench_machine, connector_spec
    from displback.display.virtual import OutputConfig

    outputs = [OutputConfig(f"o{d}", *TINY) for d in (1, 2, 3)]
    assignments = {f"{d}/0/0": f"o{d}" for d in (1, 2, 3)}
    async with bench_machine(tmp_path, outputs, assignments=assignments) as machine:
        guests = await machine.start_guests([1, 2, 3], connector_spec([TINY]), per_process=2)
        assert guests[0].pid == guests[1].pid != guests[2].pid
        for guest in guests:
            await guest.flip(3)
        await machine.stop_guest(1)  # its process goes on for guest 2
        assert [log.flips for log in await guests[1].flip(2)] == [2]


async def test_memory_footprint_separates_no_guest_per_guest_and_per_connector(
    tmp_path: Path,
) -> None:
    result = await memory.footprint(tmp_path, guests=1, connectors=2, size=TINY, settle=0.1,
                                    trace=True)
    assert result["rss_no_guest_bytes"] > 0
    assert result["rss_no_guest_bytes"] == pytest.approx(memory.rss_without_shmem(), rel=0.9)
    assert result["per_connector_bytes"] == (
        result["rss_guests_n_connectors_bytes"] - result["rss_guests_1_connector_bytes"])
    assert result["per_guest_bytes"] == (
        result["rss_guests_1_connector_bytes"] - result["per_connector_bytes"])
    # Every guest and connector holds Python objects: the traced heap grew with each.
    assert result["heap_per_connector_bytes"] > 0
    assert result["heap_guests_1_connector_bytes"] > result["heap_per_connector_bytes"]


async def test_memory_footprint_in_a_child_leaves_this_process_out(tmp_path: Path) -> None:
    result = await memory.footprint_in_child(tmp_path, guests=1)
    assert result["guests"] == 1 and result["traced"] is False
    assert result["rss_no_guest_bytes"] > 0


def test_soak_samples_the_daemons_memory_while_guests_flip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keep pytest's logging.
    monkeypatch.setattr("displback.app.logs.configure_logging", lambda level: None)
    path = tmp_path / "soak.json"
    memory.main(["--soak", "1", "--interval", "0.25", "--guests", "2", "--json", str(path)])
    result = json.loads(path.read_text())
    assert len(result["samples"]) >= 4 and result["flips"] > 0 and result["failed_flips"] == 0
    assert result["mode"] == "copy" and result["tolerance_mib"] == memory.GROWTH_TOLERANCE_MIB
    assert result["passed"] == (result["growth_mib"] <= memory.GROWTH_TOLERANCE_MIB)
    assert "growth after warm-up" in capsys.readouterr().out


async def test_fairness_measures_the_honest_guest_alone_and_beside_the_hostile_one(
    tmp_path: Path,
) -> None:
    result = await flips.fairness(tmp_path, honest_size=TINY, hostile_size=(128, 96),
                                  hostile_connectors=2, window=0.3, warmup=0.1)
    alone, beside = result["alone"], result["beside_hostile"]
    assert alone["flips"] > 0 and beside["flips"] > 0
    assert alone["not_done"] == beside["not_done"] == 0
    assert result["hostile_frames_per_s"] > 0
    assert result["fps_ratio"] == pytest.approx(beside["fps"] / alone["fps"])
    # The copy workers' fair share, made visible: both guests' copies were timed, and no
    # guest ever ran two at once.
    workers = result["copy_workers"]
    assert set(workers["wait_by_domid"]) == {"1", "2"}
    assert workers["most_running_per_guest"] == 1


@pytest.mark.parametrize("copy", [True, False])
async def test_fairness_with_a_churning_hostile_guest_measures_both(
    tmp_path: Path, copy: bool
) -> None:
    result = await flips.fairness(tmp_path, honest_size=TINY, hostile_size=(128, 96),
                                  hostile_connectors=1, window=0.3, warmup=0.1,
                                  hostile_mode="churn", copy=copy)
    assert result["alone"]["flips"] > 0 and result["beside_hostile"]["flips"] > 0
    assert result["hostile_mode"] == "churn" and result["copy"] is copy
    assert result["hostile_frames_per_s"] > 0  # its buffers were shown


@pytest.mark.parametrize("copy", [False, True], ids=["zero-copy", "copy"])
async def test_flip_cost_counts_the_backends_loop_passes_and_task_steps_per_flip(
    tmp_path: Path, copy: bool
) -> None:
    result = await flipcost.flip_cost(
        tmp_path, size=TINY, copy=copy, refresh_hz=60.0, flips=10, warmup=2
    )
    window = result["count_window"]
    assert window["flips"] >= 10
    # At least the request's wake-up and the display's; every step is some task's.
    assert window["loop_passes"] >= 2 and window["blocking_waits"] >= 1
    assert window["task_steps"] == pytest.approx(sum(window["steps_by_task"].values()))
    assert "_VblankClock.run" in window["steps_by_task"]
    assert "instruction_window" not in result  # only under callgrind


@pytest.mark.parametrize("card", ["vkms", "bochs"])
async def test_kms_flip_cost_counts_the_display_tasks_and_calls_per_flip(card: str) -> None:
    result = await kmsflip.kms_flip_cost(card=card, flips=5, warmup=2, top=3)
    assert (result["card"], result["flips"], result["flip_timeouts"]) == (card, 5, 0)
    # One commit or page flip and one event read per flip, on the fake card.
    assert result["ioctls"] == 1 and result["card_fd_reads"] == 1
    assert result["task_steps"] == pytest.approx(sum(result["steps_by_task"].values()))
    assert result["steps_by_task"]["KmsDisplay._read_events"] == 1
    assert result["python_calls"] > 0 and len(result["most_called"]) == 3


def test_callgrind_total_reads_the_largest_total_of_a_dump(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.out.1"
    dump.write_text("version: 1\ncreator: callgrind-3.19.0\nsummary: 0\n"
                    "fn=(1) main\n5 100\ntotals: 123456\n")
    assert flipcost.callgrind_total(dump) == 123456


async def test_trio_wakeup_cost_counts_its_wakeups() -> None:
    result = await flips.trio_wakeup_cost(seconds=0.1, rate=100.0)
    assert result["wakeups"] == 10


async def test_trio_two_wakeups_cost_is_woken_by_its_timer_and_the_other_process() -> None:
    start = trio.current_time()
    result = await flips.trio_two_wakeups_cost(seconds=0.1, rate=100.0, gap=0.002)
    assert result["ticks"] == 9  # the first, warming up, not counted
    # Every tick waited for the other process's byte, written 2 ms after it: no sooner.
    assert trio.current_time() - start >= 0.2 + 0.1 + 0.002
    assert result["cpu_per_tick_us"] > 0 and result["gap_ms"] == 2.0


def test_report_judges_targets_and_writes_json(tmp_path: Path) -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    report = Report("test")
    report.add(Metric("a", "low enough", 0.2, "ms", Target("<=", 0.3)))
    report.add(Metric("b", "too low", 50.0, "%", Target(">=", 70.0)))
    report.add(Metric("c", "info", float("nan"), "ms"))
    assert [m.status for m in report.metrics] == ["PASS", "MISS", ""]
    table = report.table()
    assert "≤ 0.3 ms" in table and "MISS" in table and "n/a" in table
    assert report.summary() == "1/2 targets met; missed: b"
    path = tmp_path / "r.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert data["machine"]["cpus"] >= 1 and data["machine"]["python"]
    assert [m["status"] for m in data["metrics"]] == ["PASS", "MISS", None]
    assert data["metrics"][2]["value"] is None


def test_goal_table_lists_every_issue_12_goal_with_its_rows_and_verdicts(tmp_path: Path) -> None:
    report = Report("test")
    report.add_goal(Goal(5, "connectors, zero-copy", 40, "", Target(">=", 32)))
    report.add_goal(Goal(5, "connectors, copy", 20, "", Target(">=", 32)))
    report.add_goal(Goal(6, "RSS with no guest", 50.5, "MiB"))
    table = report.goal_table()
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:2 + len(GOALS) + 1]] == [
        "1", "2", "3", "4", "5", "connectors,", "6", "7"]
    assert "not measured" in lines[2] and "PASS" in lines[6] and "MISS" in lines[7]
    assert "50.5 MiB" in lines[8] and "PASS" not in lines[8] and "MISS" not in lines[8]
    assert "goal rows: 1/2 PASS; missed: 5 (connectors, copy)" in report.summary()
    path = tmp_path / "r.json"
    report.write_json(path)
    goals = json.loads(path.read_text())["goals"]
    assert [(g["number"], g["status"]) for g in goals] == [
        (5, "PASS"), (5, "MISS"), (6, None), (1, "not measured"), (2, "not measured"),
        (3, "not measured"), (4, "not measured"), (7, "not measured")]
    with pytest.raises(ValueError):
        Goal(8, "no such goal", 1.0)


def test_main_runs_a_part_and_writes_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_main, "configure_logging", lambda level: None)  # keep pytest's
    path = tmp_path / "bench.json"
    assert bench_main.main(["--quick", "--only", "copy", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "copy-mode bandwidth 1920x1080" in out and "targets met" in out
    assert "5     capacity" in out and "not measured" in out  # the goal table, unmeasured
    results = json.loads(path.read_text())
    keys = {m["key"] for m in results["metrics"]}
    assert {"memcpy_numpy_gbps", "copy_1920x1080_percent"} <= keys
    # The copy part measures goal 4: its row is in the goal table, judged.
    goal4 = [g for g in results["goals"] if g["number"] == 4]
    assert len(goal4) == 1 and goal4[0]["status"] in {"PASS", "MISS"}
    assert goal4[0]["value"] > 0
