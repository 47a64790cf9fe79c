"""``displback check-config``: every mistake of a file at once, each with its key and line;
``run`` refuses to start with the same list; ``--show`` prints what is in effect."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from displback.app.cli import build_parser, main
from displback.app.config import DEFAULT_CONFIG, KEYS, read_config
from displback.app.run import RunConfig
from displback.backend.quotas import DOM0_GRANT_KEY, LIMIT_NAMES

REPO = Path(__file__).resolve().parents[2]
FIVE = REPO / "tests" / "fixtures" / "five-mistakes.toml"
EXAMPLE = REPO / "config" / "displback.toml"
OPERATIONS = REPO / "docs" / "operations.md"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "displback.toml"
    path.write_text(text)
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str]:
    code = main(["check-config", *options, str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def located(output: str) -> set[tuple[int, str]]:
    """(line, key) of every ``FILE:LINE: KEY: message`` line."""
    return {(int(m[1]), m[2]) for m in re.finditer(r"^\S+?:(\d+): (\S+): ", output, re.M)}


def test_five_mistakes_are_all_named_with_their_lines(capsys: pytest.CaptureFixture[str]) -> None:
    code, output = check(FIVE, capsys)
    assert code == 1
    assert located(output) == {
        (4, "zero_copy"),
        (5, "wait_free_ms"),
        (6, "log_levle"),
        (9, 'assign."1/0/0"'),
        (15, "limits.guest.web-vm.requests_per_second"),
    }
    assert "did you mean 'log_level'?" in output
    assert output.rstrip().endswith("5 errors")


def test_the_operations_guide_shows_the_five_mistakes_and_the_real_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, output = check(FIVE, capsys)
    guide = OPERATIONS.read_text()
    assert FIVE.read_text() in guide
    assert output.replace(str(FIVE), str(DEFAULT_CONFIG)) in guide


def test_run_refuses_to_start_listing_every_mistake(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(FIVE)]) == 1
    err = capsys.readouterr().err
    for line in (4, 5, 6, 9, 15):
        assert f"{FIVE}:{line}: " in err
    assert "cannot start" in err


def test_a_valid_file_is_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert check(EXAMPLE, capsys) == (0, f"{EXAMPLE}: OK\n")


def test_without_a_file_the_installed_one_is_checked() -> None:
    args = build_parser().parse_args(["check-config"])
    assert args.file == DEFAULT_CONFIG == Path("/etc/displback/displback.toml")


def test_a_syntax_error_is_one_problem_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "display = 'kms'\n\nconnectors = [\"A\"\nzero_copy = 'off'\n")
    code, output = check(path, capsys)
    assert code == 1 and f"{path}:4: not valid TOML" in output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A wrong list is one mistake, not also "display 'virtual' needs an output".
        ("virtual_outputs = ['A=640x480', 'B=5000x3000']", [(1, "virtual_outputs[1]")]),
        # An element of a multi-line list is found on its own line.
        ("virtual_outputs = [\n  'A=640x480',\n  'A=800x600',\n]", [(3, "virtual_outputs[1]")]),
        (
            "display = 'kms'\nconnectors = ['HDMI-A-1']\n[limits]\nmax_bufers = 4\n"
            "[limits.guest.40000]\nmax_buffers = 4\n[limits.guest.vm]\nmax_buffers = 0\n"
            "max_pages_per_buffer = 900\nmax_total_pages = 800\n",
            [
                (4, "limits.max_bufers"),
                (5, "limits.guest.40000"),
                (8, "limits.guest.vm.max_buffers"),
                (9, "limits.guest.vm.max_pages_per_buffer"),
            ],
        ),
        # The daemon-wide grant budget: an integer ≥ 1, in [limits] only.
        (
            "display = 'kms'\nconnectors = ['HDMI-A-1']\n[limits]\ndom0_grant_entries = 0\n"
            "[limits.guest.vm]\ndom0_grant_entries = 100\n",
            [(4, "limits.dom0_grant_entries"), (6, "limits.guest.vm.dom0_grant_entries")],
        ),
    ],
    ids=["no-cascade", "multi-line-list", "limits", "dom0-grant-entries"],
)
def test_each_mistake_is_named_once_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: list[tuple[int, str]]
) -> None:
    code, output = check(write(tmp_path, text), capsys)
    assert code == 1
    assert located(output) == set(expected)
    assert output.rstrip().endswith(f"{len(expected)} error{'s' if len(expected) > 1 else ''}")


def test_a_missing_key_is_named_as_not_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = check(write(tmp_path, "# nothing\n"), capsys)
    assert code == 1
    assert 'virtual_outputs (not set): display "virtual" needs at least one output' in output


def test_a_command_line_value_is_named_by_its_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "virtual_outputs = ['A=640x480']\n")
    assert main(["run", "--config", str(path), "--assign", "1/0/0=B"]) == 1
    assert "--assign (command line): names output 'B'" in capsys.readouterr().err


def test_show_prints_the_effective_settings_as_toml_the_check_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        "display = 'virtual'\nvirtual_outputs = ['A=640x480', 'B=800x600@30']\n"
        "[assign]\n'1/0/0' = 'B'\n[limits]\nmax_buffers = 20\n"
        "dom0_grant_entries = 9000\n"
        "[limits.guest.7]\nrequests_per_second = 100\n[limits.guest.'my vm']\nmax_deferred = 2\n",
    )
    code, shown = check(path, capsys, "--show")
    assert code == 0
    assert "wait_free_ms = 2000" in shown  # a default, filled in
    assert 'virtual_outputs = ["A=640x480@60", "B=800x600@30"]' in shown
    again = tmp_path / "shown.toml"
    again.write_text(shown)
    assert check(again, capsys, "--show") == (0, shown)
    settings = read_config(again).settings
    assert settings["limits"].by_name == {"my vm": {"max_deferred": 2}}
    assert settings["limits"].by_domid == {7: {"requests_per_second": 100}}
    assert settings["limits"].dom0_grant_entries == 9000
    assert settings["limits"].common == {"max_buffers": 20}


def _uncommented(text: str) -> str:
    """The example with every commented-out setting and table header switched on."""
    return re.sub(r"^#(\[|[a-z0-9_]+ = )", r"\1", text, flags=re.M)


def test_the_example_documents_every_key_and_accepts_each(tmp_path: Path) -> None:
    config = read_config(write(tmp_path, _uncommented(EXAMPLE.read_text())))
    assert config.problems == []
    assert set(config.data) == set(KEYS)
    assert set(config.data["limits"]) == {*LIMIT_NAMES, "guest", DOM0_GRANT_KEY}


def test_the_operations_guide_documents_every_key() -> None:
    section = OPERATIONS.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for key in (*KEYS, *LIMIT_NAMES, DOM0_GRANT_KEY):
        assert f"`{key}`" in section, key


def test_every_setting_of_run_is_a_key_with_the_same_choices() -> None:
    # A new RunConfig field or option choice must be accepted (and checked) in the file too.
    assert {f.name for f in fields(RunConfig)} == set(KEYS)
    args = build_parser().parse_args(["run"])
    for action in args.run_parser._actions:
        if action.choices is None:
            continue
        accepted = [c for c in action.choices if not _problems_of(action.dest, c)]
        assert accepted == list(action.choices), action.dest
        assert _problems_of(action.dest, "no-such-choice"), action.dest


def _problems_of(key: str, value: Any) -> list[Any]:
    return list(KEYS[key](value))
