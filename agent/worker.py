"""One worker process per device: answers control commands, runs its wirings' stage loops.

Started by a launcher as `python -m agent.worker --control HOST:PORT --worker-id N`. It
connects to the engine's control server, says hello, then obeys (several commands may run at
once; each answer carries its command's id):

  serving
    configure   {model, start, end, kv_cap_bytes, memory_budget_bytes, block_size, dtype}
                loads layers [start, end) (none for a spare) and sizes the KV pool
    open_wiring {wiring, epoch, start, end, inbound, outbound}  starts a stage loop on new channels
    ping        -> {busy_for_s, busy_s, steps, rss_bytes, free_blocks, num_blocks, layers}
  reconfiguring (see agent/executor.py)
    open_xfer   {name, send, spec}          a channel to or from a peer, for weights and KV
    close_xfer  {name}
    send_parts  {xfer, start, end, embed, head, max_overhead, apply}   to a peer that loads them
    load_parts  {source: "disk" | xfer, start, end, embed, head, max_overhead, apply}
    replicate   {apply, entries, max_overhead}   keep moving requests' KV current at their new owners
    expect      {entries, channels}         receive it there; their new steps wait for it
    replication {stop, end_channels}        -> {behind, bytes, waited_ms}; ends replication
    resize_pool {num_blocks}                shrink (compacting) or grow the KV pool
    drop_parts  {start, end, embed, head}   free layers (weights and KV storage)
    free        {ids}                       free these requests' KV blocks
    cancel      {apply}                     stop that apply's background copies
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from typing import Any

import torch

from agent.constrained import GrammarMatchers
from agent.control import JsonLineSocket
from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.loaders import ModelSource, load_stage_weights, load_weights, resolve_model
from agent.model import LlamaStage
from agent.pacing import Cancelled, Pacer
from agent.process_memory import memory_breakdown, release_free_heap
from agent.stage_loop import StageHost, StageLoop
from agent.tokenizer import load_tokenizer
from agent.transport import DTYPES, Channel, ChannelSpec

log = logging.getLogger("pipeshift.worker")

# Answered on the connection's reader thread: they must not wait behind a long command.
INLINE_OPS = {"ping", "cancel"}
XFER_CONNECT_TIMEOUT_S = 30.0
XFER_OP_TIMEOUT = timedelta(minutes=10)


class Worker:
    def __init__(self, worker_id: int, device: str):
        self.worker_id = worker_id
        self.device = device
        self.source: ModelSource | None = None
        self.host: StageHost | None = None
        self.loops: dict[str, StageLoop] = {}
        self.xfers: dict[str, Channel] = {}
        self.kv_cap_bytes = 0
        self.memory_budget_bytes: int | None = None
        self._cancel: dict[str, threading.Event] = {}
        self._overheads: dict[str, float] = {}  # apply -> share of time its copies may take

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg["op"]
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ValueError(f"unknown control op {op!r}")
        return handler(msg) or {}

    # ---- serving --------------------------------------------------------------------------
    def op_configure(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.source = source = resolve_model(msg["model"])
        start, end = int(msg["start"]), int(msg["end"])
        dtype = DTYPES[msg.get("dtype", "float32")]
        if start < end:
            weights = load_stage_weights(source, start, end, dtype)
            stage = LlamaStage.from_weights(source.arch, start, end, weights, self.device)
            del weights
        else:  # a spare: nothing yet
            stage = LlamaStage(source.arch, 0, 0).to(self.device).eval()
        release_free_heap()
        arch = source.arch
        spec = KVCacheSpec(int(msg["block_size"]), arch.n_kv_heads, arch.head_dim, dtype)
        self.kv_cap_bytes = int(msg["kv_cap_bytes"])
        budget = msg.get("memory_budget_bytes")
        self.memory_budget_bytes = None if budget is None else int(budget)
        pool_bytes = self.kv_cap_bytes
        if self.memory_budget_bytes is not None:
            pool_bytes = min(pool_bytes, self.memory_budget_bytes - stage.weight_bytes)
        num_blocks = spec.blocks_for_budget(pool_bytes, end - start) if start < end else 1
        if num_blocks < 1:
            raise ValueError(
                f"layers {start}-{end - 1} hold {stage.weight_bytes / 2**20:.0f} MiB of weights and leave "
                f"{max(0, pool_bytes) / 2**20:.0f} MiB for the KV pool, less than one block: raise "
                "--memory-budget or --kv-cache-mb"
            )
        # Address space for the largest pool this worker may ever have: one layer's worth.
        max_blocks = max(num_blocks, spec.blocks_for_budget(self.kv_cap_bytes, 1))
        kv = PagedKVCache(spec, range(start, end), num_blocks, self.device, max_blocks=max_blocks)
        self.host = StageHost(stage, kv, self.worker_id, self.xfers.__getitem__)
        # JSON schemas (response_format) are matched against the model's own tokenizer.
        self.host.sampler.grammars = GrammarMatchers(partial(load_tokenizer, source.format, source.path))
        return {
            "num_blocks": num_blocks, "max_blocks": max_blocks, "weight_bytes": stage.weight_bytes,
            "part_bytes": stage.part_bytes(), "kv_bytes_per_token_per_layer": spec.bytes_per_token_per_layer,
            **memory_breakdown(),
        }

    def op_open_wiring(self, msg: dict[str, Any]) -> dict[str, Any]:
        host = self._host()
        start, end = int(msg["start"]), int(msg["end"])
        missing = [i for i in range(start, end) if i not in host.stage.held_layers]
        if missing or (start == 0 and not host.stage.has_embedding):
            raise RuntimeError(f"wiring {msg['wiring']} needs layers {start}-{end - 1}, "
                               f"the worker lacks {missing or 'the embedding'}")
        is_last = end == host.stage.arch.n_layers
        if is_last and not host.stage.has_head:
            raise RuntimeError(f"wiring {msg['wiring']} ends the model but the worker holds no head")
        # Both ends of a channel block until the other arrives: open them side by side.
        with ThreadPoolExecutor(2) as pool:
            inbound = pool.submit(Channel, ChannelSpec.from_json(msg["inbound"]), False, self.device)
            outbound = pool.submit(Channel, ChannelSpec.from_json(msg["outbound"]), True, self.device)
            loop = StageLoop(host, msg["wiring"], int(msg["epoch"]), range(start, end), is_last,
                             inbound.result(), outbound.result())
        self.loops[loop.wiring] = loop
        threading.Thread(target=self._serve, args=(loop,), name=f"loop-{loop.wiring}", daemon=True).start()
        return {}

    def _serve(self, loop: StageLoop) -> None:
        try:
            loop.run()
        except Exception as exc:  # a peer died: the engine's monitor reports it
            log.error("worker %d: wiring %s ended: %s", self.worker_id, loop.wiring, exc)
        finally:
            self.loops.pop(loop.wiring, None)

    def op_ping(self, msg: dict[str, Any]) -> dict[str, Any]:
        host = self.host
        busy_since = host.busy_since if host else None
        return {
            "busy_for_s": 0.0 if busy_since is None else time.monotonic() - busy_since,
            "busy_cpu_s": host.busy_cpu_s() if host else None,
            "busy_s": host.busy_s if host else 0.0,
            "steps": host.steps if host else 0,
            **memory_breakdown(),
            "free_blocks": host.kv.num_free_blocks if host else 0,
            "num_blocks": host.kv.num_blocks if host else 0,
            "layers": host.stage.held_layers if host else [],
            "weight_bytes": host.stage.weight_bytes if host else 0,
            "requests": sorted(host.kv.block_tables) if host else [],
            "wirings": sorted(self.loops),
        }

    # ---- reconfiguring --------------------------------------------------------------------
    def op_open_xfer(self, msg: dict[str, Any]) -> dict[str, Any]:
        # A peer that died before meeting us must not hold this thread (or the apply) for long.
        self.xfers[msg["name"]] = Channel(
            ChannelSpec.from_json(msg["spec"]), bool(msg["send"]), "cpu",
            connect_timeout_s=XFER_CONNECT_TIMEOUT_S, op_timeout=XFER_OP_TIMEOUT,
        )
        return {}

    def op_close_xfer(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.xfers.pop(msg["name"], None)
        return {}

    def op_cancel(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._cancel_event(msg["apply"]).set()
        return {}

    def _pacer(self, msg: dict[str, Any]) -> Pacer:
        apply = msg.get("apply", "")
        return Pacer(self._share(apply, msg.get("max_overhead")), self._cancel_event(apply))

    def _share(self, apply: str, requested: float | None) -> Callable[[], float]:
        """Returns the current share of time `apply`'s background work may take: the one it
        asked for, until the engine says otherwise (`pace`)."""
        self._overheads.setdefault(apply, float(requested or 1.0))
        return lambda: self._overheads[apply]

    def op_pace(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Sets the share of time `apply`'s copies may take: all of it while nothing is served."""
        self._overheads[msg["apply"]] = float(msg["max_overhead"])
        return {}

    def _cancel_event(self, apply: str) -> threading.Event:
        return self._cancel.setdefault(apply, threading.Event())

    def op_send_parts(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Sends layers [start, end) (one message each), then the embedding and the head."""
        stage, channel, pacer = self._host().stage, self.xfers[msg["xfer"]], self._pacer(msg)
        sent = 0
        try:
            for piece in _parts(int(msg["start"]), int(msg["end"]), bool(msg["embed"]), bool(msg["head"])):
                # Only the copy out of the stage counts as work: time blocked in `send` is the
                # receiver's (its own pacing), and counting it here would pace twice.
                with pacer.piece(rest=False):
                    tensors = {n: t.contiguous() for n, t in stage.export(**piece).items()}
                names = list(tensors)
                channel.send({"op": "parts", "part": piece_json(piece), "names": names}, [tensors[n] for n in names])
                pacer.rest()  # after the send: the receiver installs while this side rests
                sent += sum(t.numel() * t.element_size() for t in tensors.values())
        except Cancelled:
            channel.send({"op": "abort"})
            raise
        channel.send({"op": "end"})
        return {"bytes": sent, "work_s": pacer.work_s}

    def op_load_parts(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Loads layers [start, end), the embedding and the head, from disk or a peer; the
        stage gains them in place (and the KV pool gains their storage)."""
        self._host()
        pacer = self._pacer(msg)
        start, end, embed, head = int(msg["start"]), int(msg["end"]), bool(msg["embed"]), bool(msg["head"])
        loaded = 0
        if msg["source"] == "disk":
            for piece in _parts(start, end, embed, head):
                with pacer.piece():
                    tensors = load_weights(self.source, piece["layers"], piece["embed"], piece["head"])
                    loaded += sum(t.numel() * t.element_size() for t in tensors.values())
                    self._install(tensors, piece)
        else:
            channel = self.xfers[msg["source"]]
            while True:
                header, tensors = channel.recv()
                if header["op"] == "end":
                    break
                if header["op"] == "abort":
                    raise Cancelled("the sending peer stopped (cancelled)")
                with pacer.piece():
                    loaded += sum(t.numel() * t.element_size() for t in tensors)
                    self._install(dict(zip(header["names"], tensors, strict=True)), piece_from_json(header["part"]))
        release_free_heap()
        return {"bytes": loaded, "work_s": pacer.work_s, **memory_breakdown()}

    def _install(self, tensors: dict[str, torch.Tensor], piece: dict[str, Any]) -> None:
        host = self._host()
        host.stage.install(tensors, **piece)
        for layer in piece["layers"]:
            if layer not in host.kv.k:
                host.kv.add_layer(layer)

    def op_replicate(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Keeps the new owners of moving requests' runs up to date (agent/handoff.py)."""
        self._host().handoffs.replicate(msg["apply"], msg["entries"],
                                        self._share(msg["apply"], msg.get("max_overhead")),
                                        self._cancel_event(msg["apply"]))
        return {"behind": self._host().handoffs.behind()}

    def op_expect(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Receives moving requests' KV on `channels`; steps of theirs wait for it."""
        self._host().handoffs.expect(msg["entries"], list(msg["channels"]))
        return {}

    def op_replication(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Returns how far behind replication is, and (with `stop`) ends it."""
        handoffs = self._host().handoffs
        out = {"behind": handoffs.behind(), "bytes_out": handoffs.bytes_out, "bytes_in": handoffs.bytes_in,
               "waited_ms": dict(handoffs.waited_ms)}
        if msg.get("stop"):
            handoffs.stop_replicating()
            handoffs.end_channels(list(msg.get("end_channels") or []))
            handoffs.stop_expecting()
            handoffs.waited_ms.clear()
            handoffs.bytes_out = handoffs.bytes_in = 0
        return out

    def op_resize_pool(self, msg: dict[str, Any]) -> dict[str, Any]:
        host = self._host()
        with host.computing():  # no step may read a block while it moves
            moved = host.kv.resize(int(msg["num_blocks"]))
        return {"moved_blocks": moved, "num_blocks": host.kv.num_blocks, **memory_breakdown()}

    def op_drop_parts(self, msg: dict[str, Any]) -> dict[str, Any]:
        host = self._host()
        layers = [i for i in range(int(msg["start"]), int(msg["end"])) if i in host.stage.held_layers]
        host.stage.remove(layers, embed=bool(msg.get("embed")), head=bool(msg.get("head")))
        for layer in layers:
            if layer in host.kv.k:
                host.kv.drop_layer(layer)
        release_free_heap()
        return {"layers": host.stage.held_layers, **memory_breakdown()}

    def op_free(self, msg: dict[str, Any]) -> dict[str, Any]:
        host = self._host()
        freed = sum(host.kv.free(rid) for rid in msg["ids"])
        host.sampler.forget(list(msg["ids"]))
        host.handoffs.forget(list(msg["ids"]))
        return {"freed_blocks": freed, "free_blocks": host.kv.num_free_blocks}

    def _host(self) -> StageHost:
        if self.host is None:
            raise RuntimeError("the worker is not configured yet")
        return self.host


def _parts(start: int, end: int, embed: bool, head: bool) -> list[dict[str, Any]]:
    """Returns the pieces a transfer of these parts is made of: one layer at a time, then the
    embedding, then the head (so pacing and cancellation act between pieces)."""
    pieces: list[dict[str, Any]] = [{"layers": range(i, i + 1), "embed": False, "head": False} for i in range(start, end)]
    if embed:
        pieces.append({"layers": range(0), "embed": True, "head": False})
    if head:
        pieces.append({"layers": range(0), "embed": False, "head": True})
    return pieces


def piece_json(piece: dict[str, Any]) -> dict[str, Any]:
    return {"start": piece["layers"].start, "end": piece["layers"].stop, "embed": piece["embed"], "head": piece["head"]}


def piece_from_json(obj: dict[str, Any]) -> dict[str, Any]:
    return {"layers": range(obj["start"], obj["end"]), "embed": obj["embed"], "head": obj["head"]}


def reply_to(worker: Worker, msg: dict[str, Any]) -> dict[str, Any]:
    """Returns the answer to one control command. A command that fails is answered with its
    error, which the engine reports; the worker's log has it in one line (with the traceback
    only at PIPESHIFT_LOG_LEVEL=DEBUG), so a refused model is not a wall of tracebacks, one per
    worker, above the one-line error the command prints."""
    try:
        return {"id": msg["id"], "ok": True, **worker.handle(msg)}
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, Cancelled):
            log.error("control op %s failed: %s", msg.get("op"), error)
            log.debug("control op %s failed", msg.get("op"), exc_info=True)
        return {"id": msg["id"], "ok": False, "error": error}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pipeshift stage worker (started by a launcher)")
    parser.add_argument("--control", required=True, help="HOST:PORT of the engine's control server")
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    level = os.environ.get("PIPESHIFT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format=f"[worker {args.worker_id}] %(message)s")
    torch.set_num_threads(args.threads)

    host, port = args.control.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = JsonLineSocket(sock)
    conn.send({"op": "hello", "worker_id": args.worker_id, "pid": os.getpid(), "device": args.device})
    worker = Worker(args.worker_id, args.device)
    pool = ThreadPoolExecutor(16, thread_name_prefix="control")

    def answer(msg: dict[str, Any]) -> None:
        try:
            conn.send(reply_to(worker, msg))
        except OSError:
            pass

    while True:
        try:
            msg = conn.recv()
        except (ConnectionError, OSError):
            break  # the engine is gone; so are we
        if msg["op"] == "shutdown":
            conn.send({"id": msg["id"], "ok": True})
            break
        if msg["op"] in INLINE_OPS:
            answer(msg)
        else:
            pool.submit(answer, msg)
    os._exit(0)  # do not wait for stage loops blocked in recv


if __name__ == "__main__":
    main()
