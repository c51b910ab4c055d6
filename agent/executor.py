"""Carrying out a reconfiguration plan on the workers while the deployment serves.

The phases, in order (each a method below; only `switch` holds any request):
  prepare   requests the plan recomputes (memory cannot hold their KV through the change)
            drop their KV and wait at the head of the queue; the scheduler reserves moving
            requests' blocks on their destinations too and stops admitting to pipelines that
            go away; pools shrink where a worker gains layers
  prefetch  destinations load the layers they gain, from a peer over a transfer channel or
            from the checkpoint, paced so that serving slows by at most `max_overhead`; the
            new pipelines' channels open beside the old ones
  precopy   the old owners of layers that change owner start replicating running requests'
            KV to the new owners: what is written first (paced), then every step's new
            positions right after the step (KV positions never change once written)
  switch    each request moves to its new pipeline at its own token boundary; its KV is
            already there, so nothing holds it; then the epoch flips
  cleanup   once the new pipelines have produced tokens: old channels close, old copies and
            leftover blocks are freed, pools grow where a worker lost layers

Failure or cancellation before the switch aborts: everything the apply added is undone and the
old configuration, which never stopped, keeps serving. A worker lost after the switch (and
before cleanup) rolls back: requests return to the old pipelines, whose copies still exist,
and recompute the KV of the few tokens made since the switch. Either way no request is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from agent.apply_record import ApplyRecord
from agent.control import ControlError
from agent.engine import PipelineEngine, PipelineRuntime, worker_id_of
from agent.pacing import Cancelled
from agent.sequence import Sequence, SequenceStatus
from planner.configuration import Configuration, PipelineConfig
from planner.reconfig import ReconfigPlan, layer_handoffs

log = logging.getLogger("pipeshift.executor")

FIRST_TOKENS_TIMEOUT_S = 60.0
PACE_POLL_S = 0.1  # how often the apply looks whether anything is being served
CALL_TIMEOUT_S = 600.0


class ApplyError(RuntimeError):
    """The apply cannot go on; the message says why and what to do."""


class WorkerLost(ApplyError):
    pass


class ApplyExecutor:
    def __init__(self, engine: PipelineEngine, plan: ReconfigPlan, record: ApplyRecord, max_overhead: float,
                 kv: str = "copy"):
        """`kv` is "copy" (move running requests' KV) or "recompute" (drop it; each request
        recomputes its KV on its new pipeline: the usual way, kept as a baseline)."""
        self.engine, self.plan, self.record = engine, plan, record
        self.max_overhead = max_overhead
        self.kv_mode = kv
        self.cancel = threading.Event()
        self.lost: dict[int, str] = {}
        self.switch_started = False
        self.committed = False  # old pipelines closed: no way back
        self.pool = ThreadPoolExecutor(16, thread_name_prefix="apply")
        # current index -> runtime (the plan's `current` lists serving pipelines by id)
        self.old = sorted(engine.serving_pipelines(), key=lambda r: r.pipeline_id)
        kept_targets = set(plan.kept_pipelines)
        self.kept_old = {i for i, j in plan.pipeline_map.items() if j is not None and j in kept_targets}
        self.affected = [i for i in range(len(self.old)) if i not in self.kept_old]
        self.new: dict[int, PipelineRuntime] = {}  # target index -> runtime (not kept ones)
        self.routes: dict[str, int] = dict(plan.request_routes)  # request -> target index
        self.origin: dict[str, int] = {}  # request -> current index it came from
        self.switch_pos: dict[str, int] = {}
        self.replicating: set[str] = set()  # requests whose KV follows them to their new owners
        self.replication_sources: set[int] = set()
        self.listening: set[str] = set()  # transfer channels a new owner receives on
        self.residents: dict[int, set[str]] = defaultdict(set)  # worker -> requests it held before
        self.imported: dict[int, set[str]] = defaultdict(set)  # worker -> requests given KV here
        self.pool_before: dict[int, int] = {}
        self.capacity_before: dict[int, int] = {}
        self.loaded: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.xfers: dict[tuple[int, int], str] = {}
        self.xfer_locks: dict[tuple[int, int], threading.Lock] = defaultdict(threading.Lock)
        self.changes = {worker_id_of(c.device): c for c in plan.device_changes}
        self.copying = threading.Event()  # set while prefetch and pre-copy run
        self.idle_s = 0.0  # of those, the time nothing was served (copies ran unpaced)

    # ---- the whole apply --------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.prepare()
            self.copying.set()
            threading.Thread(target=self._pace_by_load, name="apply-pace", daemon=True).start()
            try:
                self.prefetch()
                self.precopy()
            finally:
                self.copying.clear()
            self._check()
            self.switch()
        except Exception as exc:
            reason = self._reason(exc)
            if self.switch_started:
                self._fall_back_or_fail(reason)
            else:
                self._abort(reason)
            return
        try:
            self.await_first_tokens()
            self.cleanup()
        except Exception as exc:
            if self.committed:  # the new configuration serves; what is left was tidying up
                log.warning("apply %s: cleanup incomplete: %s", self.record.apply_id, exc)
            else:
                self._fall_back_or_fail(self._reason(exc))
                return
        self._refresh_workers()
        self.record.finish("applied")
        self.pool.shutdown(wait=False)

    def _reason(self, exc: BaseException) -> str:
        if self.lost:
            w, why = next(iter(self.lost.items()))
            return f"worker {w} {why}"
        if (self.cancel.is_set() and not self.switch_started) or isinstance(exc, Cancelled):
            return "cancelled"
        if isinstance(exc, ApplyError | ControlError):
            return str(exc)
        log.exception("apply %s failed", self.record.apply_id)
        return f"{type(exc).__name__}: {exc}"

    def _check(self) -> None:
        """Raises when a worker the apply needs is lost, or (before the switch) on a cancel."""
        if self.lost:
            raise WorkerLost(self._reason(RuntimeError()))
        if self.cancel.is_set() and not self.switch_started:
            raise Cancelled("cancelled")

    # ---- phases ---------------------------------------------------------------------------
    def prepare(self) -> None:
        self.record.begin("prepare")
        engine, plan = self.engine, self.plan
        dropped: list[Sequence] = []

        def reserve() -> None:
            if engine.epoch != plan.epoch_from:
                raise ApplyError(f"the plan was made at epoch {plan.epoch_from}, the deployment is at "
                                 f"epoch {engine.epoch}: plan again")
            sched = engine.scheduler
            for w in self.changes:
                self.pool_before[w] = engine.worker_info[w].num_blocks
                self.capacity_before[w] = sched.worker_capacity.get(w, 0)
            for w, change in self.changes.items():
                if change.new_range is not None or change.old_range is not None:
                    try:
                        sched.set_worker_capacity(w, change.pool_blocks_during)
                    except ValueError as exc:
                        raise ApplyError(f"{exc}: apply when fewer requests are running, or raise --memory-budget") from None
            for i in self.affected:
                slot = sched.pipelines[self.old[i].pipeline_id]
                target = plan.pipeline_map.get(i)
                if target is None:
                    slot.admitting = False
                else:
                    slot.extra_footprint = frozenset(self._target_workers(target))
                for seq in slot.running:
                    self._adopt(seq, i)

        def requeue() -> None:  # after the pools are set (or on failure): none is ever lost
            order = {rid: n for n, rid in enumerate(plan.recompute)}
            for seq in sorted(dropped, key=lambda q: order[q.request_id], reverse=True):
                if seq.request_id in engine._seqs:  # not aborted by its client meanwhile
                    engine.scheduler.waiting.appendleft(seq)

        try:
            self._drop_for_recompute(dropped)
            self._on_scheduler(reserve)
        finally:
            if dropped:
                self._on_scheduler(requeue)
        self._resize_pools({w: c.pool_blocks_during for w, c in self.changes.items()})
        self.record.end("prepare")

    def _drop_for_recompute(self, dropped: list[Sequence]) -> None:
        """Takes the plan's requests to recompute off the affected pipelines and frees their KV
        on the workers; adds them to `dropped`, for `prepare` to put back at the head of the
        queue once the pools are set: admitted again, each prefills its prompt and the tokens
        it has made. A request whose step is in flight is held until the step is done; one with
        members still to fork (n > 1) keeps its KV and moves with it."""
        ids = set(self.plan.recompute)
        workers: dict[int, list[str]] = defaultdict(list)
        sched = self.engine.scheduler

        def take() -> int:  # scheduler thread; returns how many still wait for their step
            waiting = 0
            for i in self.affected:
                for seq in list(sched.pipelines[self.old[i].pipeline_id].running):
                    if seq.request_id not in ids or seq.forks or seq.awaiting_fork:
                        continue
                    if seq.inflight:
                        seq.held, waiting = True, waiting + 1
                        continue
                    sched.unadmit(seq)
                    dropped.append(seq)
                    for w in self.old[i].workers:
                        workers[w].append(seq.request_id)
            return waiting

        while self._on_scheduler(take):
            self._check()
            time.sleep(0.005)
        self._wait_all([self._call_async(w, "free", ids=rids) for w, rids in workers.items()])
        self.record.phases["prepare"].detail["recomputed"] = len(dropped)

    def _adopt(self, seq: Sequence, index: int) -> None:
        """Takes a running request of an affected pipeline into the apply (scheduler thread):
        its route, and its blocks reserved on the destination workers too."""
        rid = seq.request_id
        if rid in self.origin:
            return
        if rid not in self.routes:
            target = self.plan.pipeline_map.get(index)
            self.routes[rid] = target if target is not None else self._least_loaded_target()
        self.origin[rid] = index
        for w in self.old[index].workers:
            self.residents[w].add(rid)
        try:
            self.engine.scheduler.occupy(seq, self._target_workers(self.routes[rid]))
        except ValueError as exc:
            raise ApplyError(f"{exc}: apply when fewer requests are running, or raise --memory-budget") from None

    def _least_loaded_target(self) -> int:
        sched = self.engine.scheduler
        candidates = [j for j in range(len(self.plan.target.pipelines))]

        def load(j: int) -> float:
            return max(sched.worker_used.get(w, 0) / max(1, sched.worker_capacity.get(w, 1))
                       for w in self._target_workers(j))

        return min(candidates, key=load)

    def prefetch(self) -> None:
        prediction = self.plan.prediction
        expected = int(prediction.weight_bytes_from_peer + prediction.weight_bytes_from_disk)
        phase = self.record.begin("prefetch", prediction.prefetch_s, expected)
        self._check()
        self._open_xfers()
        loads = [self.pool.submit(self._load_device, w, c) for w, c in self.changes.items() if c.loads]
        phase.bytes += sum(self._wait_all(loads))
        # The new pipelines' channels open beside the old ones; their loops idle until the switch.
        for j, pipeline in enumerate(self.plan.target.pipelines):
            if j in self.plan.kept_pipelines:
                continue
            placements = [(worker_id_of(s.device), s.start, s.end) for s in pipeline.stages]
            runtime = self.engine._new_runtime(placements, self.plan.epoch_to)
            self.new[j] = runtime
            self.engine.open_pipeline(runtime)
        self.record.bytes_moved += phase.bytes
        self.record.end("prefetch")

    def _pace_by_load(self) -> None:
        """While copies run: gives them all of the time whenever no request is being served
        (nothing to slow down), and `max_overhead` of it again as soon as one is."""
        share = self.max_overhead
        while self.copying.is_set():
            idle = self.engine.active_requests == 0
            wanted = 1.0 if idle else self.max_overhead
            if wanted != share:
                share = wanted
                for w in self._involved():
                    try:
                        self._call(w, "pace", timeout_s=5.0, apply=self.record.apply_id, max_overhead=share)
                    except Exception as exc:  # a lost worker fails the apply elsewhere
                        log.debug("pace worker %d: %s", w, exc)
            if idle:
                self.idle_s += PACE_POLL_S
            time.sleep(PACE_POLL_S)
        self.record.phases["prefetch"].detail["idle_s"] = round(self.idle_s, 2)

    def _open_xfers(self) -> None:
        pairs = {(worker_id_of(load.source), w) for w, c in self.changes.items() for load in c.loads
                 if load.source != "disk"}
        for i in self.affected:
            targets = {self.plan.pipeline_map.get(i)} - {None} or set(range(len(self.plan.target.pipelines)))
            for j in targets:
                for h in layer_handoffs(self.plan.current.pipelines[i], self.plan.target.pipelines[j]):
                    pairs.add((worker_id_of(h.src), worker_id_of(h.dst)))
        store = self.engine._store
        calls = []
        for src, dst in sorted(pairs):
            name = f"{self.record.apply_id}/x{src}-{dst}"
            spec = store.spec(name).to_json()
            self.xfers[(src, dst)] = name
            calls.append(self._call_async(src, "open_xfer", name=name, send=True, spec=spec))
            calls.append(self._call_async(dst, "open_xfer", name=name, send=False, spec=spec))
        self._wait_all(calls)

    def _load_device(self, w: int, change: Any) -> int:
        """Loads every part `w` gains, one load after another; returns the bytes it received."""
        received = 0
        for load in change.loads:
            self._check()
            parts = {"start": load.start, "end": load.end, "embed": load.part == "embed",
                     "head": load.part == "head"}
            if load.part != "layers":
                parts["start"] = parts["end"] = 0
            paced = {"max_overhead": self.max_overhead, "apply": self.record.apply_id}
            self.loaded[w].append(parts)
            began = time.perf_counter()
            sender_work_s = 0.0
            if load.source == "disk":
                reply = self._call(w, "load_parts", source="disk", **parts, **paced)
            else:
                src = worker_id_of(load.source)
                xfer = self.xfers[(src, w)]
                with self.xfer_locks[(src, w)]:
                    sending = self._call_async(src, "send_parts", xfer=xfer, **parts, **paced)
                    loading = self._call_async(w, "load_parts", source=xfer, **parts, **paced)
                    sent, reply = self._wait_all([sending, loading])
                    sender_work_s = sent["work_s"]
            received += int(reply["bytes"])
            self.record.phases["prefetch"].detail.setdefault("loads", []).append({
                "device": f"worker-{w}", "part": load.part, "start": load.start, "end": load.end,
                "source": load.source, "bytes": int(reply["bytes"]), "predicted_s": load.predicted_s,
                "wall_s": round(time.perf_counter() - began, 4), "work_s": round(reply["work_s"], 4),
                "sender_work_s": round(sender_work_s, 4),
            })
        return received

    def precopy(self) -> None:
        """Starts replicating every moving request's KV to its new owners, and waits until what
        was written before is there; from then on each step's new positions follow at once."""
        if self.kv_mode == "recompute":
            return
        phase = self.record.begin("precopy", self.plan.prediction.precopy_s, int(self.plan.prediction.kv_bytes))
        while True:
            self._check()
            fresh = [seq for seq, rid, _ in self._on_scheduler(self._running_affected) if rid not in self.replicating]
            if fresh:
                self._replicate(fresh)
            behind = self._replication_behind()
            phase.detail["behind_tokens"] = behind
            log.debug("precopy: %d positions behind", behind)
            if behind == 0 and not fresh:
                break
            time.sleep(0.05)
        self.record.end("precopy")

    def _running_affected(self) -> list[tuple[Sequence, str, int]]:
        """Returns (request, id, positions computed) of the affected pipelines' running
        requests, adopting any admitted since the last look (scheduler thread)."""
        sched = self.engine.scheduler
        out = []
        for i in self.affected:
            slot = sched.pipelines.get(self.old[i].pipeline_id)
            for seq in slot.running if slot else ():
                self._adopt(seq, i)
                out.append((seq, seq.request_id, seq.num_computed))
        return out

    def _replicate(self, seqs: list[Sequence]) -> None:
        """Has the old owners of these requests' moving runs keep the new owners up to date:
        first the new owners expect them (and listen), then the old owners start sending."""
        sources: dict[str, Any] = {}
        expected: dict[int, dict[str, Any]] = defaultdict(dict)
        for seq in seqs:
            rid = seq.request_id
            old = self.plan.current.pipelines[self.origin[rid]]
            new = self.plan.target.pipelines[self.routes[rid]]
            runs = [[h.start, h.end, worker_id_of(h.src), worker_id_of(h.dst)] for h in layer_handoffs(old, new)]
            old_last, new_last = worker_id_of(old.stages[-1].device), worker_id_of(new.stages[-1].device)
            sampler = [old_last, new_last] if seq.params.temperature > 0 and old_last != new_last else None
            sources[rid] = {"epoch": self.old[self.origin[rid]].epoch, "runs": runs, "sampler": sampler}
            target_epoch = (self.new.get(self.routes[rid]) or self._kept_runtime(self.routes[rid])).epoch
            for dst in {r[3] for r in runs} | ({new_last} if sampler else set()):
                expected[dst][rid] = {"epoch": target_epoch, "runs": [r[:2] for r in runs if r[3] == dst],
                                      "sampler": bool(sampler) and dst == new_last}
            self.replicating.add(rid)
            for w in {r[2] for r in runs} | ({old_last} if sampler else set()):
                self.replication_sources.add(w)
        calls = []
        for dst, entries in expected.items():
            channels = sorted(name for (src, d), name in self.xfers.items() if d == dst and name not in self.listening)
            self.listening.update(channels)
            for rid in entries:
                self.imported[dst].add(rid)
            calls.append(self._call_async(dst, "expect", entries=entries, channels=channels))
        self._wait_all(calls)
        calls = [self._call_async(w, "replicate", apply=self.record.apply_id, entries=sources,
                                  max_overhead=self.max_overhead) for w in sorted(self.replication_sources)]
        self._wait_all(calls)

    def _replication_behind(self) -> int:
        """Returns the positions the new owners still lack, summed over the old owners."""
        calls = [self._call_async(w, "replication") for w in sorted(self.replication_sources)]
        return sum(reply["behind"] for reply in self._wait_all(calls))

    def _stop_replication(self) -> dict[str, float]:
        """Ends replication everywhere; returns how long each request's first new step waited."""
        waited: dict[str, float] = {}
        workers = self.replication_sources | {dst for (_, dst) in self.xfers}
        calls = {}
        for w in sorted(workers):
            if self._alive(w):
                ends = [name for (src, _), name in self.xfers.items() if src == w and name in self.listening]
                calls[w] = self._call_async(w, "replication", stop=True, end_channels=ends)
        for w, call in calls.items():
            try:
                reply = call.result(timeout=30)
            except Exception as exc:
                log.warning("ending replication on worker %d: %s", w, exc)
                continue
            self.record.phases["precopy"].bytes += int(reply["bytes_out"])
            for rid, ms in reply["waited_ms"].items():
                waited[rid] = max(waited.get(rid, 0.0), ms)
        return waited

    def switch(self) -> None:
        """Moves every request of the affected pipelines to its new pipeline at its own token
        boundary. The engine holds nobody: a request's KV already follows it to its new owners
        (agent/handoff.py), its last old step's positions included, and its first new step
        waits only for positions still on their way."""
        self.switch_started = True  # from here a cancel no longer stops the apply
        self.record.begin("switch", self.plan.prediction.stall_ms / 1000)
        engine = self.engine
        done = threading.Event()
        pending: set[str] = set()

        def freeze() -> list[Sequence]:
            for i in self.affected:
                engine.scheduler.pipelines[self.old[i].pipeline_id].admitting = False
            return [seq for seq, _, _ in self._running_affected()]

        late = [seq for seq in self._on_scheduler(freeze) if seq.request_id not in self.replicating]
        if late and self.kv_mode == "copy":  # admitted after pre-copy's last look
            self._replicate(late)
            while self._replication_behind():
                self._check()
                time.sleep(0.01)

        def release(seq: Sequence) -> None:  # scheduler thread
            rid = seq.request_id
            pending.discard(rid)
            if rid in engine._seqs and seq.status is SequenceStatus.RUNNING:
                target = self.routes[rid]
                runtime = self.new.get(target) or self._kept_runtime(target)
                engine.scheduler.move(seq, runtime.pipeline_id)
                seq.held = False
                if self.kv_mode == "recompute":
                    seq.num_computed = 0  # its next step recomputes every position's KV there
                self.switch_pos[rid] = seq.num_computed
            if not pending:
                done.set()

        def on_step_done(seqs: list[Sequence]) -> None:  # scheduler thread
            for seq in seqs:
                # n > 1: members still to fork move with their leader (they fork where it goes)
                for s in (seq, *seq.forks):
                    if s.request_id in pending and not s.inflight:
                        release(s)

        def begin() -> None:  # scheduler thread
            for runtime in self.new.values():
                engine.serve_pipeline(runtime, admitting=False)
            moving = self._running_affected()
            for seq, rid, _ in moving:
                pending.add(rid)
                seq.held = True  # never again to the old pipeline
            engine.step_hook = on_step_done
            # Members whose leader's step in flight may fork them here move once it is done.
            forking = {id(m) for seq, _, _ in moving if seq.inflight for m in seq.forks}
            for seq, _, _ in moving:
                if not seq.inflight and id(seq) not in forking:
                    release(seq)
            if not pending:
                done.set()

        self._on_scheduler(begin)
        while not done.wait(0.05):
            self._check()

            def forget_finished() -> None:
                for rid in [rid for rid in pending if rid not in engine._seqs]:
                    pending.discard(rid)
                if not pending:
                    done.set()

            self._on_scheduler(forget_finished)
        self._on_scheduler(self._finish_switch)
        self.record.phases["switch"].detail["requests"] = len(self.switch_pos)
        self.record.end("switch")

    def _finish_switch(self) -> None:  # scheduler thread
        engine, sched = self.engine, self.engine.scheduler
        engine.step_hook = None
        for i in self.affected:
            runtime = self.old[i]
            slot = sched.pipelines.get(runtime.pipeline_id)
            if slot is not None and not slot.running and not slot.inflight:
                sched.remove_pipeline(runtime.pipeline_id)
            runtime.state = "standby"  # kept open until cleanup: the way back if a worker is lost
        for runtime in self.new.values():
            sched.pipelines[runtime.pipeline_id].admitting = True
        for slot in sched.pipelines.values():
            slot.max_inflight = engine.micro_batches(len(engine.pipelines[slot.pipeline_id].stages))
        engine.epoch = self.plan.epoch_to

    def await_first_tokens(self) -> None:
        """Waits until each new pipeline with requests has completed a step of its own."""
        deadline = time.monotonic() + FIRST_TOKENS_TIMEOUT_S

        def waiting() -> int:
            return sum(1 for seq in self.engine.scheduler.running
                       if seq.request_id in self.switch_pos and seq.num_computed <= self.switch_pos[seq.request_id])

        while self._on_scheduler(waiting):
            self._check()
            if time.monotonic() > deadline:
                raise ApplyError(f"the new pipelines made no token in {FIRST_TOKENS_TIMEOUT_S:.0f} s")
            time.sleep(0.005)
        self._check()

    def cleanup(self) -> None:
        self.record.begin("cleanup")
        engine = self.engine
        waited = self._stop_replication()
        for rid in self.switch_pos:
            self.record.stall_ms_by_request[rid] = waited.get(rid, 0.0)
        self.record.stall_ms = max(self.record.stall_ms_by_request.values(), default=0.0)
        self.record.bytes_moved += self.record.phases["precopy"].bytes

        def retire() -> dict[int, list[str]]:
            sched = engine.scheduler
            for i in self.affected:
                engine.close_pipeline(self.old[i])
                engine.pipelines.pop(self.old[i].pipeline_id, None)
            keep: dict[int, set[str]] = defaultdict(set)
            for seq in sched.running:
                workers = engine.pipelines[seq.pipeline_id].workers
                sched.vacate(seq, seq.footprint - set(workers))
                for w in workers:
                    keep[w].add(seq.request_id)
            for slot in sched.pipelines.values():
                slot.extra_footprint = frozenset()
            return {w: sorted((self.residents[w] | self.imported[w]) - keep[w])
                    for w in set(self.residents) | set(self.imported)}

        frees = self._on_scheduler(retire)
        self.committed = True  # the old pipelines are closed: from here on, only forward
        calls = [self._call_async(w, "free", ids=ids) for w, ids in frees.items() if ids and self._alive(w)]
        for w, change in self.changes.items():
            for free in change.frees:
                if self._alive(w):
                    calls.append(self._call_async(w, "drop_parts", **_parts_of(free)))
        for c in calls:
            self._best_effort(c.result)
        after = {w: c.pool_blocks_after for w, c in self.changes.items()}
        self._best_effort(lambda: self._resize_pools(after))
        self._on_scheduler(lambda: self._set_capacities(after))
        self._close_xfers()
        self.record.end("cleanup")

    # ---- undoing ------------------------------------------------------------------------------
    def _abort(self, reason: str) -> None:
        """Undoes everything before the switch; the old configuration never stopped serving."""
        log.warning("apply %s aborted: %s", self.record.apply_id, reason)
        self._stop_transfers()
        engine = self.engine

        def restore() -> None:
            sched = engine.scheduler
            engine.step_hook = None
            for runtime in self.new.values():
                if runtime.pipeline_id in sched.pipelines:
                    sched.remove_pipeline(runtime.pipeline_id)
                engine.close_pipeline(runtime)
                engine.pipelines.pop(runtime.pipeline_id, None)
            for i in self.affected:
                slot = sched.pipelines[self.old[i].pipeline_id]
                slot.admitting, slot.extra_footprint = True, frozenset()
                for seq in slot.running:
                    seq.held = False
                    sched.vacate(seq, seq.footprint - set(self.old[i].workers))

        self._best_effort(lambda: self._on_scheduler(restore))
        self._undo_on_workers()
        self._best_effort(lambda: self._on_scheduler(self._restore_capacity))
        self._refresh_workers()
        self.record.finish("aborted", reason)

    def _fall_back_or_fail(self, reason: str) -> None:
        """After the switch: requests return to the old pipelines and recompute what they
        made since; unless a worker of the old pipelines is gone too."""
        engine = self.engine
        old_workers = {w for i in self.affected for w in self.old[i].workers}
        if any(w in old_workers for w in self.lost):
            self._stop_transfers()
            self.record.finish("failed", f"{reason}; the old pipelines lost it too, so nothing was left to fall back on")
            self._best_effort(lambda: self._on_scheduler(lambda: engine._fail_pipeline(reason)))
            return
        log.warning("apply %s rolls back: %s", self.record.apply_id, reason)
        self._stop_transfers()

        def roll_back() -> None:
            sched = engine.scheduler
            engine.step_hook = None
            for i in self.affected:
                runtime = self.old[i]
                runtime.state = "serving"
                if runtime.pipeline_id not in sched.pipelines:
                    sched.add_pipeline(runtime.pipeline_id, runtime.workers, 1)
                slot = sched.pipelines[runtime.pipeline_id]
                slot.admitting, slot.extra_footprint = True, frozenset()
            for runtime in self.new.values():
                slot = sched.pipelines.get(runtime.pipeline_id)
                for mb_id in list(slot.inflight) if slot else ():
                    sched.fail(mb_id)  # their results, if any arrive, are dropped
                for seq in list(slot.running) if slot else ():
                    rid = seq.request_id
                    index = self.origin.get(rid)
                    if index is None:  # admitted after the switch: its KV exists only there
                        self._requeue(seq, runtime)
                        continue
                    seq.num_computed = min(seq.num_computed, self.switch_pos.get(rid, seq.num_computed))
                    sched.move(seq, self.old[index].pipeline_id)
                    seq.held = False
                    sched.vacate(seq, seq.footprint - set(self.old[index].workers))
                if runtime.pipeline_id in sched.pipelines:
                    sched.remove_pipeline(runtime.pipeline_id)
                engine.close_pipeline(runtime)
                engine.pipelines.pop(runtime.pipeline_id, None)
            for i in self.affected:
                for seq in sched.pipelines[self.old[i].pipeline_id].running:
                    seq.held = False
            for slot in sched.pipelines.values():
                slot.max_inflight = engine.micro_batches(len(engine.pipelines[slot.pipeline_id].stages))
            engine.epoch = self.plan.epoch_from

        try:
            self._on_scheduler(roll_back)
        except Exception as exc:
            log.exception("roll back failed")
            self.record.finish("failed", f"{reason}; rolling back failed too: {exc}")
            self._best_effort(lambda: self._on_scheduler(lambda: engine._fail_pipeline(reason)))
            return
        self._undo_on_workers()
        self._best_effort(lambda: self._on_scheduler(self._restore_capacity))
        self._refresh_workers()
        self.record.finish("rolled_back", reason)

    def _requeue(self, seq: Sequence, runtime: PipelineRuntime) -> None:
        """Puts a request whose KV exists only on a pipeline being closed back at the head of
        the queue; once admitted again it recomputes its KV from its tokens (scheduler thread)."""
        sched = self.engine.scheduler
        sched.unadmit(seq)
        for w in runtime.workers:
            self.imported[w].add(seq.request_id)  # its blocks there are freed by the undo
        sched.waiting.appendleft(seq)

    def _restore_capacity(self) -> None:  # scheduler thread
        sched = self.engine.scheduler
        for w, blocks in self.capacity_before.items():
            sched.worker_capacity[w] = max(blocks, sched.worker_used.get(w, 0))

    def _undo_on_workers(self) -> None:
        """Frees imported KV, drops gained parts, restores pools, closes transfer channels."""
        calls = []
        for w, rids in self.imported.items():
            ids = sorted(rids - self.residents[w])
            if ids and self._alive(w):
                calls.append(self._call_async(w, "free", ids=ids))
        for w, parts in self.loaded.items():
            change = self.changes[w]
            if not self._alive(w):
                continue
            for p in parts:
                old = change.old_range or (0, 0)
                start = max(p["start"], 0)
                layers = [i for i in range(start, p["end"]) if not old[0] <= i < old[1]]
                embed = p["embed"] and old[0] != 0
                head = p["head"] and old[1] != self.engine.arch.n_layers
                if layers or embed or head:
                    lo, hi = (min(layers), max(layers) + 1) if layers else (0, 0)
                    calls.append(self._call_async(w, "drop_parts", start=lo, end=hi, embed=embed, head=head))
        for c in calls:
            self._best_effort(c.result)
        self._best_effort(lambda: self._resize_pools(self.pool_before))
        self._close_xfers()

    def _stop_transfers(self) -> None:
        self.cancel.set()
        if self.replication_sources:
            self._best_effort(self._stop_replication)
        for w in self._involved():
            if self._alive(w):
                self._best_effort(lambda w=w: self._call(w, "cancel", timeout_s=5.0, apply=self.record.apply_id))

    def _close_xfers(self) -> None:
        for (src, dst), name in self.xfers.items():
            for w in (src, dst):
                if self._alive(w):
                    self._best_effort(lambda w=w, name=name: self._call(w, "close_xfer", timeout_s=10.0, name=name))
        self.xfers.clear()

    # ---- failures reported by the engine ---------------------------------------------------
    def on_worker_lost(self, worker_id: int, reason: str) -> bool:
        """Called on the scheduler thread; returns True when this apply absorbs the loss (the
        engine then does not fail): before the switch any worker the old pipelines do not
        need, after it any worker only the new pipelines used."""
        if worker_id not in self._involved() or self.committed:
            return False
        old_workers = {w for i in self.affected for w in self.old[i].workers}
        new_workers = {w for r in self.new.values() for w in r.workers}
        self.lost[worker_id] = reason
        self.cancel.set()
        if not self.switch_started:
            return worker_id not in old_workers
        return not (worker_id in old_workers and worker_id in new_workers)

    def _involved(self) -> set[int]:
        workers = set(self.changes)
        workers.update(w for pair in self.xfers for w in pair)
        workers.update(w for i in self.affected for w in self.old[i].workers)
        workers.update(w for r in self.new.values() for w in r.workers)
        return workers

    # ---- plumbing ---------------------------------------------------------------------------
    def _target_workers(self, target: int) -> list[int]:
        return [worker_id_of(s.device) for s in self.plan.target.pipelines[target].stages]

    def _kept_runtime(self, target: int) -> PipelineRuntime:
        for i, j in self.plan.pipeline_map.items():
            if j == target:
                return self.old[i]
        raise ApplyError(f"no runtime serves target pipeline {target}")

    def _resize_pools(self, blocks: dict[int, int]) -> None:
        """Resizes worker pools (workers that end up holding nothing keep theirs)."""
        calls = {}
        for w, n in blocks.items():
            if self._alive(w) and n and n != self.engine.worker_info[w].num_blocks:
                calls[w] = self._call_async(w, "resize_pool", num_blocks=n)
        for w, reply in zip(calls, self._wait_all(list(calls.values())), strict=True):
            self.engine.worker_info[w].num_blocks = reply["num_blocks"]

    def _set_capacities(self, blocks: dict[int, int]) -> None:  # scheduler thread
        sched = self.engine.scheduler
        for w, n in blocks.items():
            sched.set_worker_capacity(w, max(n, sched.worker_used.get(w, 0)))

    def _refresh_workers(self) -> None:
        """Reads back what each involved worker holds now, so the deployment says it at once."""
        for w in sorted(self._involved()):
            if self._alive(w):
                try:
                    reply = self._call(w, "ping", timeout_s=10.0)
                except Exception as exc:
                    log.warning("worker %d after the apply: %s", w, exc)
                    continue
                info = self.engine.worker_info[w]
                info.layers, info.num_blocks = reply["layers"], reply["num_blocks"]
                info.weight_bytes, info.rss_bytes = reply["weight_bytes"], reply["rss_bytes"]

    def _alive(self, w: int) -> bool:
        return w not in self.lost and self.engine.worker_info[w].alive

    def _call(self, w: int, op: str, timeout_s: float = CALL_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        if not self._alive(w):
            raise WorkerLost(f"worker {w} is gone")
        return self.engine.workers[w].call(op, timeout_s=timeout_s, **fields)

    def _call_async(self, w: int, op: str, **fields: Any) -> Future:
        return self.pool.submit(self._call, w, op, **fields)

    def _wait_all(self, futures: list[Future]) -> list[Any]:
        """Returns the futures' results in order; raises the first failure as soon as it
        happens, or as soon as a worker the apply needs is lost (a call to a live worker
        that waits on a dead one must not hold the apply)."""
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            for f in finished:
                if f.exception() is not None:
                    raise f.exception()
            if pending and self.lost:
                raise WorkerLost(self._reason(RuntimeError()))
        return [f.result() for f in futures]

    def _on_scheduler(self, fn: Callable[[], Any]) -> Any:
        return self.engine.on_scheduler(fn)

    @staticmethod
    def _best_effort(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:
            log.warning("while undoing an apply: %s", exc)


def _parts_of(free: Any) -> dict[str, Any]:
    if free.part == "layers":
        return {"start": free.start, "end": free.end, "embed": False, "head": False}
    return {"start": 0, "end": 0, "embed": free.part == "embed", "head": free.part == "head"}


def configuration_of(engine: PipelineEngine) -> Configuration:
    """Returns the serving configuration with worker names as devices, pipelines by id."""
    from planner.configuration import StageConfig

    return Configuration(tuple(
        PipelineConfig(tuple(StageConfig(f"worker-{s.worker_id}", s.start, s.end) for s in runtime.stages))
        for runtime in sorted(engine.serving_pipelines(), key=lambda r: r.pipeline_id)
    ))
