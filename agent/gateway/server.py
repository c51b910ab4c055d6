"""Running the gateway under uvicorn: in the foreground (`pipeshift serve`) or in a thread.

`ServerThread` serves an app on its own event loop in a background thread, so a test (sync,
or async through `async with`) can talk to it over real loopback HTTP with any client.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from types import TracebackType

import uvicorn
from fastapi import FastAPI


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, `localhost`, or Starlette's test client) is this host."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


def listening_socket(host: str, port: int) -> socket.socket:
    """Returns a socket bound to `host`:`port` for `run_server`, so that a command finds out
    that it cannot listen there before it starts anything; raises ValueError saying why not and
    what to do (a port another process holds, a host that is not this machine's)."""
    if not 0 <= port <= 65535:  # getaddrinfo would wrap 99999 round to 34463
        raise ValueError(f"--port must be 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror:
        raise ValueError(
            f"cannot listen on {host}: no such host; give an address of this host "
            "(--host 127.0.0.1, or 0.0.0.0 for every interface)"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise cannot_listen(host, port, exc) from None
    return sock


def cannot_listen(host: str, port: int, exc: OSError) -> ValueError:
    """Returns the error that says why `host`:`port` cannot be listened on, and what to do."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ValueError(
            f"cannot listen on {where}: the port is in use (another pipeshift server or "
            "another program holds it): stop that process or choose another --port"
        )
    if exc.errno == errno.EACCES:
        return ValueError(
            f"cannot listen on {where}: permission denied (ports below 1024 need "
            "privileges): choose another --port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ValueError(
            f"cannot listen on {where}: {host} is not an address of this host; give one "
            "that is (--host 127.0.0.1, or 0.0.0.0 for every interface)"
        )
    return ValueError(f"cannot listen on {where}: {exc.strerror or exc}")


def run_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Serves `app` until SIGINT/SIGTERM; returns after a graceful shutdown. With `sock` (from
    `listening_socket`) it serves on that socket, else it binds `host`:`port` itself."""
    # One worker process: the engine lives in this process, so it cannot be forked.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1)
    try:
        uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
    except OSError as exc:
        # Bound but not yet listening, `sock` shares its port with another server starting
        # at the same moment; the one that listens first keeps it.
        if sock is None or exc.errno != errno.EADDRINUSE:
            raise
        raise cannot_listen(host, port, exc) from None


class ServerThread:
    """Serves an app on a loopback port in a daemon thread; `port=0` picks a free one.

    The listening socket is bound here, before the thread starts, so the port is known at once
    and no other process can take it in between.
    """

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ):
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        config = uvicorn.Config(
            app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="gateway", daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        """Starts serving and returns once GET /health answers (any status); raises on timeout."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the gateway server thread exited during startup; see its log")
            if self._server.started and self._health_answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(
            f"the gateway at {self.base_url} did not answer /health in {timeout_s} s"
        )

    def _health_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=1.0):
                return True
        except urllib.error.HTTPError:  # a 503 still means the server is up
            return True
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Asks uvicorn to shut down gracefully and waits for the thread to end."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Async-friendly: start/stop block briefly, so keep them off the caller's event loop.
    async def __aenter__(self) -> ServerThread:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
