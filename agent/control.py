"""Control messages between the engine and its workers: JSON lines over a TCP socket.

The engine listens; each worker connects once and says hello. After that the engine sends
commands (`{"id": n, "op": ..., ...}`) and the worker answers each with
`{"id": n, "ok": true, ...}` or `{"id": n, "ok": false, "error": "..."}`. Several commands
may be outstanding at once (a weight prefetch runs for seconds while pings keep answering):
answers carry their command's id and may arrive in any order. JSON only: nothing received
is unpickled.
"""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any


class ControlError(RuntimeError):
    """A worker answered a command with an error, or did not answer in time."""


class JsonLineSocket:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._reader = sock.makefile("rb")
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self._send_lock:
            self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise ConnectionError("control connection closed by peer")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class WorkerConnection:
    """The engine's side of one worker's control connection; `call` is thread-safe and
    several calls may be in flight at once."""

    def __init__(self, conn: JsonLineSocket, hello: dict[str, Any]):
        self.conn = conn
        self.hello = hello
        self.worker_id: int = int(hello["worker_id"])
        self.pid: int = int(hello["pid"])
        self._lock = threading.Lock()
        self._next_id = 0
        self._pending: dict[int, Future] = {}
        self._closed: str | None = None
        conn.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read, name=f"control-{self.worker_id}", daemon=True)
        self._reader.start()

    def call(self, op: str, timeout_s: float | None = 120.0, **fields: Any) -> dict[str, Any]:
        """Sends a command and returns the worker's answer; raises ControlError on failure."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise ControlError(f"worker {self.worker_id} did not answer {op!r}: {self._closed}")
            self._next_id += 1
            msg_id = self._next_id
            self._pending[msg_id] = future
        try:
            self.conn.send({"id": msg_id, "op": op, **fields})
            reply = future.result(timeout=timeout_s)
        except FutureTimeout:
            raise ControlError(
                f"worker {self.worker_id} did not answer {op!r} within {timeout_s:.0f} s"
            ) from None
        except (OSError, ConnectionError) as exc:
            raise ControlError(f"worker {self.worker_id} did not answer {op!r}: {exc}") from exc
        finally:
            with self._lock:
                self._pending.pop(msg_id, None)
        if not reply.get("ok"):
            raise ControlError(f"worker {self.worker_id} failed {op!r}: {reply.get('error')}")
        return reply

    def _read(self) -> None:
        try:
            while True:
                reply = self.conn.recv()
                with self._lock:
                    future = self._pending.get(reply.get("id"))
                if future is not None and not future.done():
                    future.set_result(reply)
        except (OSError, ConnectionError, ValueError) as exc:
            reason = f"control connection lost ({exc})"
        with self._lock:
            self._closed = reason
            pending = list(self._pending.values())
        for future in pending:
            if not future.done():
                future.set_exception(ConnectionError(reason))

    def close(self) -> None:
        self.conn.close()


class ControlServer:
    """Accepts worker connections on a loopback (or given) address."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]

    def accept(self, timeout_s: float) -> WorkerConnection:
        self._sock.settimeout(timeout_s)
        try:
            sock, _ = self._sock.accept()
        except TimeoutError:
            raise ControlError(f"no worker connected within {timeout_s:.0f} s") from None
        sock.settimeout(timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = JsonLineSocket(sock)
        hello = conn.recv()
        if hello.get("op") != "hello":
            conn.close()
            raise ControlError(f"expected a hello from a worker, got {hello}")
        return WorkerConnection(conn, hello)

    def close(self) -> None:
        self._sock.close()
