"""The diff planner: which device gets which stage (fewest bytes, checked by brute force),
what each device loads and frees and from where, KV moves, memory problems, predictions,
and the plan as text and JSON."""

import itertools
import json
import random
from pathlib import Path

import pytest

from cost_models.device_catalog import get_device_kind
from cost_models.migration import bytes_move_s, disk_load_s, relayout_s
from cost_models.transfer import transfer_s
from planner.assign import min_cost_assignment
from planner.configuration import Configuration, ConfigurationError
from planner.reconfig import (
    SWITCH_DELTA_TOKENS,
    SWITCH_FIXED_S,
    DeviceInfo,
    Handoff,
    ModelFootprint,
    RequestKV,
    layer_handoffs,
    plan_reconfiguration,
)

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
# SmolLM2-135M in fp32, roughly: 30 layers of ~14 MiB, a 108 MiB embedding and head.
FOOTPRINT = ModelFootprint(
    n_layers=30,
    layer_weight_bytes=14 * MIB,
    embed_bytes=108 * MIB,
    head_bytes=108 * MIB + 2304,
    kv_bytes_per_token_per_layer=1536,
    block_size=16,
)
CPU = get_device_kind("cpu")


def workers(n=5, budget_mib=1024, cap_mib=64, nodes=None):
    nodes = nodes or ["local"] * n
    return [
        DeviceInfo(f"worker-{i}", "cpu", nodes[i], budget_mib * MIB, cap_mib * MIB)
        for i in range(n)
    ]


def config(*pipelines: str) -> Configuration:
    """config("worker-0 0:15, worker-1 15:30", "? 0:30"): one string per pipeline."""
    out = []
    for text in pipelines:
        stages = []
        for part in text.split(","):
            device, rng = part.split()
            start, end = (int(x) for x in rng.split(":"))
            stages.append({"device": None if device == "?" else device, "start": start, "end": end})
        out.append({"stages": stages})
    return Configuration.from_json({"pipelines": out})


def requests_on(pipeline, n, tokens=100, blocks=8, prefix="r"):
    return [RequestKV(f"{prefix}{pipeline}-{i}", pipeline, tokens + i, blocks) for i in range(n)]


def stages(plan, j=0):
    return [(s.device, s.start, s.end) for s in plan.target.pipelines[j].stages]


def loads(plan, device):
    change = next(c for c in plan.device_changes if c.device == device)
    return [(ld.part, ld.start, ld.end, ld.source) for ld in change.loads]


def frees(plan, device):
    change = next(c for c in plan.device_changes if c.device == device)
    return [(f.part, f.start, f.end) for f in change.frees]


def weight_bytes_moved(plan):
    return plan.prediction.weight_bytes_from_peer + plan.prediction.weight_bytes_from_disk


def new_bytes(start, end, held, footprint):
    """Returns the bytes a device holding stage `held` ((start, end) or None) must load to
    hold [start, end), counted from first principles."""
    old = set(range(*held)) if held else set()
    n_layers = footprint.n_layers
    size = len(set(range(start, end)) - old) * footprint.layer_weight_bytes
    if start == 0 and not (held and held[0] == 0):
        size += footprint.embed_bytes
    if end == n_layers and not (held and held[1] == n_layers):
        size += footprint.head_bytes
    return size


def brute_force_weight_bytes(current, target, names, footprint=FOOTPRINT):
    """Returns the fewest weight bytes over every way to give target's open stages devices."""
    held = {s.device: (s.start, s.end) for p in current.pipelines for s in p.stages}
    named = [(s, s.device) for p in target.pipelines for s in p.stages if s.device is not None]
    open_ = [s for p in target.pipelines for s in p.stages if s.device is None]
    free = [n for n in names if n not in {d for _, d in named}]
    fixed = sum(new_bytes(s.start, s.end, held.get(d), footprint) for s, d in named)
    return min(
        fixed
        + sum(
            new_bytes(s.start, s.end, held.get(d), footprint)
            for s, d in zip(open_, chosen, strict=True)
        )
        for chosen in itertools.permutations(free, len(open_))
    )


# ---- transitions ----------------------------------------------------------------------------
def test_two_to_three_stages_moves_the_fewest_bytes():
    current = config("worker-0 0:15, worker-1 15:30")
    target = Configuration.from_stages_text("0:10,10:20,20:30")
    reqs = requests_on(0, 8)
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, reqs, epoch=3)
    # worker-0 and worker-1 keep an end each; the middle goes to the first spare device
    assert stages(plan) == [("worker-0", 0, 10), ("worker-2", 10, 20), ("worker-1", 20, 30)]
    assert weight_bytes_moved(plan) == 10 * FOOTPRINT.layer_weight_bytes
    assert weight_bytes_moved(plan) == brute_force_weight_bytes(
        current, target, [f"worker-{i}" for i in range(5)]
    )
    assert loads(plan, "worker-2") == [
        ("layers", 10, 15, "worker-0"),
        ("layers", 15, 20, "worker-1"),
    ]
    assert frees(plan, "worker-0") == [("layers", 10, 15)]
    assert frees(plan, "worker-1") == [("layers", 15, 20)]
    assert (plan.epoch_from, plan.epoch_to, plan.pipeline_map) == (3, 4, {0: 0})
    assert plan.changed_pipelines == [0] and not plan.kept_pipelines
    # KV of the layers that changed owner, for every request
    assert {(m.src, m.dst, m.start, m.end) for m in plan.kv_moves} == {
        ("worker-0", "worker-2", 10, 15),
        ("worker-1", "worker-2", 15, 20),
    }
    assert len(plan.kv_moves) == 2 * len(reqs)
    for m in plan.kv_moves:
        r = next(r for r in reqs if r.request_id == m.request_id)
        assert m.tokens == r.cached_tokens
        assert m.bytes == r.cached_tokens * 5 * FOOTPRINT.kv_bytes_per_token_per_layer
    assert plan.prediction.kv_bytes == sum(m.bytes for m in plan.kv_moves)
    assert plan.prediction.minimum_bytes == plan.prediction.bytes_total
    assert plan.feasible and plan.has_changes


def test_three_to_two_stages_frees_the_middle_device():
    current = config("worker-0 0:10, worker-1 10:20, worker-2 20:30")
    target = Configuration.from_stages_text("0:15,15:30")
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, requests_on(0, 3))
    assert stages(plan) == [("worker-0", 0, 15), ("worker-2", 15, 30)]
    assert weight_bytes_moved(plan) == brute_force_weight_bytes(
        current, target, [f"worker-{i}" for i in range(5)]
    )
    assert loads(plan, "worker-0") == [("layers", 10, 15, "worker-1")]
    assert loads(plan, "worker-2") == [("layers", 15, 20, "worker-1")]
    middle = next(c for c in plan.device_changes if c.device == "worker-1")
    assert (middle.old_range, middle.new_range) == ((10, 20), None)
    assert frees(plan, "worker-1") == [("layers", 10, 20)]
    assert middle.pool_blocks_after == 0 and middle.weight_bytes_after == 0
    assert {(m.src, m.dst, m.start, m.end) for m in plan.kv_moves} == {
        ("worker-1", "worker-0", 10, 15),
        ("worker-1", "worker-2", 15, 20),
    }


def test_moving_a_stage_to_a_spare_device():
    current = config("worker-0 0:15, worker-1 15:30")
    target = config("worker-0 0:15, worker-3 15:30")
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, requests_on(0, 4))
    assert loads(plan, "worker-3") == [("layers", 15, 30, "worker-1"), ("head", 0, 0, "worker-1")]
    assert frees(plan, "worker-1") == [("layers", 15, 30), ("head", 0, 0)]
    assert loads(plan, "worker-0") == [] and frees(plan, "worker-0") == []
    assert {(m.src, m.dst, m.start, m.end) for m in plan.kv_moves} == {
        ("worker-1", "worker-3", 15, 30)
    }
    assert plan.moved_stages == [(0, 1)]
    assert plan.counts["moves"] == 2  # one KV pair and one stage on a new device
    assert weight_bytes_moved(plan) == 15 * FOOTPRINT.layer_weight_bytes + FOOTPRINT.head_bytes


def test_adding_a_pipeline_on_spare_devices_moves_no_kv():
    current = config("worker-0 0:15, worker-1 15:30")
    target = config("worker-0 0:15, worker-1 15:30", "worker-2 0:15, worker-3 15:30")
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, requests_on(0, 4))
    assert plan.kept_pipelines == [0] and plan.added == [1] and plan.pipeline_map == {0: 0}
    assert plan.kv_moves == [] and plan.prediction.kv_bytes == 0
    assert all(route == 0 for route in plan.request_routes.values())
    assert loads(plan, "worker-2") == [("layers", 0, 15, "worker-0"), ("embed", 0, 0, "worker-0")]
    assert loads(plan, "worker-3") == [("layers", 15, 30, "worker-1"), ("head", 0, 0, "worker-1")]
    assert loads(plan, "worker-0") == [] and loads(plan, "worker-1") == []
    assert plan.pipeline_capacity_blocks[1] > 0
    # with the spare devices on another node, the network is slower than the disk
    remote = workers(nodes=["a", "a", "b", "b", "b"])
    plan = plan_reconfiguration(current, target, remote, FOOTPRINT)
    assert {ld.source for c in plan.device_changes for ld in c.loads} == {"disk"}
    assert (
        plan.prediction.weight_bytes_from_disk
        == 30 * FOOTPRINT.layer_weight_bytes + 2 * 108 * MIB + 2304
    )


def test_removing_a_pipeline_routes_its_requests_and_moves_all_their_layers():
    current = config("worker-0 0:15, worker-1 15:30", "worker-2 0:30")
    target = config("worker-0 0:15, worker-1 15:30")
    reqs = requests_on(0, 3) + requests_on(1, 2, tokens=40)
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, reqs)
    assert plan.pipeline_map == {0: 0, 1: None}
    assert plan.removed == [1] and plan.kept_pipelines == [0] and plan.has_changes
    assert set(plan.request_routes.values()) == {0}
    for r in reqs[3:]:
        moves = [m for m in plan.kv_moves if m.request_id == r.request_id]
        assert sorted((m.start, m.end, m.src, m.dst) for m in moves) == [
            (0, 15, "worker-2", "worker-0"),
            (15, 30, "worker-2", "worker-1"),
        ]
        assert sum(m.bytes for m in moves) == r.cached_tokens * 30 * 1536
    assert not [m for m in plan.kv_moves if m.request_id in {r.request_id for r in reqs[:3]}]
    assert frees(plan, "worker-2") == [("layers", 0, 30), ("embed", 0, 0), ("head", 0, 0)]
    assert plan.prediction.stall_ms > SWITCH_FIXED_S * 1000


def test_a_removed_pipelines_requests_go_to_the_least_loaded_target():
    current = config("worker-0 0:30", "worker-1 0:30", "worker-2 0:30")
    target = config("worker-0 0:30", "worker-1 0:30")
    reqs = requests_on(0, 3, blocks=10) + requests_on(2, 2, blocks=10)
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, reqs)
    assert plan.removed == [2] and plan.kept_pipelines == [0, 1]
    assert [plan.request_routes[r.request_id] for r in reqs] == [0, 0, 0, 1, 1]


def test_unchanged_target_has_no_changes():
    current = config("worker-0 0:15, worker-1 15:30", "worker-2 0:30")
    # the same pipelines listed in another order are the same configuration
    reordered = config("worker-2 0:30", "worker-0 0:15, worker-1 15:30")
    for target in (current, reordered):
        plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, requests_on(1, 2))
        assert not plan.has_changes and plan.feasible
        assert plan.render().startswith("No changes.") and plan.summary() == "No changes."
        assert sorted(plan.kept_pipelines) == [0, 1] and not plan.kv_moves
        assert all(not c.loads and not c.frees for c in plan.device_changes)
        assert plan.prediction.bytes_total == 0 and plan.prediction.stall_ms == 0
    assert plan.pipeline_map == {0: 1, 1: 0}
    assert plan.request_routes == {"r1-0": 0, "r1-1": 0}


def test_named_target_devices_are_kept_and_bad_targets_raise():
    current = config("worker-0 0:15, worker-1 15:30")
    plan = plan_reconfiguration(current, config("worker-4 0:10, ? 10:30"), workers(), FOOTPRINT)
    assert stages(plan) == [("worker-4", 0, 10), ("worker-1", 10, 30)]
    with pytest.raises(ConfigurationError, match="unknown device 'worker-9'"):
        plan_reconfiguration(current, config("worker-9 0:30"), workers(), FOOTPRINT)
    with pytest.raises(ConfigurationError, match="where layer 10 should start"):
        plan_reconfiguration(
            current, Configuration.from_stages_text("0:10,12:30"), workers(), FOOTPRINT
        )
    with pytest.raises(
        ConfigurationError, match="request r0-0 runs on pipeline 3; the current configuration has 1"
    ):
        plan_reconfiguration(current, current, workers(), FOOTPRINT, [RequestKV("r0-0", 3, 1, 1)])


# ---- handoffs -------------------------------------------------------------------------------
def test_layer_handoffs():
    two = config("a 0:15, b 15:30").pipelines[0]
    assert layer_handoffs(two, two) == []
    assert layer_handoffs(two, config("a 0:10, b 10:30").pipelines[0]) == [
        Handoff(10, 15, "a", "b")
    ]
    assert layer_handoffs(two, config("a 0:20, b 20:30").pipelines[0]) == [
        Handoff(15, 20, "b", "a")
    ]
    assert layer_handoffs(two, config("b 0:15, a 15:30").pipelines[0]) == [
        Handoff(0, 15, "a", "b"),
        Handoff(15, 30, "b", "a"),
    ]
    # one destination, several sources: one run per source
    assert layer_handoffs(
        config("a 0:10, b 10:20, c 20:30").pipelines[0], config("d 0:30").pipelines[0]
    ) == [
        Handoff(0, 10, "a", "d"),
        Handoff(10, 20, "b", "d"),
        Handoff(20, 30, "c", "d"),
    ]
    # a device in the middle that takes from both neighbours
    assert layer_handoffs(two, config("a 0:10, c 10:20, b 20:30").pipelines[0]) == [
        Handoff(10, 15, "a", "c"),
        Handoff(15, 20, "b", "c"),
    ]


# ---- where weights come from ----------------------------------------------------------------
def test_a_peer_when_the_cost_model_says_it_is_faster_than_disk():
    current = config("worker-0 0:15, worker-1 15:30")
    target = config("worker-0 0:15, worker-2 15:30")
    n_bytes = 15 * FOOTPRINT.layer_weight_bytes
    peer_s, disk_s = bytes_move_s(n_bytes, CPU, CPU, True), disk_load_s(n_bytes, CPU)
    assert peer_s < disk_s  # loopback between CPU workers beats the default disk
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT)
    layers = next(c for c in plan.device_changes if c.device == "worker-2").loads[0]
    assert layers.source == "worker-1"
    assert layers.predicted_s == pytest.approx(peer_s + relayout_s(n_bytes, CPU))
    # on another node the network is slower than the disk, unless the disk is slower still
    remote = workers(nodes=["a", "b", "a", "a", "a"])
    assert bytes_move_s(n_bytes, CPU, CPU, False) > disk_s
    assert (
        loads(plan_reconfiguration(current, target, remote, FOOTPRINT), "worker-2")[0][3] == "disk"
    )
    slow_disk = plan_reconfiguration(
        current, target, remote, FOOTPRINT, disk_bandwidth_bytes_per_s=1e8
    )
    assert loads(slow_disk, "worker-2")[0][3] == "worker-1"


def test_disk_when_no_present_device_holds_the_layer():
    current = config("worker-0 0:15, worker-1 15:30")
    target = config("worker-0 0:15, worker-2 15:30")
    present = [d for d in workers() if d.name != "worker-1"]  # worker-1 is gone
    plan = plan_reconfiguration(current, target, present, FOOTPRINT, requests_on(0, 2))
    assert loads(plan, "worker-2") == [("layers", 15, 30, "disk"), ("head", 0, 0, "disk")]
    assert plan.prediction.weight_bytes_from_peer == 0
    assert [c.device for c in plan.device_changes] == ["worker-0", "worker-2"]
    # its requests' KV for layers 15-29 is on the gone device: the plan says so
    assert any(
        p.startswith("worker-1 is not among the devices") and "2 requests" in p
        for p in plan.problems
    )


def test_loads_split_where_the_holder_changes_and_take_the_embedding_from_a_first_stage():
    current = config("worker-0 0:10, worker-1 10:20, worker-2 20:30")
    target = config("worker-3 0:30")
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT)
    assert loads(plan, "worker-3") == [
        ("layers", 0, 10, "worker-0"),
        ("layers", 10, 20, "worker-1"),
        ("layers", 20, 30, "worker-2"),
        ("embed", 0, 0, "worker-0"),
        ("head", 0, 0, "worker-2"),
    ]


# ---- memory ---------------------------------------------------------------------------------
def test_pools_grow_for_a_device_that_loses_layers_and_shrink_for_one_that_gains():
    current = config("worker-0 0:15, worker-1 15:30")
    target = config("worker-0 0:10, worker-1 10:30")
    plan = plan_reconfiguration(current, target, workers(budget_mib=600, cap_mib=256), FOOTPRINT)
    loser = next(c for c in plan.device_changes if c.device == "worker-0")
    gainer = next(c for c in plan.device_changes if c.device == "worker-1")
    assert loser.pool_blocks_after > loser.pool_blocks_before
    assert gainer.pool_blocks_after < gainer.pool_blocks_before
    # during the change both keep old ∪ new: pool for 15 and 20 layers
    assert loser.pool_blocks_during == loser.pool_blocks_before
    assert gainer.pool_blocks_during == gainer.pool_blocks_after
    weights = 20 * 14 * MIB + FOOTPRINT.head_bytes
    assert gainer.weight_bytes_after == weights
    assert gainer.pool_blocks_after == min(256 * MIB, 600 * MIB - weights) // (16 * 1536 * 20)
    assert plan.pipeline_capacity_blocks == [min(loser.pool_blocks_after, gainer.pool_blocks_after)]


def test_a_target_that_does_not_fit_gives_problem_lines_with_the_numbers():
    current = config("worker-0 0:15, worker-1 15:30")
    target = config("worker-0 0:20, worker-1 20:30")
    reqs = requests_on(0, 8, blocks=5)
    plan = plan_reconfiguration(current, target, workers(budget_mib=400), FOOTPRINT, reqs)
    # during: worker-0 holds 20 layers and the embedding, 388 MiB of its 400; 12 MiB of KV
    # pool at 16 * 1536 * 20 bytes a block is 25 blocks, and 8 requests reserve 40
    assert not plan.feasible
    assert plan.problems[0] == (
        "worker-0: during the change it holds layers 0-19 and embedding (388.0 MiB of weights) "
        "and its budget is 400 MiB, leaving a KV pool of 25 blocks; its requests need 40 blocks: "
        "raise --memory-budget to at least 407 MiB, or apply when fewer requests are running, "
        "or let those that do not fit recompute their KV (--recompute-overflow)"
    )
    assert plan.problems[1].startswith(
        "worker-0: after the change (pipeline 0) it holds layers 0-19"
    )
    assert "the 8 requests routed to pipeline 0 need 40 blocks" in plan.problems[1]
    assert plan.render().endswith("\n".join(f"Error: {p}" for p in plan.problems))
    # with fewer requests it fits
    assert plan_reconfiguration(
        current, target, workers(budget_mib=400), FOOTPRINT, reqs[:5]
    ).feasible


def test_weights_over_the_budget_are_a_problem_even_without_requests():
    current = config("worker-0 0:15, worker-1 15:30")
    target = config("worker-0 0:25, worker-1 25:30")
    plan = plan_reconfiguration(current, target, workers(budget_mib=400), FOOTPRINT)
    assert len(plan.problems) == 1
    assert plan.problems[0].startswith(
        "worker-0: during the change it holds layers 0-24 and embedding (458.0 MiB of weights) "
        "and its budget is 400 MiB: raise --memory-budget to at least 459 MiB"
    )


def test_recompute_overflow_drops_the_kv_that_does_not_fit_cheapest_first():
    current = config("worker-0 0:15, worker-1 15:30")
    target = config("worker-0 0:20, worker-1 20:30")
    reqs = requests_on(0, 8, blocks=5)  # tokens 100..107, 40 blocks against a pool of 25
    plan = plan_reconfiguration(
        current, target, workers(budget_mib=400), FOOTPRINT, reqs, recompute_overflow=True
    )
    assert plan.feasible
    # 15 blocks too many: the three with the fewest tokens per reserved block go
    assert plan.recompute == ["r0-0", "r0-1", "r0-2"]
    assert plan.prediction.recompute_tokens == 100 + 101 + 102
    assert set(plan.request_routes) == {r.request_id for r in reqs[3:]}
    assert not {m.request_id for m in plan.kv_moves} & set(plan.recompute)
    assert set(plan.request_origins) == {r.request_id for r in reqs}
    assert plan.counts["recomputes"] == 3
    assert ", 3 to recompute;" in plan.summary()
    assert "-/+ recompute 3 requests' KV (303 tokens)" in plan.render()
    assert plan.to_json()["recompute"] == ["r0-0", "r0-1", "r0-2"]
    # what fits is left alone; a larger reservation per cached token goes first
    assert plan_reconfiguration(
        current, target, workers(budget_mib=400), FOOTPRINT, reqs[:5], recompute_overflow=True
    ).recompute == []
    big = [*reqs[:5], RequestKV("late", 0, 10, 10)]
    assert plan_reconfiguration(
        current, target, workers(budget_mib=400), FOOTPRINT, big, recompute_overflow=True
    ).recompute == ["late"]


def test_recompute_overflow_leaves_kept_pipelines_and_weight_problems_alone():
    current = config("worker-0 0:15, worker-1 15:30", "worker-2 0:30")
    target = config("worker-0 0:25, worker-1 25:30", "worker-2 0:30")
    reqs = requests_on(0, 4, blocks=5) + requests_on(1, 4, blocks=5)
    plan = plan_reconfiguration(
        current, target, workers(budget_mib=400), FOOTPRINT, reqs, recompute_overflow=True
    )
    # worker-0's weights alone exceed its budget: dropping KV cannot fix that
    assert not plan.feasible and plan.recompute == []
    assert plan.problems[0].startswith("worker-0: during the change it holds layers 0-24")


def test_with_recompute_overflow_every_remaining_request_fits_on_random_instances():
    rng = random.Random(0)
    footprint = ModelFootprint(8, 40 * MIB, 20 * MIB, 20 * MIB, 1536, 16)
    devices = workers(6, budget_mib=300, cap_mib=64)
    names = [d.name for d in devices]
    seen_recompute = 0
    for _ in range(200):  # pipelines removed too: their requests are routed to the others
        current = random_pipelines(rng, 8, names, rng.randint(2, 4), open_share=0.0)
        target = random_pipelines(rng, 8, names, rng.randint(1, 2), open_share=0.6)
        reqs = [
            RequestKV(f"q{i}", rng.randrange(len(current.pipelines)), rng.randint(0, 900), rng.randint(1, 60))
            for i in range(rng.randint(0, 80))
        ]  # fmt: skip
        strict = plan_reconfiguration(current, target, devices, footprint, reqs)
        loose = plan_reconfiguration(
            current, target, devices, footprint, reqs, recompute_overflow=True
        )
        # what no dropped KV fixes: weights over the budget, a pool left with no block, or
        # requests that do not fit even where they run now (random ones may not)
        unfixable = any(
            c.weight_bytes_during > 300 * MIB or (c.new_range and not c.pool_blocks_after)
            for c in loose.device_changes
        ) or not plan_reconfiguration(current, current, devices, footprint, reqs).feasible
        if not unfixable:
            assert loose.feasible, loose.problems
        assert bool(loose.recompute) <= (not strict.feasible)  # only when it would not fit
        if strict.feasible:
            assert loose.recompute == [] and loose.to_json()["kv_moves"] == strict.to_json()["kv_moves"]
        seen_recompute += bool(loose.recompute)
    assert seen_recompute >= 10  # the instances do exercise the choice


# ---- predictions ----------------------------------------------------------------------------
def test_predictions_pace_copies_and_price_the_switch():
    current = config("worker-0 0:15, worker-1 15:30")
    target = config("worker-0 0:15, worker-3 15:30")
    reqs = requests_on(0, 6)
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, reqs, max_overhead=0.1)
    p = plan.prediction
    busiest = max(sum(ld.predicted_s for ld in c.loads) for c in plan.device_changes)
    assert p.prefetch_s == pytest.approx(busiest / 0.1)
    assert p.precopy_s == pytest.approx(transfer_s(p.kv_bytes, CPU, CPU, True) / 0.1)
    delta = len(reqs) * SWITCH_DELTA_TOKENS * 15 * FOOTPRINT.kv_bytes_per_token_per_layer
    assert p.stall_ms == pytest.approx((SWITCH_FIXED_S + transfer_s(delta, CPU, CPU, True)) * 1000)
    assert p.bytes_total == p.weight_bytes_from_peer + p.weight_bytes_from_disk + p.kv_bytes
    assert p.minimum_bytes == p.bytes_total


# ---- text and JSON --------------------------------------------------------------------------
def test_render_shows_loads_frees_moves_and_the_summary():
    current = config("worker-0 0:15, worker-1 15:30", "worker-4 0:30")
    target = Configuration.from_json(
        {"pipelines": [{"stages": [{"device": None, "start": 0, "end": 10},
                                   {"device": None, "start": 10, "end": 20},
                                   {"device": None, "start": 20, "end": 30}]},
                       {"stages": [{"device": "worker-4", "start": 0, "end": 30}]}]}
    )  # fmt: skip
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, requests_on(0, 8), epoch=3)
    text = plan.render()
    assert text.startswith("pipeshift will change epoch 3 -> 4:\n")
    assert (
        "  ~ pipeline 0  worker-0 0-14 | worker-1 15-29   ->   worker-0 0-9 | worker-2 10-19 | worker-1 20-29"
        in text
    )
    assert "      ~ worker-0  layers 0-14 -> 0-9" in text
    assert "      + worker-2  layers 10-19 (was spare)" in text
    assert "          + load layers 10-14 from worker-0          70.0 MiB" in text
    assert "          - free layers 10-14" in text
    assert "      ~ kv  8 requests, layers 15-19: worker-1 -> worker-2" in text
    assert "  = pipeline 1  worker-4 0-29  (unchanged)" in text
    n, p = plan.counts, plan.prediction
    assert (n["loads"], n["frees"], n["moves"]) == (2, 2, 3)
    summary = (
        f"Plan: 2 to load, 2 to free, 3 to move; {p.bytes_total / 2**30:.2f} GiB, "
        f"predicted prefetch {p.prefetch_s:.1f} s, predicted stall {p.stall_ms:.1f} ms"
    )
    assert summary in text.splitlines()
    assert "Error" not in text


def test_to_json_is_plain_json_with_every_field():
    current = config("worker-0 0:15, worker-1 15:30", "worker-2 0:30")
    target = Configuration.from_stages_text("0:10,10:30")
    reqs = requests_on(0, 2) + requests_on(1, 1)
    plan = plan_reconfiguration(current, target, workers(), FOOTPRINT, reqs)
    obj = plan.to_json()
    assert json.loads(json.dumps(obj)) == obj
    for key in (
        "epoch_from", "epoch_to", "current", "target", "device_changes", "request_routes",
        "pipeline_map", "kept_pipelines", "changed_pipelines", "added", "removed", "kv_moves",
        "prediction", "problems", "pipeline_capacity_blocks", "has_changes", "feasible", "summary",
    ):  # fmt: skip
        assert key in obj
    assert obj["summary"] == plan.summary()
    assert Configuration.from_json(obj["target"]) == plan.target
    # worker-2 holds every layer: the target reuses it (no weight moves), so current
    # pipeline 1 becomes target 0 and current pipeline 0 goes
    assert obj["target"]["pipelines"][0]["stages"][1]["device"] == "worker-2"
    assert (
        obj["prediction"]["weight_bytes_from_peer"] + obj["prediction"]["weight_bytes_from_disk"]
        == 0
    )
    assert obj["pipeline_map"] == {"0": None, "1": 0} and obj["removed"] == [0]
    change = obj["device_changes"][0]
    assert change["device"] == "worker-0" and change["old_range"] == [0, 15]
    assert change["new_range"] == [0, 10] and change["loads"] == []
    assert change["frees"] == [{"part": "layers", "start": 10, "end": 15, "bytes": 5 * 14 * MIB}]
    assert {m["request_id"] for m in obj["kv_moves"]} == {"r0-0", "r0-1", "r1-0"}
    assert set(obj["kv_moves"][0]) == {
        "request_id",
        "src",
        "dst",
        "start",
        "end",
        "tokens",
        "bytes",
    }
    assert obj["prediction"]["bytes_total"] == plan.prediction.bytes_total


# ---- minimum bytes, by brute force ------------------------------------------------------------
def random_pipelines(rng, n_layers, names, n_pipelines, open_share):
    """Returns pipelines of random splits over distinct devices of `names` (some left None)."""
    pool = list(names)
    rng.shuffle(pool)
    out = []
    for _ in range(n_pipelines):
        if not pool:
            break
        n_stages = rng.randint(1, min(3, len(pool)))
        cuts = sorted(rng.sample(range(1, n_layers), n_stages - 1))
        bounds = [0, *cuts, n_layers]
        stages = []
        for s, e in itertools.pairwise(bounds):
            device = pool.pop()
            stages.append(
                {"device": None if rng.random() < open_share else device, "start": s, "end": e}
            )
        out.append({"stages": stages})
    return Configuration.from_json({"pipelines": out})


def test_planned_bytes_equal_the_brute_force_minimum_on_random_instances():
    rng = random.Random(7)
    footprint = ModelFootprint(8, 1000, 700, 900, 3, 4)
    devices = workers(4)
    names = [d.name for d in devices]
    for _ in range(40):
        current = random_pipelines(rng, 8, names, rng.randint(1, 2), open_share=0.0)
        target = random_pipelines(rng, 8, names, rng.randint(1, 2), open_share=0.6)
        plan = plan_reconfiguration(current, target, devices, footprint)
        assert weight_bytes_moved(plan) == brute_force_weight_bytes(
            current, target, names, footprint
        )
        # named stages keep their device
        for p, q in zip(target.pipelines, plan.target.pipelines, strict=True):
            assert all(
                s.device in (None, t.device) for s, t in zip(p.stages, q.stages, strict=True)
            )
        reqs = [
            RequestKV(f"q{i}", rng.randrange(len(current.pipelines)), rng.randint(0, 50), 1)
            for i in range(5)
        ]
        with_kv = plan_reconfiguration(current, target, devices, footprint, reqs)
        assert with_kv.prediction.minimum_bytes == with_kv.prediction.bytes_total
        assert with_kv.prediction.kv_bytes == sum(
            r.cached_tokens * 3 * sum(h.end - h.start for h in layer_handoffs(
                current.pipelines[r.pipeline], with_kv.target.pipelines[with_kv.request_routes[r.request_id]]))
            for r in reqs
        )  # fmt: skip


# ---- the matcher ------------------------------------------------------------------------------
def test_min_cost_assignment_is_optimal_and_deterministic():
    rng = random.Random(3)
    for _ in range(30):
        n_rows, n_cols = rng.randint(1, 4), rng.randint(4, 6)
        costs = [[rng.randint(0, 5) for _ in range(n_cols)] for _ in range(n_rows)]
        chosen = min_cost_assignment(costs)
        assert len(set(chosen)) == n_rows
        best = min(
            sum(costs[r][c] for r, c in enumerate(cols))
            for cols in itertools.permutations(range(n_cols), n_rows)
        )
        assert sum(costs[r][c] for r, c in enumerate(chosen)) == best
        assert min_cost_assignment(costs) == chosen
    assert min_cost_assignment([[0, 0, 0]]) == [0]  # ties go to the lowest column
    with pytest.raises(ValueError, match="3 things to place on 2 devices"):
        min_cost_assignment([[1, 2], [3, 4], [5, 6]])


def test_there_is_one_matcher_in_the_codebase():
    users = sorted(
        str(path.relative_to(ROOT))
        for package in ("planner", "agent", "cost_models")
        for path in (ROOT / package).rglob("*.py")
        if "linear_sum_assignment" in path.read_text()
    )
    assert users == ["planner/assign.py"]
