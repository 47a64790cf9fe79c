"""Line numbers of TOML keys, found by a structural scan (tomllib has none)."""

from displback.app.tomllines import dotted, key_lines

TEXT = '''\
# [limits] in a comment is no table; max_buffers = 1 is no key
display = "kms"   # a comment with "quotes" and = signs
notes = """
max_buffers = 3
[limits]
"""
connectors = [
  "HDMI-A-1",  # a comment inside an array
  "DP-1=1920x1080",
]
"a.b" = 'dotted in quotes'
site.owner."full name" = "x"

[limits]
max_buffers = 32

[limits.guest]
"web-vm" = { max_buffers = 8, requests_per_second = 5 }

[limits.guest.5]
max_total_pages = 100

[[extra]]
x = 1
[[extra]]
x = 2
'''


def test_every_key_gets_the_line_it_is_written_on() -> None:
    lines = {dotted(path): line for path, line in key_lines(TEXT).items()}
    assert lines["display"] == 2
    assert lines["notes"] == 3
    assert lines["connectors"] == 7
    assert lines["connectors[0]"] == 8
    assert lines["connectors[1]"] == 9
    assert lines['"a.b"'] == 11
    assert lines["site"] == lines["site.owner"] == lines['site.owner."full name"'] == 12
    assert lines["limits"] == 14
    assert lines["limits.max_buffers"] == 15
    assert lines["limits.guest"] == 17
    assert lines["limits.guest.web-vm"] == 18
    assert lines["limits.guest.web-vm.requests_per_second"] == 18
    assert lines["limits.guest.5"] == 20
    assert lines["limits.guest.5.max_total_pages"] == 21
    assert lines["extra[0].x"] == 24
    assert lines["extra[1].x"] == 26


def test_lookalike_lines_inside_strings_and_comments_are_not_keys() -> None:
    paths = {dotted(path) for path in key_lines(TEXT)}
    assert "max_buffers" not in paths  # only in the comment and the multi-line string
    assert "limits" in paths and key_lines(TEXT)[("limits",)] == 14


def test_text_it_cannot_follow_leaves_later_keys_unfound_rather_than_guessed() -> None:
    lines = key_lines('a = 1\nb = "unterminated\nc = 2\n')
    assert lines == {("a",): 1, ("b",): 2}  # c: not found, not guessed


def test_keys_are_written_as_toml_would_quote_them() -> None:
    assert dotted(("assign", "1/0/0")) == 'assign."1/0/0"'
    assert dotted(("limits", "guest", "web vm", "max_buffers")) == (
        'limits.guest."web vm".max_buffers'
    )
    assert dotted(("connectors", 2)) == "connectors[2]"
