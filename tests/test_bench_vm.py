"""bench-vm's pieces that run without the VM: the sampler, the per-flip arithmetic, the
displ_be build's checks (``make bench-vm`` itself boots the nested Xen; docs/benchmarks.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.displ_be import BuildError, DisplBe, cache_dir
from bench.vm import result_of
from bench.vm_sampler import watch


def test_cpu_per_flip_is_the_backend_cpu_rate_over_the_guest_flip_rate() -> None:
    raw = {
        "start": {"t": 10.0, "user_s": 1.0, "sys_s": 0.5, "dom0_busy_s": 3.0,
                  "threads": {"1 python": 1.0}},
        "end": {"t": 20.0, "user_s": 3.0, "sys_s": 1.5, "dom0_busy_s": 8.0,
                "threads": {"1 python": 3.5, "2 Trio thread": 0.5}},
        "flips": 100, "failed": 0, "guest_ns": 5_000_000_000,
    }  # fmt: skip
    run = result_of("displback-kms", "g", raw, profiled=False)
    assert run.fps == pytest.approx(20.0)
    # 3 s of backend CPU over a 10 s window = 30 % of a CPU, at 20 flips/s: 15 ms per flip.
    assert run.cpu_ms_per_flip == pytest.approx(15.0)
    assert run.user_ms_per_flip == pytest.approx(10.0)
    assert run.dom0_busy_ms_per_flip == pytest.approx(25.0)
    assert run.threads_ms_per_flip == {"1 python": 12.5, "2 Trio thread": 2.5}
    assert not run.error


def test_a_failed_guest_run_is_an_error_not_a_number() -> None:
    run = result_of("displ_be", "g", {"error": "DRMTEST FAIL SETCRTC"}, profiled=False)
    assert run.error == "DRMTEST FAIL SETCRTC"
    assert run.fps != run.fps  # NaN


def test_sampler_measures_between_the_guest_start_and_end_lines(tmp_path: Path) -> None:
    console = tmp_path / "guest.log"
    console.write_text(
        "DRMTEST SETCRTC 0 ok\nDRMTEST BENCH START 0\n"
        "DRMTEST BENCH 0 flips=950 ns=12500000000 failed=1\n"
    )
    result = watch(console, os.getpid(), profile=False, timeout=10)
    assert (result["flips"], result["guest_ns"], result["failed"]) == (950, 12_500_000_000, 1)
    assert result["end"]["t"] >= result["start"]["t"]
    assert result["end"]["user_s"] >= result["start"]["user_s"]
    assert all(name.split()[0].isdigit() for name in result["start"]["threads"])
    assert result["start"]["threads"]


def test_sampler_reports_the_guest_failure(tmp_path: Path) -> None:
    console = tmp_path / "guest.log"
    console.write_text("DRMTEST FAIL no card of that driver errno=2 (x)\n")
    result = watch(console, os.getpid(), profile=False, timeout=10)
    assert result["error"].startswith("DRMTEST FAIL no card")


def test_sampler_gives_up_when_the_window_never_comes(tmp_path: Path) -> None:
    result = watch(tmp_path / "absent.log", os.getpid(), profile=False, timeout=0.3)
    assert "no timed window" in result["error"]


def test_a_displ_be_prefix_without_the_binary_or_libxenbe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no bin/displ_be"):
        DisplBe.at(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "displ_be").write_text("")
    with pytest.raises(BuildError, match="libxenbe"):
        DisplBe.at(tmp_path / "bin" / "displ_be")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libxenbe.so").write_text("")
    assert DisplBe.at(tmp_path / "bin" / "displ_be").prefix == tmp_path


def test_the_build_lives_in_the_cache_not_the_checkout() -> None:
    assert "/.cache/displback/displ_be-" in str(cache_dir()) or os.environ.get("XDG_CACHE_HOME")
    assert not str(cache_dir()).startswith(str(Path(__file__).resolve().parents[1]))


def test_the_profiled_daemon_runs_displback_run_main() -> None:
    from bench import vm_daemon
    from displback.app.run import main

    assert vm_daemon.run_main is main
