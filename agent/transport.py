"""Point-to-point channels between adjacent stages over torch.distributed.

Each adjacent pair gets its own two-rank process group on a shared `TCPStore` (namespaced by
a `PrefixStore`), rather than one global world, so stages can be re-wired later without
restarting every process. A message is a JSON header plus the tensors it describes:
`[length][header bytes][tensor 0][tensor 1]...`; nothing received is ever unpickled.
Gloo carries the tensors; a stage on a GPU stages them through host memory. (NCCL refuses
two ranks on one GPU, so gloo is also what a single-GPU pipeline would use.)
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Idle stages wait for work indefinitely; dead peers are found by the engine's health monitor
# (process exit, missed pings) and by gloo raising when the peer's socket closes.
IDLE_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class ChannelSpec:
    """How two processes find each other: the store's address and the channel's name.
    The sender takes rank 0 and the receiver rank 1."""

    store_host: str
    store_port: int
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"store_host": self.store_host, "store_port": self.store_port, "name": self.name}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChannelSpec:
        return cls(d["store_host"], int(d["store_port"]), d["name"])


class Channel:
    """One direction of traffic between two processes: the sender is rank 0, the receiver rank 1."""

    def __init__(self, spec: ChannelSpec, is_sender: bool, device: torch.device | str = "cpu",
                 connect_timeout_s: float = 60.0, op_timeout: timedelta = IDLE_TIMEOUT):
        """`connect_timeout_s` bounds the wait for the peer to show up; `op_timeout` one send
        or receive (stage channels idle for as long as no request comes: days)."""
        self.spec = spec
        self.is_sender = is_sender
        self.device = torch.device(device)
        store = dist.TCPStore(
            spec.store_host, spec.store_port, is_master=False,
            timeout=timedelta(seconds=connect_timeout_s), use_libuv=True,
        )
        prefixed = dist.PrefixStore(f"channel/{spec.name}", store)
        self.rank, self.peer = (0, 1) if is_sender else (1, 0)
        self._pg = dist.ProcessGroupGloo(prefixed, self.rank, 2, op_timeout)
        self.bytes_sent = 0
        self._send_lock = threading.Lock()  # a message is several sends: keep them together

    def send(self, header: dict[str, Any], tensors: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> None:
        """Sends a JSON header and the tensors it describes (shapes/dtypes are added to it)."""
        cpu = [t.detach().contiguous().cpu() for t in tensors]
        header = {**header, "tensors": [[list(t.shape), DTYPE_NAMES[t.dtype]] for t in cpu]}
        payload = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        with self._send_lock:
            self._send(torch.tensor([payload.numel()], dtype=torch.int64))
            self._send(payload)
            for t in cpu:
                self._send(t)
        self.bytes_sent += payload.numel() + sum(t.numel() * t.element_size() for t in cpu)

    def recv(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Returns the next header and its tensors (on this channel's device)."""
        length = torch.empty(1, dtype=torch.int64)
        self._recv(length)
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self._recv(payload)
        header = json.loads(payload.numpy().tobytes().decode())
        tensors = []
        for shape, dtype_name in header.pop("tensors"):
            t = torch.empty(shape, dtype=DTYPES[dtype_name])
            self._recv(t)
            tensors.append(t.to(self.device) if self.device.type != "cpu" else t)
        return header, tensors

    def _send(self, t: torch.Tensor) -> None:
        self._pg.send([t], self.peer, 0).wait()

    def _recv(self, t: torch.Tensor) -> None:
        self._pg.recv([t], self.peer, 0).wait()


class ChannelStore:
    """The TCP store every channel of a deployment rendezvouses on; the engine hosts it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, use_libuv=True)
        self.host, self.port = host, self._store.port

    def spec(self, name: str) -> ChannelSpec:
        return ChannelSpec(self.host, self.port, name)
