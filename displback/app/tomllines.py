"""Where each key of a TOML file is written: line numbers for configuration errors.

``tomllib`` gives values only, so an error about ``limits.guest."web-vm".max_buffers`` could
not say where to look. :func:`key_lines` walks the text once more, structurally (table
headers, dotted and quoted keys, inline tables, arrays, all four string forms, comments), and
records the line where every key path is first written — a path made implicitly by a longer
one (``[limits.guest.5]`` makes ``limits`` and ``limits.guest``) gets the line of its first
mention. Array elements are recorded too, by index. It is meant for text ``tomllib`` already
accepted; if it meets something it does not understand it stops, and the paths after that
point are simply not found (the caller then says so instead of guessing).
"""

from __future__ import annotations

import contextlib
import re

__all__ = ["KeyPath", "dotted", "key_lines"]

#: A key's path: table and key names, and indices of array elements.
KeyPath = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = re.compile(r"[,\]}\n#]")


class _Stop(Exception):
    """The scanner met text it does not understand."""


def dotted(path: KeyPath) -> str:
    """``('limits', 'guest', 'web vm', 'max_buffers')`` → ``limits.guest."web vm".max_buffers``;
    array indices as ``connectors[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if _BARE.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'
        out += f".{text}" if out else text
    return out


def key_lines(text: str) -> dict[KeyPath, int]:
    """Every key path of the TOML ``text`` → the 1-based line it is first written on."""
    scanner = _Scanner(text)
    with contextlib.suppress(_Stop, IndexError):
        scanner.document()
    return scanner.lines


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[KeyPath, int] = {}
        self._arrays: dict[KeyPath, int] = {}

    # -- positions -----------------------------------------------------------------------

    @property
    def line(self) -> int:
        return self.text.count("\n", 0, self.pos) + 1

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def record(self, path: KeyPath, line: int) -> None:
        for end in range(1, len(path) + 1):
            self.lines.setdefault(path[:end], line)

    def skip_blank(self, *, newlines: bool) -> None:
        """Skip spaces (and newlines and comments if ``newlines``)."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r" or (newlines and char == "\n"):
                self.pos += 1
            elif char == "#" and newlines:
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    # -- grammar -------------------------------------------------------------------------

    def document(self) -> None:
        table: KeyPath = ()
        while True:
            self.skip_blank(newlines=True)
            if self.pos >= len(self.text):
                return
            line = self.line
            if self.peek(2) == "[[":
                self.pos += 2
                header = self.key("]")
                self.expect("]]")
                index = self._arrays.get(header, -1) + 1
                self._arrays[header] = index
                self.record(header, line)
                table = (*header, index)
                self.record(table, line)
            elif self.peek() == "[":
                self.pos += 1
                table = self.key("]")
                self.expect("]")
                self.record(table, line)
            else:
                self.key_value(table)

    def key_value(self, table: KeyPath) -> None:
        line = self.line
        path = (*table, *self.key("="))
        self.expect("=")
        self.record(path, line)
        self.value(path)

    def key(self, end: str) -> KeyPath:
        """A dotted key up to (not including) ``end``."""
        parts: list[str] = []
        while True:
            self.skip_blank(newlines=False)
            char = self.peek()
            if char == '"':
                parts.append(self.basic_string())
            elif char == "'":
                parts.append(self.literal_string())
            else:
                match = _BARE.match(self.text, self.pos)
                if match is None:
                    raise _Stop
                parts.append(match.group())
                self.pos = match.end()
            self.skip_blank(newlines=False)
            if self.peek() == ".":
                self.pos += 1
                continue
            if self.peek(len(end)) != end:
                raise _Stop
            return tuple(parts)

    def expect(self, token: str) -> None:
        self.skip_blank(newlines=False)
        if self.peek(len(token)) != token:
            raise _Stop
        self.pos += len(token)

    def value(self, path: KeyPath) -> None:
        self.skip_blank(newlines=False)
        char = self.peek()
        if char == '"':
            self.basic_string()
        elif char == "'":
            self.literal_string()
        elif char == "[":
            self.array(path)
        elif char == "{":
            self.inline_table(path)
        else:
            match = _SCALAR_END.search(self.text, self.pos)
            self.pos = len(self.text) if match is None else match.start()

    def array(self, path: KeyPath) -> None:
        self.pos += 1
        index = 0
        while True:
            self.skip_blank(newlines=True)
            if self.peek() == "]":
                self.pos += 1
                return
            element = (*path, index)
            self.record(element, self.line)
            self.value(element)
            index += 1
            self.skip_blank(newlines=True)
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                raise _Stop

    def inline_table(self, path: KeyPath) -> None:
        self.pos += 1
        while True:
            self.skip_blank(newlines=False)
            if self.peek() == "}":
                self.pos += 1
                return
            line = self.line
            key = (*path, *self.key("="))
            self.expect("=")
            self.record(key, line)
            self.value(key)
            self.skip_blank(newlines=False)
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "}":
                raise _Stop

    def basic_string(self) -> str:
        if self.peek(3) == '"""':
            end = self.text.find('"""', self.pos + 3)
            while end >= 0 and _escaped(self.text, end):
                end = self.text.find('"""', end + 1)
            if end < 0:
                raise _Stop
            while self.text.startswith('"', end + 3):  # up to two quotes end the content
                end += 1
            self.pos = end + 3
            return ""
        self.pos += 1
        out: list[str] = []
        while True:
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\n":
                raise _Stop
            if char == "\\":
                out.append(_unescape(self.text, self.pos))
                self.pos += _escape_length(self.text, self.pos)
                continue
            out.append(char)
            self.pos += 1

    def literal_string(self) -> str:
        if self.peek(3) == "'''":
            end = self.text.find("'''", self.pos + 3)
            if end < 0:
                raise _Stop
            while self.text.startswith("'", end + 3):
                end += 1
            self.pos = end + 3
            return ""
        end = self.text.find("'", self.pos + 1)
        if end < 0 or "\n" in self.text[self.pos : end]:
            raise _Stop
        value = self.text[self.pos + 1 : end]
        self.pos = end + 1
        return value


_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def _escaped(text: str, pos: int) -> bool:
    """Whether the character at ``pos`` follows an odd number of backslashes."""
    count = 0
    while pos - count - 1 >= 0 and text[pos - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _escape_length(text: str, pos: int) -> int:
    kind = text[pos + 1]
    return {"u": 6, "U": 10}.get(kind, 2)


def _unescape(text: str, pos: int) -> str:
    kind = text[pos + 1]
    if kind in "uU":
        digits = text[pos + 2 : pos + _escape_length(text, pos)]
        try:
            return chr(int(digits, 16))
        except ValueError:
            raise _Stop from None
    if kind not in _ESCAPES:
        raise _Stop
    return _ESCAPES[kind]
