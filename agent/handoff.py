"""Moving running requests' KV to their new owners while they keep decoding: replication.

From the pre-copy phase until the switch, every old owner of a layer run that changes owner
keeps the new owner's copy of each moving request's KV up to date:

- `replicate` registers the requests; a background thread sends what is already written
  (paced, so serving slows by at most `max_overhead`), a run of positions at a time;
- once a request is caught up, `wrote` - called by the stage loop right after each step has
  been passed on - sends that step's new positions at once, all requests of the step to one
  destination in one message. KV positions never change once written, so nothing is sent
  twice; the sampler state of a sampled request goes along, tagged with its position.

The new owner (`expect`) imports what arrives and tracks, per request and run, how many
positions it holds. A step of the new epoch waits until it holds every position before the
step's start (`wait_for`). At the switch nothing is left to copy: a request's last old step
has sent its positions before its result even reached the engine, so the wait is nothing,
and no control round trip lies on a request's way from its old pipeline to its new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from agent.kv_cache import PagedKVCache
from agent.pacing import Cancelled, Pacer
from agent.sampler import Sampler
from agent.transport import Channel

log = logging.getLogger(__name__)

WAIT_TIMEOUT_S = 30.0
BACKLOG_CHUNK_TOKENS = 256  # positions per message while catching up
CATCH_UP_TOKENS = 32  # a gap this small is closed at once, holding steps back for its copy


@dataclass
class _Outgoing:
    """A request this worker replicates: its runs [(start, end, destination)] and progress."""

    epoch: int  # the wiring whose steps write what is replicated (the old pipeline's)
    runs: list[tuple[int, int, int]]
    sampler_to: int | None
    sent: int = 0  # positions [0, sent) are at every destination (or on their way)


@dataclass
class _Incoming:
    runs: list[tuple[int, int]]
    sampler: bool
    epoch: int
    have: dict[tuple[int, int], int] = field(default_factory=dict)  # run -> positions held
    sampler_at: int = -1  # the position the sampler state was sent at


class Handoffs:
    def __init__(self, worker_id: int, kv: PagedKVCache, sampler: Sampler, xfer: Callable[[str], Channel]):
        self.worker_id = worker_id
        self.kv, self.sampler = kv, sampler
        self._xfer = xfer  # name -> channel
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._written: dict[tuple[int, str], int] = {}  # (wiring epoch, request) -> positions computed
        self._out: dict[str, _Outgoing] = {}
        self._in: dict[str, _Incoming] = {}
        self._apply = ""
        self._pacer: Pacer | None = None
        self._backlog: threading.Thread | None = None
        self.waited_ms: dict[str, float] = {}
        self.bytes_in = self.bytes_out = 0

    # ---- the old owner ------------------------------------------------------------------------
    def replicate(self, apply: str, entries: dict[str, Any], max_overhead: float | Callable[[], float],
                  cancel: threading.Event | None = None) -> None:
        """Starts keeping the new owners of these requests' runs (those this worker is the
        source of) up to date. `entries`: request -> {"epoch": its old wiring's epoch,
        "runs": [[start, end, src, dst]], "sampler": [src, dst] | None}."""
        with self._lock:
            self._apply = apply
            self._pacer = self._pacer or Pacer(max_overhead, cancel)
            for rid, entry in entries.items():
                runs = [(a, b, dst) for a, b, src, dst in entry["runs"] if src == self.worker_id]
                sampler = entry.get("sampler")
                sampler_to = sampler[1] if sampler and sampler[0] == self.worker_id else None
                if (runs or sampler_to is not None) and rid not in self._out:
                    self._out[rid] = _Outgoing(int(entry["epoch"]), runs, sampler_to)
            if self._backlog is None or not self._backlog.is_alive():
                self._backlog = threading.Thread(target=self._catch_up, name="replicate", daemon=True)
                self._backlog.start()

    def behind(self) -> int:
        """Returns how many positions the replicated requests still lack at their destinations."""
        with self._lock:
            return sum(max(0, self._written.get((out.epoch, rid), 0) - out.sent) for rid, out in self._out.items()
                       if rid in self.kv.block_tables)

    def stop_replicating(self) -> None:
        with self._lock:
            self._out.clear()
            self._pacer = None

    def _catch_up(self) -> None:
        """Sends what the registered requests had already written, a chunk at a time, paced.
        The last few positions of a request go under the lock that `wrote` takes, so that no
        step slips in between: from then on `wrote` sends each step's positions itself."""
        while True:
            with self._lock:
                todo = [(rid, out) for rid, out in self._out.items()
                        if out.sent < self._written.get((out.epoch, rid), 0) and rid in self.kv.block_tables]
                pacer = self._pacer
            if not todo or pacer is None:
                return
            for rid, out in todo:
                with self._lock:
                    if self._out.get(rid) is not out:
                        continue
                    t0, written = out.sent, self._written.get((out.epoch, rid), 0)
                    if written - t0 <= CATCH_UP_TOKENS:  # the tail: close the gap for good
                        self._send_batches(self._export({rid: (out, t0, written)}))
                        out.sent = written
                        continue
                    t1 = t0 + min(written - t0, BACKLOG_CHUNK_TOKENS)
                try:
                    with pacer.piece(rest=False):
                        batches = self._export({rid: (out, t0, t1)})
                    self._send_batches(batches)
                    with self._lock:
                        out.sent = max(out.sent, t1)
                    pacer.rest()
                except Cancelled:
                    return

    def wrote(self, epoch: int, request_ids: list[str], ends: list[int]) -> None:
        """Notes that a step of wiring `epoch` computed positions up to `ends` (the stage loop
        calls it after passing the step on) and sends the new positions of caught-up requests
        replicated from that wiring."""
        due: dict[str, tuple[_Outgoing, int, int]] = {}
        with self._lock:
            for rid, end in zip(request_ids, ends, strict=True):
                before = self._written.get((epoch, rid), 0)
                self._written[(epoch, rid)] = max(before, end)
                out = self._out.get(rid)
                if out is None or out.epoch != epoch:
                    continue
                if out.sent == before and end > before:
                    due[rid] = (out, before, end)
                    out.sent = end
        if due:
            self._send_batches(self._export(due))

    def forget(self, request_ids: list[str]) -> None:
        with self._lock:
            gone = set(request_ids)
            for key in [k for k in self._written if k[1] in gone]:
                del self._written[key]
            for rid in gone:
                self._out.pop(rid, None)

    def _export(self, due: dict[str, tuple[_Outgoing, int, int]]) -> dict[int, tuple[list, list]]:
        """Returns per destination the (items, tensors) of one message for these requests."""
        batches: dict[int, tuple[list, list]] = {}
        for rid, (out, t0, t1) in due.items():
            for start, end, dst in out.runs:
                if t1 <= t0:
                    continue
                try:
                    kv = self.kv.export(rid, range(start, end), range(t0, t1))
                except KeyError:  # freed meanwhile: the request finished
                    continue
                items, tensors = batches.setdefault(dst, ([], []))
                items.append(["kv", rid, start, end, t0, t1])
                tensors.append(kv)
            if out.sampler_to is not None:  # no state yet: the new last stage seeds it as the old would
                state = self.sampler.export_states([rid]).get(rid, torch.empty(0, dtype=torch.uint8))
                items, tensors = batches.setdefault(out.sampler_to, ([], []))
                items.append(["sampler", rid, t1])
                tensors.append(state)
        return batches

    def _send_batches(self, batches: dict[int, tuple[list, list]]) -> None:
        for dst, (items, tensors) in batches.items():
            try:
                self._xfer(f"{self._apply}/x{self.worker_id}-{dst}").send({"op": "kv", "items": items}, tensors)
                self.bytes_out += sum(t.numel() * t.element_size() for t in tensors)
            except Exception as exc:  # the new side failed: the engine aborts or rolls back
                log.warning("replicating to worker %s failed: %s", dst, exc)

    def end_channels(self, names: list[str]) -> None:
        """Tells the receivers on these channels that nothing more comes."""
        for name in names:
            try:
                self._xfer(name).send({"op": "end"})
            except Exception as exc:
                log.warning("ending %s failed: %s", name, exc)

    # ---- the new owner ------------------------------------------------------------------------
    def expect(self, entries: dict[str, Any], channels: list[str]) -> list[threading.Thread]:
        """Registers the runs each request will receive here (`entries`: request ->
        {"epoch": the wiring it will run on here, "runs": [[start, end]], "sampler": bool}) and
        starts a receiver per new channel. That wiring's steps of the request wait for them."""
        with self._lock:
            for rid, entry in entries.items():
                if rid not in self._in:
                    runs = [tuple(r) for r in entry["runs"]]
                    self._in[rid] = _Incoming(runs, bool(entry.get("sampler")), int(entry["epoch"]),
                                              have={r: 0 for r in runs})
        threads = [threading.Thread(target=self._receive, args=(name,), name=f"receive-{name}", daemon=True)
                   for name in channels]
        for t in threads:
            t.start()
        return threads

    def _receive(self, name: str) -> None:
        channel = self._xfer(name)
        while True:
            try:
                header, tensors = channel.recv()
            except Exception as exc:  # the old owner died: the engine aborts or rolls back
                log.warning("replication channel %s: %s", name, exc)
                return
            if header["op"] == "end":
                return
            for item, tensor in zip(header["items"], tensors, strict=True):
                try:
                    self._take(item, tensor)
                except Exception:  # a step that needs it times out and says so
                    log.exception("importing %s failed", item)

    def _take(self, item: list, tensor) -> None:
        if item[0] == "kv":
            _, rid, start, end, t0, t1 = item
            self.kv.import_(rid, range(start, end), range(t0, t1), tensor)
            self.bytes_in += tensor.numel() * tensor.element_size()
        else:
            _, rid, t1 = item
            if tensor.numel():
                self.sampler.import_state(rid, tensor)
        with self._changed:
            incoming = self._in.get(rid)
            if incoming is not None:
                if item[0] == "kv":
                    incoming.have[(start, end)] = max(incoming.have.get((start, end), 0), t1)
                else:
                    incoming.sampler_at = max(incoming.sampler_at, t1)
            self._changed.notify_all()

    def wait_for(self, epoch: int, request_ids: list[str], starts: list[int]) -> None:
        """Blocks a step of `epoch` until this worker holds every position before each
        request's start (and its sampler state as of it); no-op for other requests."""
        if not self._in:  # every step calls this; nothing is on its way except during an apply
            return
        began = time.perf_counter()
        deadline = began + WAIT_TIMEOUT_S
        with self._changed:
            for rid, start in zip(request_ids, starts, strict=True):
                incoming = self._in.get(rid)
                if incoming is None or incoming.epoch != epoch:
                    continue
                waited = False
                while not self._holds(incoming, start):
                    waited = True
                    if not self._changed.wait(max(0.0, deadline - time.perf_counter())):
                        raise TimeoutError(f"the KV of request {rid} did not reach position {start} here "
                                           f"within {WAIT_TIMEOUT_S:.0f} s")
                if waited:
                    self.waited_ms[rid] = 1000 * (time.perf_counter() - began)
                else:
                    self.waited_ms.setdefault(rid, 0.0)
                del self._in[rid]  # from here on its own steps write its KV

    @staticmethod
    def _holds(incoming: _Incoming, start: int) -> bool:
        runs_ok = all(have >= start for have in incoming.have.values())
        return runs_ok and (not incoming.sampler or incoming.sampler_at >= start)

    def stop_expecting(self) -> None:
        with self._changed:
            self._in.clear()
            self._changed.notify_all()
