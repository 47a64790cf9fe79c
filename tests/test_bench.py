"""The benchmark's pieces still run end to end, at tiny sizes (no timing is asserted: only
that every measurement pairs, counts and reports what it claims to)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench import buffers, flips
from bench.report import Metric, Report, Target, percentile

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
    assert max(r["most_running"] for r in one) == 1  # one thread: never two copies at once
    assert result["ratio"] == pytest.approx(percentile(result["ratios"], 50))


async def test_capacity_measures_one_step_per_guest_added(tmp_path: Path) -> None:
    result = await flips.capacity(tmp_path, max_guests=1, size=TINY, window=0.3, settle=0.2)
    (step,) = result["steps"]
    assert (step["guests"], step["connectors"]) == (1, 2)
    assert result["largest_passing_connectors"] in (0, 2)
    assert step["failed_flips"] == 0


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


async def test_trio_wakeup_cost_counts_its_wakeups() -> None:
    result = await flips.trio_wakeup_cost(seconds=0.1, rate=100.0)
    assert result["wakeups"] == 10


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


def test_main_runs_a_part_and_writes_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_main, "configure_logging", lambda level: None)  # keep pytest's
    path = tmp_path / "bench.json"
    assert bench_main.main(["--quick", "--only", "copy", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "copy-mode bandwidth 1920x1080" in out and "targets met" in out
    keys = {m["key"] for m in json.loads(path.read_text())["metrics"]}
    assert {"memcpy_numpy_gbps", "copy_1920x1080_percent"} <= keys
