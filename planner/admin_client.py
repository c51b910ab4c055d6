"""A small client of a serving process's admin API (`/admin/v1/...`), over plain HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8000"


class AdminError(RuntimeError):
    """The server refused (`status` set, `body` its JSON) or could not be reached (status None)."""

    def __init__(self, message: str, status: int | None = None, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.body = status, body or {}


def server_url(server: str) -> str:
    """Returns the server's base URL: `host:port` as curl reads it (http://host:port), without a
    trailing slash."""
    server = server.strip().rstrip("/")
    if server and "://" not in server:
        server = f"http://{server}"
    return server


class AdminClient:
    def __init__(
        self, server: str = DEFAULT_SERVER, token: str | None = None, timeout_s: float = 60.0
    ):
        self.server = server_url(server)
        self.token = token
        self.timeout_s = timeout_s

    def deployment(self) -> dict[str, Any]:
        return self._request("GET", "/admin/v1/deployment")

    def plan(
        self,
        target: dict[str, Any],
        max_overhead: float | None = None,
        recompute_overflow: bool | None = None,
    ) -> dict[str, Any]:
        """Returns the dry-run answer: {"plan", "text", "feasible"}."""
        return self._request(
            "POST",
            "/admin/v1/applies",
            {
                **target,
                "dry_run": True,
                "max_overhead": max_overhead,
                **_given(recompute_overflow=recompute_overflow),
            },
        )

    def apply(
        self,
        target: dict[str, Any],
        max_overhead: float | None = None,
        expected_epoch: int | None = None,
        kv: str | None = None,
        recompute_overflow: bool | None = None,
    ) -> dict[str, Any]:
        return self._request(
            "POST",
            "/admin/v1/applies",
            {
                **target,
                "max_overhead": max_overhead,
                "expected_epoch": expected_epoch,
                "kv": kv,
                **_given(recompute_overflow=recompute_overflow),
            },
        )

    def applies(self) -> list[dict[str, Any]]:
        """Returns the server's applies, oldest first."""
        return self._request("GET", "/admin/v1/applies")["data"]

    def wait(
        self,
        apply_id: str,
        poll_s: float = 0.1,
        timeout_s: float = 1800.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Returns the apply's record once it is done; `on_update` sees every record read."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.get_apply(apply_id)
            if on_update is not None:
                on_update(record)
            if record["state"] == "done":
                return record
            time.sleep(poll_s)
        raise AdminError(f"apply {apply_id} did not finish in {timeout_s:.0f} s")

    def get_apply(self, apply_id: str) -> dict[str, Any]:
        return self._request("GET", f"/admin/v1/applies/{apply_id}")

    def serving(self, apply_id: str) -> dict[str, Any]:
        """Returns TTFT/TPOT before, during and after the apply, and its streams' token times."""
        return self._request("GET", f"/admin/v1/applies/{apply_id}/serving")

    def cancel(self, apply_id: str) -> dict[str, Any]:
        return self._request("POST", f"/admin/v1/applies/{apply_id}/cancel")

    def drain(self, device: str) -> dict[str, Any]:
        """Starts moving `device`'s layers elsewhere: {"device", "state", "message", "apply"}."""
        from urllib.parse import quote

        return self._request("POST", f"/admin/v1/devices/{quote(device, safe='')}/drain")

    def add_device(self, device: str | None = None, kind: str | None = None) -> dict[str, Any]:
        """Adds a device: a new worker under a new name (returns once it is up), or a drained one
        back (the first drained one when None): {"added", "started", "message", "devices"}."""
        return self._request("POST", "/admin/v1/devices", {"device": device, "kind": kind})

    def workload(self) -> dict[str, Any]:
        return self._request("GET", "/admin/v1/workload")["workload"]

    def controller(self) -> dict[str, Any]:
        """Returns the live controller's mode, policy and most recent decisions."""
        return self._request("GET", "/admin/v1/controller")

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        data = (
            None
            if body is None
            else json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        )
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            request = urllib.request.Request(
                self.server + path, data=data, method=method, headers=headers
            )
        except ValueError as exc:
            raise AdminError(
                f"--server {self.server} is not an HTTP URL ({exc}): give one such as "
                f"{DEFAULT_SERVER}"
            ) from None
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read() or b"{}")
            except json.JSONDecodeError:
                payload = {}
            message = (payload.get("error") or {}).get("message") or f"HTTP {exc.code}"
            if exc.code == 401:  # the server has an --admin-token: say how a command sends it
                message += (
                    "; the token given (--token or PIPESHIFT_ADMIN_TOKEN) is not the server's"
                    if self.token else "; give the server's token with --token or PIPESHIFT_ADMIN_TOKEN"
                )
            raise AdminError(message, exc.code, payload) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(
                f"no pipeshift server answers at {self.server} ({reason}): start one with "
                "`pipeshift serve`, or point --server at it"
            ) from None


def _given(**fields: Any) -> dict[str, Any]:
    """Returns the fields that are set, so that one left unset keeps a value the target body has."""
    return {k: v for k, v in fields.items() if v is not None}
