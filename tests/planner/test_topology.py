"""Topology: nodes, NICs and links in the spec; hops costed on the link they use; the
solvers place stages on nodes and reach the exact topology-aware optimum."""

import pytest

from planner.build_problem import build_problem
from planner.dp import reference_throughput_tok_s
from planner.evaluate import build_pipeline
from planner.solve import plan
from planner.spec import Spec, SpecError, load_spec
from planner.topology_instances import random_topology_problem
from tests.planner.reference import assert_backends_hit_reference

from .conftest import ROOT

EXAMPLE = ROOT / "data/specs/topology-2x4-llama2-70b.yaml"

GOOD = """\
model: Llama-2-70B
devices:
  - {kind: A100-80GB, count: 2, node: a}
  - {kind: L40S, count: 2, node: b}
  - {kind: L40S, count: 2, node: c}
nodes:
  - {name: a, nic_gbps: 100, nic_latency_us: 5, region: east}
  - {name: b, nic_gbps: 25, nic_latency_us: 20, region: east, intra_gbps: 256}
  - {name: c, nic_gbps: 100, nic_latency_us: 5, region: west}
workload:
  prompt_tokens: 512
  output_tokens: 128
"""


@pytest.mark.parametrize("seed", range(16))
def test_backends_hit_topology_dp_optimum(seed):
    problem = random_topology_problem(seed)
    assert_backends_hit_reference(problem)


def test_topology_changes_the_optimum_on_some_instances():
    """The random instances are not all indifferent to where stages go."""
    from dataclasses import replace

    changed = 0
    for seed in range(16):
        problem = random_topology_problem(seed)
        worst_hops = replace(problem, topology=None)  # every hop at the slowest link
        changed += reference_throughput_tok_s(problem) > reference_throughput_tok_s(worst_hops) * (
            1 + 1e-6
        )
    assert changed >= 4


def _cross_hops(pipeline) -> int:
    return sum(a.node != b.node for a, b in zip(pipeline.stages, pipeline.stages[1:], strict=False))


def test_aware_plan_beats_blind_plan_recosted():
    spec = load_spec(EXAMPLE)
    aware_problem = build_problem(spec)
    blind_spec = Spec.model_validate(
        {**spec.model_dump(exclude={"base_dir"}), "nodes": None, "base_dir": spec.base_dir}
    )
    blind_problem = build_problem(blind_spec)
    assert blind_problem.topology is None
    aware = plan(aware_problem, "cpsat", 20.0)
    blind = plan(blind_problem, "cpsat", 20.0)
    assert aware.status == blind.status == "OPTIMAL"
    recosted = [
        build_pipeline(aware_problem, [(s.device, s.start, s.end) for s in p.stages])
        for p in blind.pipelines
    ]
    blind_tok_s = sum(p.throughput_tok_s for p in recosted)
    # the blind plan sends hidden states over the 1 Gbit/s link twice per pipeline
    assert max(_cross_hops(p) for p in blind.pipelines) >= 2
    # the aware plan crosses at most once, where the stage before the hop has room for it
    assert max(_cross_hops(p) for p in aware.pipelines) <= 1
    assert aware.throughput_tok_s > 1.1 * blind_tok_s
    # and its prediction is what its pipelines cost on their links
    assert aware.objective == pytest.approx(aware.throughput_tok_s, rel=1e-9)


def test_hops_cost_the_link_they_use(write_spec):
    problem = build_problem(
        load_spec(
            write_spec(
                GOOD
                + "links:\n  - {between: [east, west], gbps: 1, latency_us: 800}\n  - {between: [a, c], gbps: 10, latency_us: 300}\n"
            )
        )
    )
    topo = problem.topology
    gb = 1e9 / 8
    # inside a: the A100's NVLink from the catalog; inside b: the spec's intra_gbps
    assert topo.links[("a", "a")].bandwidth_bytes_per_s == pytest.approx(300e9)
    assert topo.links[("b", "b")].bandwidth_bytes_per_s == pytest.approx(256 * gb)
    # between nodes without a link entry: the slower NIC, the larger latency
    assert topo.links[("a", "b")].bandwidth_bytes_per_s == pytest.approx(25 * gb)
    assert topo.links[("a", "b")].latency_s == pytest.approx(20e-6)
    # a region pair entry, and a node pair entry that wins over it
    assert topo.links[("b", "c")].bandwidth_bytes_per_s == pytest.approx(1 * gb)
    assert topo.links[("b", "c")].latency_s == pytest.approx(800e-6)
    assert topo.links[("c", "a")].bandwidth_bytes_per_s == pytest.approx(10 * gb)
    assert topo.decode_s("a", "c") > topo.decode_s("a", "b") > topo.decode_s("a", "a")
    # pools: one per (kind, node)
    assert [(k.name, k.node) for k in problem.kinds] == [
        ("A100-80GB", "a"),
        ("L40S", "b"),
        ("L40S", "c"),
    ]


def test_no_nodes_keeps_the_uniform_hop(write_spec):
    text = GOOD.split("nodes:")[0] + "workload:" + GOOD.split("workload:")[1]
    problem = build_problem(load_spec(write_spec(text)))
    assert problem.topology is None
    assert [k.name for k in problem.kinds] == ["A100-80GB", "L40S"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("node: c}", "node: d}"), ":5: devices.2.node: node 'd' is not in `nodes` (a, b, c)"),
        (("{name: c,", "{name: b,"), ":9: nodes.2.name: node 'b' is listed twice"),
        (
            ("nic_gbps: 25,", "nic_gbps: -1,"),
            ":8: nodes.1.nic_gbps: Input should be greater than 0",
        ),
        (
            ("workload:", "links:\n  - {between: [a, x], gbps: 1, latency_us: 5}\nworkload:"),
            ":11: links.0.between: 'x' is neither a node nor a region",
        ),
        (
            ("workload:", "links:\n  - {between: [a, a], gbps: 1, latency_us: 5}\nworkload:"),
            ":11: links.0.between: a link joins two different nodes",
        ),
    ],
)
def test_bad_topology_is_refused_with_line(write_spec, edit, expected):
    with pytest.raises(SpecError) as exc:
        load_spec(write_spec(GOOD.replace(*edit)))
    assert any(expected in line for line in exc.value.lines), exc.value.lines


def test_links_need_nodes(write_spec):
    text = (
        GOOD.split("nodes:")[0]
        + "links:\n  - {between: [a, b], gbps: 1, latency_us: 5}\nworkload:"
        + GOOD.split("workload:")[1]
    )
    with pytest.raises(SpecError) as exc:
        load_spec(write_spec(text))
    assert "links: needs a `nodes` section" in exc.value.lines[0]


def test_interchangeable_nodes_are_evaluated_once_and_stay_exact():
    """Three identical nodes: shapes are computed per class of vectors and relabelled; the
    optimum still matches the DP, which knows nothing of the symmetry."""
    from dataclasses import replace

    from cost_models.transfer import Link
    from planner.instances import random_small_problem
    from planner.problem import Device
    from planner.shapes_topology import NodeSymmetry
    from planner.topology import build_topology

    base = random_small_problem(11, max_devices=6, max_layers=16)
    kind = base.kinds[0]
    nodes = ("n0", "n1", "n2")
    kinds = tuple(replace(kind, node=n) for n in nodes)
    devices = tuple(Device(f"{n}/g{i}", k, n) for k, n in enumerate(nodes) for i in range(2))
    links = {(a, b): Link(200e9, 5e-6) if a == b else Link(1e9, 1e-3) for a in nodes for b in nodes}
    topo = build_topology(links, 64 * 1024, 8 * 2**20)
    problem = replace(
        base, kinds=kinds, devices=devices, topology=topo, ttft_slo_s=None, max_stages=6
    )
    assert NodeSymmetry(problem).classes == [list(nodes)]
    ref = reference_throughput_tok_s(problem)
    r = plan(problem, "cpsat", 10.0)
    assert r.status == "OPTIMAL"
    assert r.objective == pytest.approx(ref, rel=1e-7)
    assert r.throughput_tok_s == pytest.approx(ref, rel=1e-7)


HOST_SPEC = """\
model: SmolLM2-135M
dtype: fp32
devices:
  - {{kind: cpu, count: {workers}, node: local}}
nodes:
  - {{name: local, nic_gbps: 10{host}}}
workload:
  prompt_tokens: 128
  output_tokens: 64
  batch: 4
"""


def _plan_host(workers: int, host: str):
    from planner.spec import parse_spec

    spec = parse_spec(HOST_SPEC.format(workers=workers, host=host))
    return plan(build_problem(spec))


def test_cpu_workers_share_their_hosts_cores():
    """Four workers on two cores plan what two cores do, not four machines' worth."""
    alone = _plan_host(4, "")  # no cpu_cores: every worker a machine of its own
    shared = _plan_host(4, ", cpu_cores: 2")
    assert shared.throughput_tok_s == pytest.approx(alone.throughput_tok_s / 2, rel=1e-6)
    assert shared.tpot_s == pytest.approx(2 * alone.tpot_s, rel=1e-6)
    # the report says so
    from planner.spec import parse_spec

    problem = build_problem(parse_spec(HOST_SPEC.format(workers=4, host=", cpu_cores: 2")))
    assert "4 busy workers share the host's cores: compute x2.00" in (
        problem.kinds[0].cost_source.describe()
    )
    # as many workers as cores: nothing to share
    two = _plan_host(2, ", cpu_cores: 2")
    assert two.throughput_tok_s == pytest.approx(_plan_host(2, "").throughput_tok_s)
    # two threads per worker on two cores: two workers already contend
    threads = _plan_host(2, ", cpu_cores: 2, threads_per_worker: 2")
    assert threads.throughput_tok_s == pytest.approx(two.throughput_tok_s / 2, rel=1e-6)
    # a memory bus that carries one worker's traffic: two running workers halve memory speed
    bus = _plan_host(2, ", cpu_cores: 2, memory_gb_s: 12")
    assert two.throughput_tok_s / 2 < bus.throughput_tok_s < two.throughput_tok_s


def test_configuration_shares_count_the_engines_busy_workers():
    from cost_models.host_sharing import Host
    from planner.topology import configuration_shares

    hosts = {"a": Host(cores=2), "b": Host(cores=4)}
    bw = {"a": 1e10, "b": 1e10}
    replicas = configuration_shares(hosts, [["a"], ["a"], ["a"], ["a"]], bw)
    assert replicas["a"].busy_workers == 4 and replicas["a"].compute == 2.0
    deep = configuration_shares(hosts, [["a", "a", "a", "a"]], bw)
    assert deep["a"].busy_workers == 2 and deep["a"].compute == 1.0
    # a pipeline across two hosts counts its stages on each: on b, 2 + 1 of 4 cores
    split = configuration_shares(hosts, [["a", "a", "b", "b"], ["a", "b"]], bw)
    assert split["a"].busy_workers == 2 and split["b"].busy_workers == 3
    assert "b" not in configuration_shares(hosts, [["a"]], bw)


def test_cpu_cores_in_the_spec_are_checked():
    from planner.spec import parse_spec

    with pytest.raises(SpecError, match="cpu_cores"):
        parse_spec(HOST_SPEC.format(workers=2, host=", cpu_cores: 0"))


MOVE_SPEC = """\
model: Llama-3.1-8B
devices:
  - {{kind: A100-80GB, count: 2, node: a}}
  - {{kind: A100-80GB, count: 2, node: b}}
nodes:
  - {{name: a, nic_gbps: 100}}
  - {{name: b, nic_gbps: 100}}
links:
  - {{between: [a, b], gbps: 1, latency_us: 500}}
workload:
  prompt_tokens: 512
  output_tokens: 128
current:
  pipelines:
{current}
"""


def _move_bandwidth(current: str) -> float:
    """Returns the bandwidth the migration term prices a moved byte at (from mu)."""
    from planner.evaluate import config_throughput_tok_s
    from planner.spec import parse_spec

    spec = parse_spec(MOVE_SPEC.format(current=current))
    problem = build_problem(spec)
    mig = problem.migration
    reference = config_throughput_tok_s(problem, mig.current)
    return reference / (mig.tok_s_per_byte * spec.replan_interval_s)


def test_migration_prices_moves_on_the_links_node_pairs_use():
    from cost_models.device_catalog import get_device_kind
    from cost_models.memory import layer_weight_bytes
    from cost_models.migration import disk_load_s
    from cost_models.model_catalog import get_model_arch

    layer = layer_weight_bytes(get_model_arch("Llama-3.1-8B"), 2)
    a100 = get_device_kind("A100-80GB")
    # the weights live on node a only: node b reads them from its disk (2 GB/s) rather
    # than over the 1 Gbit/s link, and that is the slowest fetch
    only_a = _move_bandwidth("    - stages: [{device: a/A100-80GB.0, start: 0, end: 32}]")
    assert only_a == pytest.approx(layer / disk_load_s(layer, a100), rel=1e-6)
    # both nodes hold them: every node fetches over its own NVLink
    both = _move_bandwidth(
        "    - stages: [{device: a/A100-80GB.0, start: 0, end: 16},"
        " {device: b/A100-80GB.0, start: 16, end: 32}]"
    )
    assert both > 50 * only_a


def _plan_move(current: str, replan_interval_s: float, pool_prices: bool = True):
    """Returns (problem, plan) of MOVE_SPEC in replicas of one A100 each (equally fast
    wherever they land) at a re-plan interval; without `pool_prices` every byte is priced at
    the slowest node's fetch (the scalar mu)."""
    from dataclasses import replace

    from planner.spec import parse_spec

    spec = parse_spec(
        MOVE_SPEC.format(current=current)
        + f"replan_interval_s: {replan_interval_s}\nmax_stages: 1\n"
    )
    problem = build_problem(spec)
    if not pool_prices:
        problem = replace(problem, migration=replace(problem.migration, pool_tok_s_per_byte=()))
    return problem, plan(problem, "cpsat", 10.0)


def test_new_pipelines_land_where_the_weights_are_cheap_to_fetch():
    """The weights live on node a; node b reads them from disk (1 Gbit/s to a). At a 4 s
    re-plan interval a whole model costs b twice a replica's tokens/s, but a next to nothing
    (NVLink): the plan adds the replica on a's free A100 and none on b's, equally fast ones,
    and charges it a's price, not the slowest node's."""
    current = "    - stages: [{device: a/A100-80GB.0, start: 0, end: 32}]"
    problem, result = _plan_move(current, 4.0)
    mig = problem.migration
    prices = {problem.kinds[p].node: mu for p, mu in enumerate(mig.pool_tok_s_per_byte)}
    assert prices["b"] == pytest.approx(mig.tok_s_per_byte)  # b is the slowest node
    assert prices["b"] > 100 * prices["a"]
    assert result.status == "OPTIMAL"
    new = [p for p in result.pipelines if not p.kept]
    assert len(new) == 1 and result.migration.kept_pipelines == 1
    assert {s.node for p in new for s in p.stages} == {"a"}
    assert len(result.pipelines) == 2  # b's devices stay idle: fetching there costs more
    one = new[0].throughput_tok_s
    scalar_charge = mig.tok_s_per_byte * problem.model_weight_bytes
    assert scalar_charge > one  # at the scalar price no new replica is worth its move
    charge = result.migration.weight_charge_tok_s
    assert charge == pytest.approx(prices["a"] * problem.model_weight_bytes, rel=1e-9)
    assert charge < scalar_charge / 100
    # the objective is what the pipelines give less what the report says they are charged
    kv = mig.tok_s_per_byte * result.migration.kv_bytes
    assert result.objective == pytest.approx(result.throughput_tok_s - charge - kv, rel=1e-9)
    # priced at the slowest node's fetch, the plan keeps the current replica alone
    _, blind = _plan_move(current, 4.0, pool_prices=False)
    assert [p.kept for p in blind.pipelines] == [True]
    assert result.throughput_tok_s == pytest.approx(2 * blind.throughput_tok_s, rel=1e-9)


def test_no_nodes_keeps_one_migration_price(write_spec):
    from planner.master import build_master

    spec = load_spec(
        write_spec(
            GOOD.split("nodes:")[0]
            + "workload:"
            + GOOD.split("workload:")[1]
            + "current:\n  pipelines:\n    - stages: [{device: A100-80GB.0, start: 0, end: 40}, {device: A100-80GB.1, start: 40, end: 80}]\n"
        )
    )
    problem = build_problem(spec)
    assert problem.migration is not None and problem.migration.pool_tok_s_per_byte == ()
    master = build_master(problem)
    new = [c for c in master.columns if c.shape is not None]
    assert new and all(c.move_tok_s is None for c in new)
    mu = problem.migration.tok_s_per_byte
    c = new[0]
    assert master.net_value(master.columns.index(c)) == pytest.approx(
        c.throughput_tok_s - mu * problem.model_weight_bytes
    )


def _recosted(problem, result) -> float:
    """Returns the master objective of a plan's pipelines under `problem`'s prices."""
    from planner.assign import migration_of

    m = migration_of(problem, result.pipelines)
    return (
        result.throughput_tok_s
        - m.weight_charge_tok_s
        - problem.migration.tok_s_per_byte * m.kv_bytes
    )


@pytest.mark.parametrize("seed", range(16))
def test_backends_hit_migration_reference_with_node_prices(seed):
    """A current pipeline on 1-2 nodes, moves priced per node: every listed backend reaches
    the exact DP's optimum (every ordered layout, the cheapest move at the best bottleneck),
    the plan's pipelines and charges give that objective, and column generation (a relaxation
    with a topology) stays within the bound it proves."""
    from dataclasses import replace

    from planner.dp import reference_migration_objective
    from planner.topology_instances import random_topology_problem_with_current

    problem = random_topology_problem_with_current(seed)
    assert len(set(problem.migration.pool_tok_s_per_byte)) >= 1
    ref = reference_migration_objective(problem)
    feasible = reference_throughput_tok_s(replace(problem, migration=None)) > 0
    for backend in ("cpsat", "highs", "cbc"):
        r = plan(problem, backend, 10.0)
        if not feasible:
            assert r.status == "INFEASIBLE", backend
            continue
        assert r.status == "OPTIMAL", backend
        assert r.objective == pytest.approx(ref, rel=1e-7), backend
        assert _recosted(problem, r) == pytest.approx(ref, rel=1e-7), backend
    lazy = plan(problem, "highs", 10.0, shapes="lazy")
    if feasible:
        assert lazy.objective <= ref + 1e-7 * abs(ref) <= lazy.bound + 2e-7 * abs(ref)


def test_node_prices_change_the_plan_on_some_instances():
    """Planned at the slowest node's price and re-costed at each node's, the plan is worse
    than the one planned at each node's price on some random instances."""
    from dataclasses import replace

    from planner.topology_instances import random_topology_problem_with_current

    better = 0
    for seed in range(16):
        problem = random_topology_problem_with_current(seed)
        scalar = replace(problem, migration=replace(problem.migration, pool_tok_s_per_byte=()))
        blind = plan(scalar, "cpsat", 10.0)
        if blind.objective is None:
            continue
        aware = plan(problem, "cpsat", 10.0)
        better += aware.objective > _recosted(problem, blind) * (1 + 1e-6)
    assert better >= 2


def test_nodes_that_hold_the_weights_are_not_interchangeable():
    """Three identical nodes, the current pipeline on n0: n0 fetches over its own link, the
    others over the network, so n0 leaves the symmetry class and the plan still matches the
    exact DP with node prices."""
    from dataclasses import replace

    from cost_models.transfer import Link
    from planner.build_problem import with_current
    from planner.dp import reference_migration_objective
    from planner.instances import random_small_problem
    from planner.problem import Device
    from planner.shapes_topology import NodeSymmetry
    from planner.topology import build_topology

    base = random_small_problem(11, max_devices=6, max_layers=16)
    nodes = ("n0", "n1", "n2")
    kinds = tuple(replace(base.kinds[0], node=n) for n in nodes)
    devices = tuple(Device(f"{n}/g{i}", k, n) for k, n in enumerate(nodes) for i in range(2))
    links = {(a, b): Link(200e9, 5e-6) if a == b else Link(1e9, 1e-3) for a in nodes for b in nodes}
    problem = replace(
        base,
        kinds=kinds,
        devices=devices,
        topology=build_topology(links, 64 * 1024, 8 * 2**20),
        ttft_slo_s=None,
        max_stages=6,
    )
    current = [[("n0/g0", 0, problem.n_layers)]]
    interval_s = 2 * problem.model_weight_bytes / 2e9
    priced = with_current(
        problem, current, interval_s, 2e9, pool_move_bandwidths_bytes_per_s=[200e9, 2e9, 2e9]
    )
    assert NodeSymmetry(priced).classes == [["n0"], ["n1", "n2"]]
    r = plan(priced, "cpsat", 10.0)
    assert r.status == "OPTIMAL"
    assert r.objective == pytest.approx(reference_migration_objective(priced), rel=1e-7)
