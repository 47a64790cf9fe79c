"""``display = "wayland"`` in the configuration: its keys checked with their lines, `[assign]`
naming compositor outputs (which only the compositor knows), and a clear refusal when the
``wayland`` extra is missing — from ``check-config`` and from ``run`` alike."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from displback.app import run
from displback.app.cli import main
from displback.app.run import RunConfig, StartupError, config_problems, serve


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "displback.toml"
    path.write_text(text)
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check-config", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


WAYLAND = """\
display = "wayland"
wayland_display = "/run/user/1000/wayland-0"
wayland_refresh_hz = 50
[assign]
"1/0/0" = "HDMI-A-1"
"""


def test_a_wayland_configuration_is_accepted_with_compositor_outputs_in_assign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pywayland", reason="the wayland extra (pywayland) is not installed")
    code, output = check(write(tmp_path, WAYLAND), capsys)
    assert (code, output.strip()) == (0, f"{tmp_path / 'displback.toml'}: OK")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('wayland_display = "run/wayland-0"', "a name without '/' or an absolute path"),
        ('wayland_display = ""', 'must be a socket name ("wayland-0") or an absolute path'),
        ("wayland_refresh_hz = 0", "must be a refresh rate from 1 to 1000 Hz, not 0"),
    ],
)
def test_bad_wayland_values_are_named_with_their_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    code, output = check(write(tmp_path, f'display = "wayland"\n{line}\n'), capsys)
    assert code == 1
    assert message in output
    assert "displback.toml:2: " in output


def _without_pywayland(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "pywayland" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(run.importlib.util, "find_spec", find_spec)


def test_without_the_wayland_extra_check_config_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_pywayland(monkeypatch)
    code, output = check(write(tmp_path, WAYLAND), capsys)
    assert code == 1
    assert 'display: display "wayland" needs pywayland' in output
    assert 'pip install "displback[wayland]"' in output


async def test_without_the_wayland_extra_run_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_pywayland(monkeypatch)
    assert [key for key, _ in config_problems(RunConfig(display="wayland"))] == [("display",)]
    with pytest.raises(StartupError, match="the wayland extra"):
        await serve(RunConfig(display="wayland"))
