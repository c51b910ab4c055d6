"""agent.scheduler: admission by reserved KV blocks, micro-batching, prefill chunking."""

from __future__ import annotations

import pytest

from agent.engine_api import SamplingParams
from agent.scheduler import Scheduler
from agent.sequence import Sequence, SequenceStatus


def make_seq(request_id: str, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(
        request_id=request_id,
        prompt_ids=list(range(prompt_len)),
        params=SamplingParams(max_tokens=max_tokens),
        emit=lambda event: None,
    )


def decoding(seq: Sequence) -> Sequence:
    """Puts `seq` past its prefill, with one sampled token waiting to be fed back."""
    seq.num_computed = len(seq.prompt_ids)
    seq.output_ids.append(7)
    return seq


def make_scheduler(**kwargs) -> Scheduler:
    defaults = dict(capacity_blocks=10, block_size=4, max_context=1024, max_inflight=2)
    return Scheduler(**(defaults | kwargs))


def run_all(sched: Scheduler, *seqs: Sequence) -> None:
    for seq in seqs:
        sched.add(seq)
    assert sched.admit() == list(seqs)


# ---- admission ----------------------------------------------------------------------------
def test_blocks_needed_covers_prompt_plus_max_tokens_capped_by_context():
    sched = make_scheduler(block_size=4, max_context=64)
    assert sched.blocks_needed(10, 6) == 4
    assert sched.blocks_needed(10, 7) == 5
    assert sched.blocks_needed(60, 100) == 16  # never more than max_context positions


def test_admits_in_arrival_order_while_reserved_blocks_fit():
    sched = make_scheduler(capacity_blocks=10)
    a, b, c = make_seq("a", 10, 6), make_seq("b", 10, 6), make_seq("c", 10, 6)  # 4 blocks each
    for seq in (a, b, c):
        sched.add(seq)
    assert sched.admit() == [a, b]
    assert sched.running == [a, b]
    assert list(sched.waiting) == [c]
    assert sched.used_blocks == 8
    assert (a.reserved_blocks, b.reserved_blocks, c.reserved_blocks) == (4, 4, 0)
    assert a.status is b.status is SequenceStatus.RUNNING
    assert c.status is SequenceStatus.WAITING
    assert sched.admit() == []  # nothing changed, nothing admitted


def test_request_that_does_not_fit_waits_at_head_of_line_until_another_finishes():
    sched = make_scheduler(capacity_blocks=10)
    a, b = make_seq("a", 10, 6), make_seq("b", 10, 6)
    big = make_seq("big", 12, 8)  # 5 blocks: does not fit beside a and b
    small = make_seq("small", 2, 2)  # 1 block: would fit, but arrived after big
    for seq in (a, b, big, small):
        sched.add(seq)
    assert sched.admit() == [a, b]
    assert list(sched.waiting) == [big, small]
    assert sched.admit() == []

    # Nothing running is evicted to make room.
    assert sched.running == [a, b]
    assert a.status is b.status is SequenceStatus.RUNNING
    assert (a.reserved_blocks, b.reserved_blocks) == (4, 4)

    sched.finish(a)
    assert sched.admit() == [big, small]
    assert sched.running == [b, big, small]
    assert sched.used_blocks == 4 + 5 + 1
    assert not sched.waiting


def test_finish_releases_reserved_blocks():
    sched = make_scheduler(capacity_blocks=10)
    a, b = make_seq("a", 10, 6), make_seq("b", 3, 1)
    run_all(sched, a, b)
    assert sched.used_blocks == 5
    sched.finish(a)
    assert sched.used_blocks == 1
    assert a.reserved_blocks == 0
    assert a.status is SequenceStatus.FINISHED
    assert sched.running == [b]
    sched.finish(a)  # a second finish does not release anything twice
    assert sched.used_blocks == 1


def test_finish_of_a_waiting_request_removes_it_from_the_queue():
    sched = make_scheduler(capacity_blocks=4)
    a, b = make_seq("a", 10, 6), make_seq("b", 10, 6)
    sched.add(a)
    sched.add(b)
    assert sched.admit() == [a]
    sched.finish(b)
    assert not sched.waiting
    assert b.status is SequenceStatus.FINISHED
    assert sched.used_blocks == 4


# ---- micro-batches ------------------------------------------------------------------------
def test_micro_batches_spread_running_requests_over_max_inflight():
    sched = make_scheduler(capacity_blocks=100, max_inflight=2)
    seqs = [decoding(make_seq(f"r{i}", 4, 4)) for i in range(5)]
    run_all(sched, *seqs)
    first = sched.next_micro_batch()
    second = sched.next_micro_batch()
    assert first is not None and second is not None
    assert (len(first.seqs), len(second.seqs)) == (3, 2)
    assert {s.request_id for s in first.seqs + second.seqs} == {s.request_id for s in seqs}
    assert sched.next_micro_batch() is None  # max_inflight batches are out
    assert len(sched.inflight) == 2
    # Decode steps feed the last sampled token at the next position.
    assert first.tokens == [[7]] * 3
    assert first.start_pos == [4] * 3
    assert all(s.inflight for s in seqs)


def test_in_flight_micro_batches_never_exceed_max_inflight():
    sched = make_scheduler(capacity_blocks=100, max_inflight=3)
    seqs = [decoding(make_seq(f"r{i}", 4, 8)) for i in range(7)]
    run_all(sched, *seqs)
    for _ in range(20):
        while (mb := sched.next_micro_batch()) is not None:
            assert len(sched.inflight) <= 3
            ids = [s.request_id for s in mb.seqs]
            assert len(ids) == len(set(ids))
        assert len(sched.inflight) == 3
        in_flight = [s for mb in sched.inflight.values() for s in mb.seqs]
        assert len(in_flight) == len({id(s) for s in in_flight})  # no request in two batches
        sched.complete(min(sched.inflight))


def test_micro_batch_size_is_capped_by_max_batch_size():
    sched = make_scheduler(capacity_blocks=100, max_inflight=1, max_batch_size=4)
    run_all(sched, *[decoding(make_seq(f"r{i}", 4, 4)) for i in range(6)])
    mb = sched.next_micro_batch()
    assert mb is not None and len(mb.seqs) == 4


def test_idle_scheduler_gives_no_micro_batch():
    sched = make_scheduler()
    assert sched.next_micro_batch() is None


def test_long_prompt_is_prefilled_in_chunks_of_max_prefill_tokens():
    sched = make_scheduler(capacity_blocks=1000, max_inflight=1, max_prefill_tokens=512)
    seq = make_seq("long", 1000, 10)
    run_all(sched, seq)

    mb = sched.next_micro_batch()
    assert mb is not None
    assert (mb.start_pos, mb.num_new) == ([0], [512])
    assert mb.tokens[0] == seq.prompt_ids[:512]
    assert sched.complete(mb.mb_id) is mb
    assert seq.num_computed == 512 and seq.in_prefill

    mb = sched.next_micro_batch()
    assert mb is not None
    assert (mb.start_pos, mb.num_new) == ([512], [488])
    assert mb.tokens[0] == seq.prompt_ids[512:]
    sched.complete(mb.mb_id)
    assert seq.num_computed == 1000 and not seq.in_prefill
    assert not seq.inflight


def test_prefill_budget_is_shared_within_a_micro_batch():
    sched = make_scheduler(capacity_blocks=1000, max_inflight=1, max_prefill_tokens=512)
    a, b, c = make_seq("a", 400, 4), make_seq("b", 400, 4), make_seq("c", 400, 4)
    d = decoding(make_seq("d", 4, 4))
    run_all(sched, a, b, c, d)
    mb = sched.next_micro_batch()
    assert mb is not None
    # a takes 400, b the remaining 112, c waits; the decode step still rides along.
    assert [s.request_id for s in mb.seqs] == ["a", "b", "d"]
    assert mb.num_new == [400, 112, 1]
    assert sum(n for s, n in zip(mb.seqs, mb.num_new, strict=True) if s.in_prefill) <= 512


def test_complete_advances_num_computed_and_fail_does_not():
    sched = make_scheduler(capacity_blocks=100, max_inflight=2)
    a = make_seq("a", 6, 4)
    b = decoding(make_seq("b", 5, 4))
    run_all(sched, a, b)
    mb = sched.next_micro_batch()
    assert mb is not None and mb.seqs == [a]  # two running over two batches: one each
    sched.fail(mb.mb_id)
    assert a.num_computed == 0 and not a.inflight
    assert mb.mb_id not in sched.inflight

    mb_a = sched.next_micro_batch()  # a is retried from where it was
    mb_b = sched.next_micro_batch()
    assert mb_a is not None and mb_b is not None
    assert (mb_a.seqs, mb_a.start_pos, mb_a.num_new) == ([a], [0], [6])
    assert (mb_b.seqs, mb_b.start_pos, mb_b.num_new) == ([b], [5], [1])
    sched.complete(mb_b.mb_id)
    assert b.num_computed == 6 and a.num_computed == 0
    sched.complete(mb_a.mb_id)
    assert a.num_computed == 6
    assert not sched.inflight


@pytest.mark.parametrize("max_inflight", [1, 2, 4])
def test_every_running_request_gets_a_step_within_max_inflight_batches(max_inflight):
    sched = make_scheduler(capacity_blocks=100, max_inflight=max_inflight)
    seqs = [decoding(make_seq(f"r{i}", 4, 4)) for i in range(5)]
    run_all(sched, *seqs)
    batches = [sched.next_micro_batch() for _ in range(max_inflight)]
    stepped = {s.request_id for mb in batches if mb is not None for s in mb.seqs}
    assert stepped == {s.request_id for s in seqs}


# ---- several pipelines and per-worker blocks ----------------------------------------------
def two_pipelines(capacity: int = 10) -> Scheduler:
    sched = Scheduler(block_size=4, max_context=1024)
    for w in range(4):
        sched.set_worker_capacity(w, capacity)
    sched.add_pipeline(0, (0, 1), max_inflight=1)
    sched.add_pipeline(1, (2, 3), max_inflight=1)
    return sched


def test_new_requests_go_to_the_least_loaded_pipeline():
    sched = two_pipelines()
    a, b, c = make_seq("a", 10, 6), make_seq("b", 2, 2), make_seq("c", 2, 2)  # 4, 1, 1 blocks
    run_all(sched, a, b, c)
    assert (a.pipeline_id, b.pipeline_id, c.pipeline_id) == (0, 1, 1)
    assert sched.worker_used == {0: 4, 1: 4, 2: 2, 3: 2}
    assert sched.capacity_blocks == 10


def test_each_pipeline_keeps_its_own_micro_batches_in_flight():
    sched = two_pipelines()
    seqs = [decoding(make_seq(f"r{i}", 4, 4)) for i in range(4)]
    run_all(sched, *seqs)
    first, second = sched.next_micro_batch(0), sched.next_micro_batch(1)
    assert first is not None and second is not None
    assert {s.pipeline_id for s in first.seqs} == {0} and {s.pipeline_id for s in second.seqs} == {1}
    assert sched.next_micro_batch(0) is None  # max_inflight 1 each
    sched.complete(first.mb_id)
    assert sched.next_micro_batch(0) is not None


def test_a_request_occupies_every_worker_of_its_footprint_until_vacated():
    sched = two_pipelines(capacity=6)
    a = make_seq("a", 10, 6)  # 4 blocks
    run_all(sched, a)
    sched.occupy(a, (2, 3))  # a reconfiguration will move it to pipeline 1
    assert sched.worker_used == {0: 4, 1: 4, 2: 4, 3: 4}
    b = make_seq("b", 10, 6)
    sched.add(b)
    assert sched.admit() == []  # 4 + 4 > 6 on every worker
    c = make_seq("c", 10, 6)
    c.reserved_blocks = 4
    with pytest.raises(ValueError, match="worker 2, which has 2 free"):
        sched.occupy(c, (2,))
    sched.move(a, 1)
    sched.vacate(a, (0, 1))
    assert a.footprint == {2, 3} and sched.pipelines[1].running == [a]
    assert sched.admit() == [b] and b.pipeline_id == 0
    sched.finish(a)
    assert sched.worker_used == {0: 4, 1: 4, 2: 0, 3: 0}


def test_held_requests_get_no_step_and_closed_pipelines_admit_nobody():
    sched = two_pipelines()
    a, b = decoding(make_seq("a", 4, 4)), decoding(make_seq("b", 4, 4))
    run_all(sched, a, b)
    a.held = b.held = True
    assert sched.next_micro_batch(a.pipeline_id) is None
    sched.pipelines[0].admitting = sched.pipelines[1].admitting = False
    sched.add(make_seq("c", 2, 2))
    assert sched.admit() == []


def test_capacity_cannot_drop_below_what_is_reserved():
    sched = two_pipelines()
    run_all(sched, make_seq("a", 10, 6))
    with pytest.raises(ValueError, match="4 KV blocks are reserved"):
        sched.set_worker_capacity(0, 3)
    sched.set_worker_capacity(0, 4)


def test_a_request_whose_kv_was_dropped_catches_up_in_one_chunk_then_decodes():
    seq = decoding(make_seq("a", 6, 8))
    seq.output_ids += [8, 9]  # three generated tokens, KV for the prompt only...
    seq.num_computed = 2  # ...and now only for two positions (a fallback dropped the rest)
    assert seq.in_prefill
    start, chunk = seq.next_chunk(512)
    assert (start, chunk) == (2, [2, 3, 4, 5, 7, 8, 9])
    seq.num_computed = seq.num_tokens - 1
    assert not seq.in_prefill and seq.next_chunk(1) == (8, [9])


# ---- n > 1: a leader and the members that fork from it ---------------------------------------
def test_members_come_in_with_their_leader_and_wait_for_its_prefill():
    sched = make_scheduler(capacity_blocks=9)
    lead = make_seq("r-0", 6, 6)  # 3 blocks each
    members = [make_seq(f"r-{i}", 6, 6) for i in (1, 2)]
    for m in members:
        m.awaiting_fork = True
    lead.forks = members
    sched.add(lead)
    assert sched.admit() == [lead, *members]
    assert all(s.pipeline_id == lead.pipeline_id for s in members)
    assert sched.worker_used[0] == 9  # each member reserves as a request of its own
    mb = sched.next_micro_batch()
    assert mb.seqs == [lead]  # the members take no step before the fork
    sched.complete(mb.mb_id)
    for m in members:
        m.awaiting_fork = False
        decoding(m)
    decoding(lead)
    sched.pipelines[0].max_inflight = 1
    assert [s.request_id for s in sched.next_micro_batch().seqs] == ["r-0", "r-1", "r-2"]


def test_a_group_that_does_not_fit_whole_waits():
    sched = make_scheduler(capacity_blocks=8)
    lead = make_seq("r-0", 6, 6)
    member = make_seq("r-1", 6, 6)
    member.awaiting_fork = True
    lead.forks = [member, make_seq("r-2", 6, 6)]
    lead.forks[1].awaiting_fork = True
    sched.add(lead)
    assert sched.admit() == []  # 9 blocks for the three, 8 free
    assert member.status is SequenceStatus.WAITING
