"""The daemon's status socket and ``displback status``, its client.

The daemon listens on a UNIX stream socket (:data:`DEFAULT_SOCKET`; its directory is made
0700, the socket 0600: root only). A client sends one request line — ``status`` — and gets
one JSON document (:func:`displback.app.status.to_json`), then end of file. Anything else gets
``{"error": ...}``.

The socket must never stall the daemon: each connection is its own task with
:data:`CLIENT_TIMEOUT_S` for the whole exchange (a client that never sends its line or never
reads is dropped), the request line is at most :data:`MAX_REQUEST` bytes, a document larger
than :data:`MAX_DOCUMENT` is refused with an error document, and at most
:data:`MAX_CLIENTS` connections are served at once (more are closed at once).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

import structlog
import trio

__all__ = [
    "DEFAULT_SOCKET",
    "StatusUnavailable",
    "add_status_parser",
    "fetch_status",
    "serve_status",
]

DEFAULT_SOCKET = "/run/displback/status.sock"
CLIENT_TIMEOUT_S = 2.0
MAX_CLIENTS = 8
MAX_REQUEST = 64
MAX_DOCUMENT = 4 << 20


class StatusUnavailable(Exception):
    """``displback status`` cannot get the daemon's status; the message says why."""


# --- the daemon's side ---------------------------------------------------------------------


def _prepare(path: str) -> None:
    """Make the socket's directory (0700) if missing; remove a stale socket left by a dead
    daemon, but refuse to take the place of a live one or of something that is not a socket."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # makedirs' mode is subject to the umask
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a previous daemon's
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another daemon serves its status here", path)


async def serve_status(
    document: Callable[[], dict[str, Any]],
    path: str = DEFAULT_SOCKET,
    *,
    log: Any = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer status requests on ``path`` until cancelled; ``document()`` makes the answer.

    ``task_status.started()`` once the socket listens. The socket is removed at the end.
    """
    log = log if log is not None else structlog.get_logger("displback.app.status")
    _prepare(path)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inode: int | None = None
    try:
        await listener.bind(path)
        inode = os.stat(path).st_ino
        os.chmod(path, 0o600)
        listener.listen(MAX_CLIENTS)
        log.info("status socket", path=path)
        task_status.started()
        clients = 0

        async def client(conn: trio.socket.SocketType) -> None:
            nonlocal clients
            try:
                await _answer(conn, document, log)
            finally:
                clients -= 1

        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                if clients >= MAX_CLIENTS:
                    conn.close()  # busy: a client retries, a flood costs one accept each
                    continue
                clients += 1
                nursery.start_soon(client, conn)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if inode is not None and os.stat(path).st_ino == inode:
                os.unlink(path)


async def _answer(
    conn: trio.socket.SocketType, document: Callable[[], dict[str, Any]], log: Any
) -> None:
    stream = trio.SocketStream(conn)
    with trio.move_on_after(CLIENT_TIMEOUT_S) as scope:
        try:
            request = await _read_line(stream)
            if request == b"status":
                try:
                    body = json.dumps(document(), default=str).encode() + b"\n"
                except Exception as exc:
                    # A bug in the model must cost this answer only, never the daemon.
                    log.exception("cannot build the status")
                    body = _error(f"cannot build the status: {exc!r}")
                if len(body) > MAX_DOCUMENT:
                    body = _error(f"the status is larger than {MAX_DOCUMENT} bytes")
            elif request is None:
                body = _error(f"expected a request line of at most {MAX_REQUEST} bytes")
            else:
                body = _error(f"unknown request {request[:MAX_REQUEST]!r}; send 'status'")
            await stream.send_all(body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away: nothing to tell it
    if scope.cancelled_caught:
        log.debug("status client too slow; dropped")
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    """The request line without its newline; None if longer than allowed."""
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(MAX_REQUEST + 1)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            return None
    return data.split(b"\n", 1)[0].strip()


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


# --- the client: displback status ----------------------------------------------------------


def fetch_status(path: str = DEFAULT_SOCKET, timeout: float = 5.0) -> dict[str, Any]:
    """The running daemon's status document; :class:`StatusUnavailable` says why not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise StatusUnavailable(
                f"displback is not running (nothing listens on {path})"
            ) from None
        except PermissionError:
            raise StatusUnavailable(
                f"no permission to open {path}: the status is for root only"
            ) from None
        sock.sendall(b"status\n")
        chunks = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_DOCUMENT + 1:
                raise StatusUnavailable(f"{path} sent more than {MAX_DOCUMENT} bytes")
    except TimeoutError:
        message = f"the daemon did not answer on {path} within {timeout:g} s"
        raise StatusUnavailable(message) from None
    except OSError as exc:
        raise StatusUnavailable(f"cannot talk to the daemon on {path}: {exc}") from None
    finally:
        sock.close()
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError:
        raise StatusUnavailable(f"{path} did not answer with a status document") from None
    if not isinstance(doc, dict):
        raise StatusUnavailable(f"{path} did not answer with a status document")
    if "error" in doc:
        raise StatusUnavailable(f"the daemon refused: {doc['error']}")
    return doc


def add_status_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``status`` subcommand to ``subparsers``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="show what the running daemon is doing (guests, connectors, buffers, quotas)",
        description="Ask the running daemon for its status over its UNIX socket (root only).",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON document")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help=f"the daemon's status socket ({DEFAULT_SOCKET})",
    )
    parser.set_defaults(func=status_command)
    return parser


def status_command(args: argparse.Namespace) -> int:
    """Handler of ``displback status``: 0 with the status printed, 1 if unavailable."""
    from displback.app.status import render_table

    try:
        doc = fetch_status(args.socket)
    except StatusUnavailable as exc:
        print(f"displback status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_table(doc))
    return 0
