"""The TOML configuration: every key of `displback run`, validated, command line wins."""

from pathlib import Path

import pytest

from displback.app.cli import build_parser
from displback.app.config import ConfigError, apply_config, load_config
from displback.app.run import RunConfig, StartupError, check_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "displback.toml"
    path.write_text(text)
    return path


def test_the_shipped_example_is_a_valid_configuration() -> None:
    settings = load_config(REPO / "config" / "displback.toml")
    assert settings["display"] == "kms"
    assert settings["assign"] == {"1/0/0": "HDMI-A-1", "pilot": "DP-1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("displya = 'kms'", ":1: displya: unknown key (did you mean 'display'?)"),
        ("display = 'x11'", ":1: display: must be 'virtual', 'kms' or 'wayland', not 'x11'"),
        ("wait_free_ms = -1", ":1: wait_free_ms: must be an integer from 1 to 2999"),
        ("wait_free_ms = 3000", ":1: wait_free_ms: must be an integer from 1 to 2999"),
        ("wait_free_ms = true", ":1: wait_free_ms: must be an integer"),
        ("copy_workers = 0", ":1: copy_workers: must be an integer from 1 to 256"),
        ("connectors = 'HDMI-A-1'", ":1: connectors: must be a list"),
        ("[assign]\n'1/0/0' = 3", ':2: assign."1/0/0": must be an output name'),
        ("display = 'kms'\nzero_copy = ", ":2: not valid TOML"),
    ],
)
def test_mistakes_are_refused_naming_the_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_file_values_fill_what_the_command_line_left_at_its_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "display = 'virtual'\nvirtual_outputs = ['A=640x480']\nwait_free_ms = 500\n"
        "zero_copy = 'off'\ncopy_workers = 3\n[assign]\n'1/0/0' = 'A'\n",
    )
    parser = build_parser()
    args = parser.parse_args(["run", "--zero-copy", "require"])
    run_parser = args.run_parser
    merged = apply_config(run_parser, args, load_config(path))
    assert merged.display == "virtual"
    assert [o.name for o in merged.virtual_outputs] == ["A"]
    assert merged.virtual_outputs[0].width == 640
    assert merged.wait_free_ms == 500
    assert merged.copy_workers == 3
    assert merged.zero_copy == "require"  # given on the command line: it wins
    assert merged.assign == {"1/0/0": "A"}


@pytest.mark.parametrize("spec", ["A=5000x3000", "A=4096x2160", "A=4095x4095"])
def test_an_output_resolution_no_guest_could_be_given_is_refused_at_start(
    tmp_path: Path, spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same limit as for the toolstack's resolution nodes
    # (displback.protocol.edid.check_resolution).
    path = write(tmp_path, f"display = 'virtual'\nvirtual_outputs = ['{spec}']\n")
    parser = build_parser()
    with pytest.raises(ConfigError, match=r":2: virtual_outputs\[0\]: .*cannot be described"):
        load_config(path)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--virtual-output", spec])
    assert "cannot be described to a guest" in capsys.readouterr().err
    with pytest.raises(StartupError, match="cannot be described to a guest"):
        check_config(RunConfig(display="kms", connectors=[f"HDMI-A-1={spec[2:]}"]))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[input]]\nguest = 'a'", "input[0]: needs either device"),
        ("[[input]]\ndevice = '/dev/input/event1'\nname = 'x'\nguest = 1", "input[0]: needs"),
        ("[[input]]\ndevice = '/tmp/event1'\nguest = 1", "must be a path under /dev/input/"),
        ("[[input]]\ndevice = '/dev/input/event1'", "input[0]: guest must be a domain name"),
        ("[[input]]\ndevice = '/dev/input/event1'\nguest = 0", "from 1 to 32751, not 0"),
        ("[[input]]\ndevice = '/dev/input/event1'\nguest = 1\ngrap = false",
         "unknown key 'grap' (did you mean 'grab'?)"),
        ("[[input]]\ndevice = '/dev/input/event1'\nguest = 1\nconnector = -1",
         "connector must be an integer from 0 to 65535"),
        ("[[input]]\nname = 'kbd'\nguest = 1\n[[input]]\nname = 'kbd'\nguest = 2",
         "input[1]: name 'kbd' is already assigned by input entry 1"),
        ("input_queue = 10", "input_queue: must be an integer from 64 to 4096"),
        ("input_size = '0x768'", "input_size: '0x768'"),
        ("input_size = 1024", 'input_size: must be "WIDTHxHEIGHT"'),
    ],
)
def test_input_mistakes_are_refused_naming_the_entry(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert message in str(exc.value)


def test_input_entries_and_sizes_reach_the_run_configuration(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "display = 'virtual'\nvirtual_outputs = ['A=640x480']\ninput_queue = 100\n"
        "input_size = '800x600'\n[[input]]\ndevice = '/dev/input/by-id/kbd'\nguest = 'web'\n"
        "[[input]]\nname = 'Touch'\nguest = 4\nconnector = 1\ngrab = false\n",
    )
    args = build_parser().parse_args(["run", "--config", str(path), "--input-queue", "300"])
    from displback.app.run import effective_config

    config = effective_config(args)
    assert config.input_queue == 300 and config.input_size == (800, 600)
    web, touch = config.input
    assert (web.device, web.guest, web.devid, web.connector, web.grab) == (
        "/dev/input/by-id/kbd", "web", 0, 0, True)
    assert (touch.name, touch.guest, touch.connector, touch.grab) == ("Touch", 4, 1, False)
