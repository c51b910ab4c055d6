"""One worker process per device: answers control commands, runs its stage's loop.

Started by a launcher as `python -m agent.worker --control HOST:PORT --worker-id N`. It
connects to the engine's control server, says hello, then obeys:
  configure {epoch, model, start, end, kv_budget_bytes, block_size, dtype}
  connect   {epoch, inbound: ChannelSpec, outbound: ChannelSpec}   then serves
  ping      -> {busy_for_s, busy_s, steps, rss_bytes, free_blocks}
  shutdown
If the control connection drops (the engine died), the worker exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from agent.control import JsonLineSocket
from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.loaders import load_stage_weights, resolve_model
from agent.model import LlamaStage
from agent.process_memory import memory_breakdown, release_free_heap
from agent.stage_loop import StageLoop
from agent.transport import DTYPES, Channel, ChannelSpec

log = logging.getLogger("pipeshift.worker")


class Worker:
    def __init__(self, worker_id: int, device: str):
        self.worker_id = worker_id
        self.device = device
        self.stage: LlamaStage | None = None
        self.kv: PagedKVCache | None = None
        self.loop: StageLoop | None = None
        self.epoch = 0

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg["op"]
        if op == "configure":
            return self.configure(msg)
        if op == "connect":
            return self.connect(msg)
        if op == "ping":
            return self.ping()
        raise ValueError(f"unknown control op {op!r}")

    def configure(self, msg: dict[str, Any]) -> dict[str, Any]:
        source = resolve_model(msg["model"])
        start, end = int(msg["start"]), int(msg["end"])
        dtype = DTYPES[msg.get("dtype", "float32")]
        weights = load_stage_weights(source, start, end, dtype)
        self.stage = LlamaStage.from_weights(source.arch, start, end, weights, self.device)
        weight_bytes = self.stage.weight_bytes
        del weights
        release_free_heap()
        arch = source.arch
        spec = KVCacheSpec(int(msg["block_size"]), arch.n_kv_heads, arch.head_dim, dtype)
        num_blocks = spec.blocks_for_budget(int(msg["kv_budget_bytes"]), end - start)
        self.kv = PagedKVCache(spec, range(start, end), num_blocks, self.device)
        self.epoch = int(msg["epoch"])
        return {"num_blocks": num_blocks, "weight_bytes": weight_bytes, **memory_breakdown()}

    def connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.stage is None or self.kv is None:
            raise RuntimeError("connect before configure")
        # Both ends of a channel block until the other arrives: open them side by side.
        with ThreadPoolExecutor(2) as pool:
            inbound = pool.submit(Channel, ChannelSpec.from_json(msg["inbound"]), False, self.device)
            outbound = pool.submit(Channel, ChannelSpec.from_json(msg["outbound"]), True, self.device)
            self.loop = StageLoop(self.stage, self.kv, inbound.result(), outbound.result(), self.epoch)
        threading.Thread(target=self._serve, name="stage-loop", daemon=True).start()
        return {}

    def _serve(self) -> None:
        try:
            self.loop.run()
        except Exception as exc:  # a peer died: the engine's monitor reports it
            log.error("worker %d: stage loop ended: %s", self.worker_id, exc)

    def ping(self) -> dict[str, Any]:
        loop = self.loop
        busy_since = loop.busy_since if loop else None
        return {
            "busy_for_s": 0.0 if busy_since is None else time.monotonic() - busy_since,
            "busy_s": loop.busy_s if loop else 0.0,
            "steps": loop.steps if loop else 0,
            **memory_breakdown(),
            "free_blocks": self.kv.num_free_blocks if self.kv else 0,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pipeshift stage worker (started by a launcher)")
    parser.add_argument("--control", required=True, help="HOST:PORT of the engine's control server")
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[worker {args.worker_id}] %(message)s")
    torch.set_num_threads(args.threads)

    host, port = args.control.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = JsonLineSocket(sock)
    conn.send({"op": "hello", "worker_id": args.worker_id, "pid": os.getpid(), "device": args.device})
    worker = Worker(args.worker_id, args.device)
    while True:
        try:
            msg = conn.recv()
        except (ConnectionError, OSError):
            break  # the engine is gone; so are we
        if msg["op"] == "shutdown":
            conn.send({"id": msg["id"], "ok": True})
            break
        try:
            reply = {"id": msg["id"], "ok": True, **worker.handle(msg)}
        except Exception as exc:
            log.exception("control op %s failed", msg.get("op"))
            reply = {"id": msg["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        conn.send(reply)
    os._exit(0)  # do not wait for a stage loop blocked in recv


if __name__ == "__main__":
    main()
