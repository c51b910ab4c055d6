"""agent.handoff: a moving request's KV follows it to its new owner - what was written, then
every step's new positions - and the new owner's step waits only for positions not yet there."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from agent.handoff import Handoffs
from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.sampler import Sampler
from agent.transport import Channel, ChannelStore
from tests.agent.test_kv_cache import fill

SPEC = KVCacheSpec(4, 2, 8)
LAYERS = range(0, 6)
OLD_EPOCH, NEW_EPOCH = 1, 2


@pytest.fixture
def pair():
    """Worker 0 (old owner of layers 3-5) and worker 1 (new owner), joined by one channel."""
    store = ChannelStore()
    name = "apply-t/x0-1"
    with ThreadPoolExecutor(2) as pool:
        out = pool.submit(Channel, store.spec(name), True)
        inn = pool.submit(Channel, store.spec(name), False)
        channels = {0: out.result(), 1: inn.result()}
    caches = {w: PagedKVCache(SPEC, LAYERS, 16) for w in (0, 1)}
    samplers = {w: Sampler() for w in (0, 1)}
    handoffs = {w: Handoffs(w, caches[w], samplers[w], lambda n, w=w: channels[w]) for w in (0, 1)}
    yield handoffs, caches, samplers, name
    handoffs[0].end_channels([name])
    for t in threading.enumerate():
        if t.name == f"receive-{name}":
            t.join(5)


def _entries(sampler=None):
    return {"r": {"epoch": OLD_EPOCH, "runs": [[3, 6, 0, 1]], "sampler": sampler}}


def _wait(handoffs, start) -> threading.Thread:
    t = threading.Thread(target=handoffs[1].wait_for, args=(NEW_EPOCH, ["r", "other"], [start, 0]))
    t.start()
    return t


def test_written_kv_then_each_steps_positions_reach_the_new_owner(pair):
    handoffs, caches, _, name = pair
    kv = fill(caches[0], "r", LAYERS, 12, seed=0)
    handoffs[0].wrote(OLD_EPOCH, ["r"], [10])  # positions 0-9 are written...
    handoffs[1].expect({"r": {"epoch": NEW_EPOCH, "runs": [[3, 6]], "sampler": False}}, [name])
    handoffs[0].replicate("apply-t", _entries(), max_overhead=0.5)
    deadline = time.monotonic() + 5
    while handoffs[0].behind() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handoffs[0].behind() == 0  # ...and caught up in the background
    waiting = _wait(handoffs, 12)  # the new epoch's first step of r starts at position 12
    time.sleep(0.1)
    assert waiting.is_alive()  # positions 10-11 are not there yet
    handoffs[0].wrote(OLD_EPOCH, ["r"], [12])  # r's last old step: its positions follow at once
    waiting.join(5)
    assert not waiting.is_alive()
    assert torch.equal(caches[1].export("r", range(3, 6), range(0, 12)), kv[:, 3:6])
    assert torch.count_nonzero(caches[1].export("r", range(0, 3), range(0, 12))) == 0  # not its runs
    assert handoffs[1].waited_ms["r"] >= 50
    assert handoffs[0].bytes_out == handoffs[1].bytes_in == 2 * 3 * 12 * 2 * 8 * 4  # every position once


def test_steps_of_other_wirings_are_not_replicated_and_do_not_wait(pair):
    handoffs, caches, _, name = pair
    fill(caches[0], "r", LAYERS, 4, seed=0)
    handoffs[0].wrote(OLD_EPOCH, ["r"], [4])
    handoffs[1].expect({"r": {"epoch": NEW_EPOCH, "runs": [[3, 6]], "sampler": False}}, [name])
    handoffs[0].replicate("apply-t", _entries(), max_overhead=1.0)
    while handoffs[0].behind():
        time.sleep(0.01)
    sent = handoffs[0].bytes_out
    handoffs[0].wrote(NEW_EPOCH, ["r"], [5])  # the same worker running r in its new wiring
    assert handoffs[0].bytes_out == sent
    handoffs[1].wait_for(OLD_EPOCH, ["r"], [100])  # a step of another epoch never waits
    handoffs[1].wait_for(NEW_EPOCH, ["r"], [4])


def test_a_sampling_request_takes_its_random_stream_along(pair):
    handoffs, caches, samplers, name = pair
    logits = torch.randn(1, 50)
    params = [{"temperature": 1.0, "seed": 7}]
    samplers[0].sample(logits, ["r"], params)  # the old last stage has drawn once
    reference = Sampler()
    reference.sample(logits, ["r"], params)
    expected = reference.sample(logits, ["r"], params)
    fill(caches[0], "r", LAYERS, 3, seed=0)
    handoffs[0].wrote(OLD_EPOCH, ["r"], [3])
    handoffs[1].expect({"r": {"epoch": NEW_EPOCH, "runs": [[3, 6]], "sampler": True}}, [name])
    handoffs[0].replicate("apply-t", _entries(sampler=[0, 1]), max_overhead=1.0)
    handoffs[1].wait_for(NEW_EPOCH, ["r"], [3])
    assert samplers[1].sample(logits, ["r"], params) == expected  # the second draw, not a fresh first
