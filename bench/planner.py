"""Planner benchmark: exactness on small instances, a 64-device cluster, and re-planning.

    python bench/planner.py [--small N] [--limit S] [--no-docs] [--only a,b,c,d,e,f,g]

a. N random small instances (<= 8 devices, <= 32 layers) against the exact DP
   (planner/dp.py): every backend must hit the optimum; solve-time percentiles.
b. Llama-2-70B (80 layers) on 64 devices of 4 kinds (data/specs/cluster-64-llama2-70b.yaml):
   the shape formulation on CP-SAT, HiGHS and CBC, beside a naive device-slot min-max CP-SAT
   model, all under the same time limit.
c. Re-planning after 8 devices leave and after 8 join: the migration-aware plan against a
   from-scratch plan (throughput, bytes moved).
d. Topology: Llama-2-70B on 8 nodes of 4 GPUs in two regions joined by a 1 Gbit/s link, on
   every backend, beside the topology-blind plan re-costed on the real links.
e. No size limit: 16 device kinds x 16 devices (256), Llama-2-70B (80 layers), up to 16
   stages per pipeline, TPOT SLO: column generation (C(16 + 16, 16) count vectors cannot be
   listed), on every backend within 60 s; gap against the LP bound over every shape.
f. The former limit, 8 kinds x 8 devices with 10 stages (and 12): the cluster spec's
   workload with its TTFT SLO (5 s) and TPOT SLO (400 ms), by column generation; and the
   same without the TTFT SLO.
g. Several models: Llama-2-70B, Qwen2.5-32B and Llama-3.1-8B sharing 32 devices of 4 kinds,
   on every backend; and the same three on the 256 devices of e (column generation).
Prints tables, writes bench/out/planner.json and the `## Planner` section of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

from ortools.sat.python import cp_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cost_models.device_catalog import get_device_kind  # noqa: E402
from cost_models.paths import specs_dir  # noqa: E402
from planner.assign import migration_of  # noqa: E402
from planner.build_problem import build_problem, with_current  # noqa: E402
from planner.dp import reference_throughput_tok_s  # noqa: E402
from planner.evaluate import build_pipeline, pipeline_violations  # noqa: E402
from planner.instances import random_small_problem  # noqa: E402
from planner.problem import Device, PlanningProblem  # noqa: E402
from planner.solution import PlanResult  # noqa: E402
from planner.solve import BACKENDS, plan  # noqa: E402
from planner.spec import load_spec  # noqa: E402

CLUSTER_SPEC = specs_dir() / "cluster-64-llama2-70b.yaml"
OUT = ROOT / "bench/out/planner.json"
RESULTS = ROOT / "docs/results.md"
MACHINE = "2-core x86_64 CPU, no GPU"
GIB = 2**30


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# --- a. small instances against the exact DP ---------------------------------------------


def bench_small(n: int) -> dict:
    rows = []
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    misses: dict[str, int] = {b: 0 for b in BACKENDS}
    for seed in range(n):
        problem = random_small_problem(seed)
        ref = reference_throughput_tok_s(problem)
        row = {
            "seed": seed,
            "layers": problem.n_layers,
            "kinds": list(problem.kind_counts),
            "reference_tok_s": ref,
        }
        for b in BACKENDS:
            r = plan(problem, b, 10.0)
            got = r.objective or 0.0
            hit = abs(got - ref) <= 1e-6 * max(1.0, ref) and (
                r.status == "OPTIMAL" or (ref == 0 and r.status == "INFEASIBLE")
            )
            misses[b] += not hit
            times[b].append(r.solve_s)
            row[b] = {"objective": got, "status": r.status, "solve_s": r.solve_s, "hit": hit}
        rows.append(row)
    summary = {
        b: {
            "hits": n - misses[b],
            "n": n,
            "p50_s": pct(times[b], 50),
            "p95_s": pct(times[b], 95),
            "max_s": max(times[b]),
        }
        for b in BACKENDS
    }
    feasible = sum(1 for r in rows if r["reference_tok_s"] > 0)
    return {"n": n, "feasible": feasible, "summary": summary, "rows": rows}


# --- b. 80 layers x 64 devices -------------------------------------------------------------


def naive_minmax_cpsat(problem: PlanningProblem, time_limit_s: float, n_slots: int) -> dict:
    """A device-slot model: x[d,p] puts device d in pipeline slot p, m[d,p] its layers,
    T[p] >= stage time of every member (min-max), throughput[p] = batch / T[p] by integer
    division. No shapes, no symmetry breaking; embedding/head time and the TPOT/TTFT SLOs are
    left out and KV memory is costed for 4 stages (so it is, if anything, a relaxation)."""
    t0 = time.perf_counter()
    L = problem.n_layers
    devs = problem.devices
    us = 1e6
    model = cp_model.CpModel()
    x, m = {}, {}
    caps = []
    for d in devs:
        k = problem.kinds[d.kind]
        per_layer = problem.stage_memory_bytes(1, 4, False, False)
        caps.append(max(0, min(L, int(k.memory_bytes // per_layer))))
    t_max = (
        int(max(k.layer_decode_s for k in problem.kinds) * L * us + problem.hop_decode_s * us) + 1
    )
    active = [model.new_bool_var(f"active[{p}]") for p in range(n_slots)]
    T = [model.new_int_var(1, t_max, f"T[{p}]") for p in range(n_slots)]
    thr = [model.new_int_var(0, 10**9, f"thr[{p}]") for p in range(n_slots)]
    for i, d in enumerate(devs):
        td = round(problem.kinds[d.kind].layer_decode_s * us)
        hop = round(problem.hop_decode_s * us)
        for p in range(n_slots):
            x[i, p] = model.new_bool_var(f"x[{i},{p}]")
            m[i, p] = model.new_int_var(0, caps[i], f"m[{i},{p}]")
            model.add(m[i, p] <= caps[i] * x[i, p])
            model.add(m[i, p] >= x[i, p])
            model.add(T[p] >= td * m[i, p] + hop * x[i, p])
        model.add(sum(x[i, p] for p in range(n_slots)) <= 1)
    num = problem.batch * 1000 * int(us)  # milli-tokens/s = batch * 1e3 * 1e6 / T_us
    for p in range(n_slots):
        model.add(sum(m[i, p] for i in range(len(devs))) == L * active[p])
        q = model.new_int_var(0, num, f"q[{p}]")
        model.add_division_equality(q, num, T[p])
        model.add(thr[p] <= q)
        model.add(thr[p] <= num * active[p])
    model.maximize(sum(thr))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 2
    solver.parameters.random_seed = 17
    status = solver.solve(model)
    out = {
        "status": solver.status_name(status),
        "solve_s": time.perf_counter() - t0,
        "n_slots": n_slots,
        "variables": len(x) * 2 + 3 * n_slots,
    }
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        obj = solver.objective_value / 1000
        bound = solver.best_objective_bound / 1000
        out.update(objective=obj, bound=bound, gap=(bound - obj) / obj if obj > 0 else None)
        # what its pipelines give under the full model (embedding, head, SLOs, KV per stage)
        valid = 0.0
        for p in range(n_slots):
            members = [i for i in range(len(devs)) if solver.value(x[i, p])]
            if not members:
                continue
            start, stages = 0, []
            for i in members:
                n = solver.value(m[i, p])
                stages.append((devs[i].name, start, start + n))
                start += n
            pipe = build_pipeline(problem, stages)
            if not pipeline_violations(problem, pipe):
                valid += pipe.throughput_tok_s
        out["evaluated_tok_s"] = valid
    else:
        out.update(objective=None, bound=None, gap=None)
    return out


EIGHT_KINDS = ("H100-SXM", "A100-80GB", "A100-40GB", "L40S", "L40", "L4", "A10G", "V100-32GB")


def eight_kind_problem(like: PlanningProblem) -> PlanningProblem:
    """Returns the cluster spec's workload on 8 devices of each of 8 kinds."""
    spec = load_spec(CLUSTER_SPEC)
    groups = [{"kind": k, "count": 8, "node": f"n{i}"} for i, k in enumerate(EIGHT_KINDS)]
    data = spec.model_dump(exclude={"base_dir"})
    data["devices"] = groups
    eight = build_problem(type(spec).model_validate({**data, "base_dir": spec.base_dir}))
    assert eight.n_layers == like.n_layers
    return eight


def result_row(r: PlanResult) -> dict:
    return {
        "status": r.status,
        "objective": r.objective,
        "bound": r.bound,
        "gap": r.gap,
        "solve_s": r.solve_s,
        "pipelines": len(r.pipelines),
        "details": r.details,
        "throughput_tok_s": r.throughput_tok_s,
    }


def bench_cluster(limit_s: float) -> dict:
    problem = build_problem(load_spec(CLUSTER_SPEC))
    rows = {b: result_row(plan(problem, b, limit_s)) for b in BACKENDS}
    opt = rows["cpsat"]["objective"]
    # the spec caps pipelines at 16 stages; check that a longer cap finds nothing better
    rows["cpsat_max_stages_24"] = result_row(
        plan(replace(problem, max_stages=24), "cpsat", limit_s)
    )
    n_slots = len(problem.devices) // 2
    rows["naive_cpsat"] = naive_minmax_cpsat(problem, limit_s, n_slots)
    # scaling: the same model on 8 kinds x 8 devices, where shape listing grows fastest
    eight = eight_kind_problem(problem)
    for stages in (8, 10):
        rows[f"eight_kinds_max_stages_{stages}"] = result_row(
            plan(replace(eight, max_stages=stages), "cpsat", limit_s)
        )
    return {
        "spec": str(
            CLUSTER_SPEC.relative_to(ROOT) if CLUSTER_SPEC.is_relative_to(ROOT) else CLUSTER_SPEC
        ),
        "layers": problem.n_layers,
        "devices": len(problem.devices),
        "kinds": {k.name: c for k, c in zip(problem.kinds, problem.kind_counts, strict=True)},
        "limit_s": limit_s,
        "optimum_tok_s": opt,
        "rows": rows,
    }


# --- c. re-planning after devices leave or join ----------------------------------------------


def _as_current(r: PlanResult) -> list[list[tuple[str, int, int]]]:
    return [[(s.device, s.start, s.end) for s in p.stages] for p in r.pipelines]


def _grow(problem: PlanningProblem, counts: dict[str, int]) -> PlanningProblem:
    """Returns the problem with new devices (kind name -> count) on a new node."""
    index = {k.name: i for i, k in enumerate(problem.kinds)}
    new = [
        Device(name=f"join/{name}.{i}", kind=index[name], node="join")
        for name, n in counts.items()
        for i in range(n)
    ]
    return replace(problem, devices=problem.devices + tuple(new))


def bench_replan(limit_s: float) -> dict:
    spec = load_spec(CLUSTER_SPEC)
    base = build_problem(spec)
    start = plan(base, "cpsat", limit_s)
    current = _as_current(start)
    bandwidth = min(get_device_kind(k.name).network_bandwidth_bytes_per_s for k in base.kinds)
    names = [d.name for d in base.devices]
    scenarios: dict[str, PlanningProblem] = {}
    leaving_sets = {}
    for seed in (5, 6, 7):
        leaving = set(random.Random(seed).sample(names, 8))
        leaving_sets[f"leave 8 (seed {seed})"] = sorted(leaving)
        scenarios[f"leave 8 (seed {seed})"] = replace(
            base, devices=tuple(d for d in base.devices if d.name not in leaving)
        )
    kinds = [k.name for k in base.kinds]
    scenarios["join 8 (2 of each kind)"] = _grow(base, {k: 2 for k in kinds})
    scenarios[f"join 8 ({kinds[-1]})"] = _grow(base, {kinds[-1]: 8})
    out = {"start_tok_s": start.throughput_tok_s, "leaving": leaving_sets, "scenarios": {}}
    for name, pool in scenarios.items():
        aware_problem = with_current(pool, current, spec.replan_interval_s, bandwidth)
        scratch = plan(pool, "cpsat", limit_s)
        aware = plan(aware_problem, "cpsat", limit_s)
        # bytes the from-scratch plan would move, measured against the same current config
        scratch_moves = migration_of(aware_problem, scratch.pipelines)
        assert scratch_moves is not None and aware.migration is not None
        out["scenarios"][name] = {
            "devices": len(pool.devices),
            "scratch_tok_s": scratch.throughput_tok_s,
            "aware_tok_s": aware.throughput_tok_s,
            "throughput_ratio": aware.throughput_tok_s / scratch.throughput_tok_s,
            "scratch_move_bytes": scratch_moves.weight_bytes,
            "aware_move_bytes": aware.migration.weight_bytes,
            "move_ratio": (
                aware.migration.weight_bytes / scratch_moves.weight_bytes
                if scratch_moves.weight_bytes
                else 0.0
            ),
            "aware_kept_pipelines": aware.migration.kept_pipelines,
            "aware_status": aware.status,
            "aware_gap": aware.gap,
            "aware_solve_s": aware.solve_s,
            "scratch_solve_s": scratch.solve_s,
        }
    return out


# --- d. topology: 8 nodes in two regions ---------------------------------------------------


def topology_spec_text(max_stages: int = 8) -> str:
    """Returns the 8-node spec: A100 and L40S nodes alternating, 100 Gbit/s NICs, regions
    east (n0-n3) and west (n4-n7) joined by 1 Gbit/s with 2 ms latency."""
    devices = "\n".join(
        f"  - {{kind: {'A100-80GB' if i % 2 == 0 else 'L40S'}, count: 4, node: n{i}}}"
        for i in range(8)
    )
    nodes = "\n".join(
        f"  - {{name: n{i}, nic_gbps: 100, nic_latency_us: 10, "
        f"region: {'east' if i < 4 else 'west'}}}"
        for i in range(8)
    )
    return (
        f"model: Llama-2-70B\ndevices:\n{devices}\nnodes:\n{nodes}\n"
        "links:\n  - {between: [east, west], gbps: 1, latency_us: 2000}\n"
        "workload:\n  prompt_tokens: {mean: 512, p99: 2048}\n"
        "  output_tokens: {mean: 256, p99: 512}\n  batch: 64\n"
        f"max_stages: {max_stages}\n"
    )


def bench_topology(limit_s: float) -> dict:
    from planner.spec import Spec, parse_spec

    spec = parse_spec(topology_spec_text(), source="<bench topology>")
    aware_problem = build_problem(spec)
    rows = {b: result_row(plan(aware_problem, b, limit_s)) for b in BACKENDS}
    blind_spec = Spec.model_validate(
        {**spec.model_dump(exclude={"base_dir"}), "nodes": None, "links": [], "base_dir": "."}
    )
    blind = plan(build_problem(blind_spec), "cpsat", limit_s)
    recosted = [
        build_pipeline(aware_problem, [(s.device, s.start, s.end) for s in p.stages])
        for p in blind.pipelines
    ]
    aware = plan(aware_problem, "cpsat", limit_s)

    def cross_hops(pipelines) -> int:  # noqa: ANN001
        return sum(
            a.node != b.node
            for p in pipelines
            for a, b in zip(p.stages, p.stages[1:], strict=False)
        )

    return {
        "nodes": 8,
        "devices": len(aware_problem.devices),
        "pools": len(aware_problem.kinds),
        "limit_s": limit_s,
        "rows": rows,
        "blind_predicted_tok_s": blind.throughput_tok_s,
        "blind_recosted_tok_s": sum(p.throughput_tok_s for p in recosted),
        "blind_cross_node_hops": cross_hops(blind.pipelines),
        "aware_tok_s": aware.throughput_tok_s,
        "aware_cross_node_hops": cross_hops(aware.pipelines),
    }


# --- e, f. no size limit: column generation ----------------------------------------------------

SIXTEEN_KINDS = (
    "H100-SXM",
    "H100-PCIe",
    "H200",
    "A100-80GB",
    "A100-40GB",
    "L40S",
    "L40",
    "L4",
    "A10G",
    "V100-32GB",
    "RTX-4090",
    "T4",
    "MI300X",
)
# three more kinds the catalog lacks: power-capped parts, slower by these factors
CAPPED = (("H100-SXM", 1.3), ("A100-80GB", 1.25), ("L40S", 1.2))


def many_kind_problem(kinds: int, per_kind: int, max_stages: int) -> PlanningProblem:
    """Returns the cluster spec's workload (TPOT SLO 400 ms, no TTFT SLO: pricing is exact)
    on `per_kind` devices of each of `kinds` kinds (catalog kinds, then power-capped ones)."""
    from planner.problem import Device as Dev
    from planner.spec import Spec

    spec = load_spec(CLUSTER_SPEC)
    data = spec.model_dump(exclude={"base_dir"})
    names = SIXTEEN_KINDS[:kinds]
    data["devices"] = [{"kind": k, "count": per_kind, "node": f"n{i}"} for i, k in enumerate(names)]
    data["slo"] = {"tpot_ms": 400}
    data["max_stages"] = max_stages
    p = build_problem(Spec.model_validate({**data, "base_dir": spec.base_dir}))
    kinds_, devices = list(p.kinds), list(p.devices)
    for base, slow in CAPPED[: max(0, kinds - len(SIXTEEN_KINDS))]:
        k = next(x for x in p.kinds if x.name == base)
        kinds_.append(
            replace(
                k,
                name=f"{base}-capped",
                layer_decode_s=k.layer_decode_s * slow,
                layer_prefill_s=k.layer_prefill_s * slow,
                embed_decode_s=k.embed_decode_s * slow,
                head_decode_s=k.head_decode_s * slow,
            )
        )
        devices += [
            Dev(f"{base}-capped.{i}", len(kinds_) - 1, f"capped-{base}") for i in range(per_kind)
        ]
    return replace(
        p, kinds=tuple(kinds_), devices=tuple(devices), max_stages=min(max_stages, p.n_layers)
    )


def lazy_row(r: PlanResult) -> dict:
    row = result_row(r)
    row.update({k: r.details.get(k) for k in ("iterations", "converged", "lp_bound", "pricing_s")})
    return row


def bench_no_limit(limit_s: float, parts: set[str] = frozenset("ef")) -> dict:
    from planner.shapes import count_vectors_total

    out: dict = {}
    if "e" in parts:
        big = many_kind_problem(16, 16, 16)
        out["e"] = {
            "kinds": 16,
            "devices": len(big.devices),
            "layers": big.n_layers,
            "max_stages": big.max_stages,
            "limit_s": limit_s,
            "count_vectors": count_vectors_total(big.kind_counts, big.max_stages),
            "rows": {b: lazy_row(plan(big, b, limit_s)) for b in BACKENDS},
        }
    if "f" in parts:
        # the former limit as b states it: the cluster's workload and SLOs on 8 kinds x 8
        eight = eight_kind_problem(build_problem(load_spec(CLUSTER_SPEC)))
        out["f"] = {"limit_s": limit_s, "ttft_slo_s": eight.ttft_slo_s, "rows": {}}
        for ttft in ("ttft", "no_ttft"):
            for stages in (10, 12):
                p = replace(eight, max_stages=stages)
                if ttft == "no_ttft":
                    p = replace(p, ttft_slo_s=None)
                out["f"]["rows"][f"{ttft}_max_stages_{stages}"] = {
                    "count_vectors": count_vectors_total(p.kind_counts, p.max_stages),
                    **lazy_row(plan(p, "cpsat", limit_s)),
                }
    return out


# --- g. several models on one pool ----------------------------------------------------------

POOL_MODELS = """models:
  - name: large
    model: Llama-2-70B
    workload: {request_rate_per_s: 4, prompt_tokens: 1024, output_tokens: 256, batch: 16}
    slo: {tpot_ms: 400}
  - name: medium
    model: Qwen2.5-32B
    workload: {request_rate_per_s: 8, prompt_tokens: 1024, output_tokens: 256, batch: 16}
    slo: {tpot_ms: 200}
  - name: small
    model: Llama-3.1-8B
    workload: {request_rate_per_s: 40, prompt_tokens: 512, output_tokens: 200, batch: 32}
    slo: {tpot_ms: 80}
    weight: 2
"""


def bench_pool(limit_s: float, big_limit_s: float) -> dict:
    from planner.build_problem import build_pool_problem
    from planner.problem import PoolProblem
    from planner.solve import plan_pool
    from planner.spec import parse_spec

    devices = "\n".join(
        f"  - {{kind: {k}, count: 8, node: n{i}}}"
        for i, k in enumerate(("H100-SXM", "A100-80GB", "L40S", "L4"))
    )
    spec = parse_spec(f"dtype: bf16\ndevices:\n{devices}\n{POOL_MODELS}", source="<bench pool>")
    pool = build_pool_problem(spec)

    def summary(r: PlanResult) -> dict:
        return {
            **lazy_row(r),
            "models": {
                m.label: {
                    "devices": sum(len(p.stages) for p in m.pipelines),
                    "throughput_tok_s": m.throughput_tok_s,
                    "demand_tok_s": m.demand_tok_s,
                }
                for m in r.models
            },
        }

    out = {
        "devices": len(pool.devices),
        "limit_s": limit_s,
        "rows": {b: summary(plan_pool(pool, b, limit_s)) for b in BACKENDS},
    }
    # the same models, ten times the rates, on 16 devices of each of the 13 catalog kinds:
    # too many count vectors to list, so column generation prices each model
    big_spec = parse_spec(
        "dtype: bf16\ndevices:\n"
        + "\n".join(
            f"  - {{kind: {k}, count: 16, node: n{i}}}" for i, k in enumerate(SIXTEEN_KINDS)
        )
        + "\n"
        + POOL_MODELS.replace("rate_per_s: 4,", "rate_per_s: 40,")
        .replace("rate_per_s: 8,", "rate_per_s: 80,")
        .replace("rate_per_s: 40, prompt_tokens: 512", "rate_per_s: 400, prompt_tokens: 512"),
        source="<bench pool 208>",
    )
    big_pool: PoolProblem = build_pool_problem(big_spec)
    out["big"] = {
        "devices": len(big_pool.devices),
        "kinds": len(big_pool.kind_counts),
        "limit_s": big_limit_s,
        "rows": {"highs": summary(plan_pool(big_pool, "highs", big_limit_s))},
    }
    return out


# --- output ----------------------------------------------------------------------------------


def fmt_gap(g: float | None) -> str:
    return "-" if g is None else f"{g * 100:.3g} %"


def fmt_num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(res: dict, command: str) -> str:
    if "small" not in res:  # e, f, g alone
        return (
            "\n".join(
                [
                    "## Planner",
                    "",
                    f"Command: `{command}`. Machine: {MACHINE}. Date: {res['date']}.",
                ]
                + (no_limit_markdown(res["no_limit"]) if "no_limit" in res else [])
                + (pool_markdown(res["pool"]) if "pool" in res else [])
            )
            + "\n"
        )
    a, b, c = res["small"], res["cluster"], res["replan"]
    d = res.get("topology")
    lines = [
        "## Planner",
        "",
        f"Command: `{command}`. Machine: {MACHINE}. Date: {res['date']}. "
        f"Python {res['python']}, OR-Tools CP-SAT (1 worker, seed 17), PuLP with HiGHS and CBC "
        "(1 thread, seed 17). Solve times include building the shapes (columns).",
        "",
        f"### a. {a['n']} random small instances against the exact DP",
        "",
        f"<= 8 devices of 1-3 kinds, 4-32 layers, half with a TPOT SLO; {a['feasible']} feasible "
        f"(the rest must be reported infeasible). Reference: exhaustive DP over ordered stage "
        "sequences (planner/dp.py).",
        "",
        "| backend | optimum found | p50 solve | p95 solve | max solve |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in a["summary"].items():
        lines.append(
            f"| {name} | {s['hits']}/{s['n']} | {s['p50_s'] * 1000:.1f} ms | "
            f"{s['p95_s'] * 1000:.1f} ms | {s['max_s'] * 1000:.1f} ms |"
        )
    lines += [
        "",
        f"### b. {b['layers']} layers x {b['devices']} devices of 4 kinds (Llama-2-70B)",
        "",
        f"`{b['spec']}`: {', '.join(f'{n} {k}' for k, n in b['kinds'].items())}; "
        f"replicas allowed; time limit {b['limit_s']:g} s each.",
        "",
        "| model / backend | status | objective tok/s | bound tok/s | gap | time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in BACKENDS:
        r = b["rows"][name]
        lines.append(
            f"| shapes / {name} | {r['status']} | {fmt_num(r['objective'])} | "
            f"{fmt_num(r['bound'])} | {fmt_gap(r['gap'])} | {r['solve_s']:.2f} s |"
        )
    r24 = b["rows"]["cpsat_max_stages_24"]
    lines.append(
        f"| shapes / cpsat, max_stages 24 | {r24['status']} | {fmt_num(r24['objective'])} | "
        f"{fmt_num(r24['bound'])} | {fmt_gap(r24['gap'])} | {r24['solve_s']:.2f} s |"
    )
    nv = b["rows"]["naive_cpsat"]
    lines.append(
        f"| naive min-max / cpsat (2 workers) | {nv['status']} | {fmt_num(nv.get('objective'))} | "
        f"{fmt_num(nv.get('bound'))} | {fmt_gap(nv.get('gap'))} | {nv['solve_s']:.2f} s |"
    )
    for stages in (8, 10):
        r8 = b["rows"][f"eight_kinds_max_stages_{stages}"]
        lines.append(
            f"| scaling: 8 kinds x 8 devices, max_stages {stages} / cpsat | {r8['status']} | "
            f"{fmt_num(r8['objective'])} | {fmt_num(r8['bound'])} | {fmt_gap(r8['gap'])} | "
            f"{r8['solve_s']:.2f} s |"
        )
    cols = b["rows"]["cpsat"]["details"]
    lines += [
        "",
        f"The shape model has {cols['columns']} columns (minimal pipeline shapes, built in "
        f"{cols['build_s']:.2f} s). The naive model ({nv['variables']} variables, "
        f"{nv['n_slots']} pipeline slots) leaves out embedding/head time and the SLOs, so its "
        "objective and bound are of an easier problem; its incumbent's pipelines, re-costed "
        f"with the full model, give {fmt_num(nv.get('evaluated_tok_s'))} tok/s. "
        "Why the shape model's bound is tight: devices of a kind are interchangeable and layers "
        "identical, so a pipeline is a count vector per kind whose best bottleneck is found "
        "exactly by binary search over the candidate stage times; only minimal vectors are "
        "kept; the master problem has one row per kind, so its LP relaxation is close to the "
        "integer optimum and there is no symmetry left to branch on. The optimum is only "
        "claimed for pipelines of at most `max_stages` stages (16 in the spec); the 24-stage "
        "row shows the cap does not bind here. Columns are also pruned when two smaller "
        "pipelines on the same devices are worth more.",
        "",
        "Scaling, honestly: listing shapes costs one binary search per count vector, and the "
        "vectors grow as C(max_stages + kinds, kinds). With 8 kinds x 8 devices it is certified "
        "optimal for up to 8 stages per pipeline, but with 10 stages the listing does not end "
        "within the limit; the planner then stops listing at 70 % of the limit, answers with "
        "the best plan it has (here the greedy fallback, 14 % below the 8-stage optimum) and "
        "reports FEASIBLE with an unknown gap rather than a bound it cannot prove.",
        "",
        "### c. Re-planning after 8 devices leave or join (migration term on)",
        "",
        f"Start: the optimal plan for the 64 devices ({c['start_tok_s']:,.0f} tok/s). "
        "From scratch: the same solver without the current configuration; bytes are the weight "
        "bytes devices must newly load, both measured against the same current configuration.",
        "",
        "| event | from-scratch tok/s | migration-aware tok/s | ratio (goal >= 95 %) | "
        "from-scratch moves | aware moves | ratio (goal <= 25 %) | kept pipelines | aware solve |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in c["scenarios"].items():
        lines.append(
            f"| {name} | {s['scratch_tok_s']:,.0f} | {s['aware_tok_s']:,.0f} | "
            f"{s['throughput_ratio'] * 100:.1f} % | {s['scratch_move_bytes'] / GIB:,.0f} GiB | "
            f"{s['aware_move_bytes'] / GIB:,.0f} GiB | {s['move_ratio'] * 100:.1f} % | "
            f"{s['aware_kept_pipelines']} | {s['aware_solve_s']:.2f} s |"
        )
    if d is not None:
        lines += topology_markdown(d)
    if "no_limit" in res:
        lines += no_limit_markdown(res["no_limit"])
    if "pool" in res:
        lines += pool_markdown(res["pool"])
    return "\n".join(lines) + "\n"


def no_limit_markdown(nl: dict) -> list[str]:
    e, f = nl.get("e"), nl.get("f")
    lines = [""]
    if e is not None:
        lines += [
            f"### e. No size limit: {e['devices']} devices of {e['kinds']} kinds, {e['layers']} "
            f"layers, up to {e['max_stages']} stages",
            "",
            f"Llama-2-70B, the cluster spec's workload with a TPOT SLO of 400 ms; "
            f"{e['count_vectors']:,} count vectors, so shapes come from column generation "
            f"(docs/planner.md); time limit {e['limit_s']:g} s. The bound is the LP relaxation "
            "over every shape (Lagrangian when pricing had not finished).",
            "",
        ]
    if f is not None:
        lines += [
            "f: the former limit, 8 kinds x 8 devices (the cluster spec's workload, TPOT SLO "
            f"400 ms, TTFT SLO {f['ttft_slo_s']:g} s unless 'no ttft'), time limit "
            f"{f['limit_s']:g} s.",
            "",
        ]
    lines += [
        "| backend / case | status | objective tok/s | bound tok/s | gap | time | LP rounds | "
        "columns |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [(f"e / {b}", r) for b, r in (e or {"rows": {}})["rows"].items()]
    rows += [
        (f"f: 8 kinds x 8, {k.replace('_', ' ')} / cpsat", r)
        for k, r in (f or {"rows": {}})["rows"].items()
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['status']} | {fmt_num(r['objective'])} | {fmt_num(r['bound'])} | "
            f"{fmt_gap(r['gap'])} | {r['solve_s']:.2f} s | {r.get('iterations')} | "
            f"{r['details'].get('columns')} |"
        )
    return lines


def pool_markdown(g: dict) -> list[str]:
    lines = [
        "",
        f"### g. Several models on one pool ({g['devices']} devices; 208 devices)",
        "",
        "Llama-2-70B, Qwen2.5-32B and Llama-3.1-8B (weight 2) with their own rates and TPOT "
        "SLOs (bench/planner.py `POOL_MODELS`) on 8 H100-SXM, 8 A100-80GB, 8 L40S, 8 L4; then "
        "ten times the rates on 16 devices of each of 13 kinds (column generation). Objective: "
        "weighted SLO goodput (docs/planner.md).",
        "",
        "| case / backend | status | objective | gap | time | devices (tok/s / demand) per model |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = [(f"32 devices / {b}", r) for b, r in g["rows"].items()]
    rows += [(f"208 devices / {b}", r) for b, r in g["big"]["rows"].items()]
    for name, r in rows:
        split = "; ".join(
            f"{m}: {x['devices']} ({x['throughput_tok_s']:,.0f} / {x['demand_tok_s']:,.0f})"
            for m, x in r["models"].items()
        )
        lines.append(
            f"| {name} | {r['status']} | {fmt_num(r['objective'])} | {fmt_gap(r['gap'])} | "
            f"{r['solve_s']:.2f} s | {split} |"
        )
    return lines


def topology_markdown(d: dict) -> list[str]:
    lines = [
        "",
        f"### d. Topology: Llama-2-70B on {d['nodes']} nodes of 4 GPUs ({d['pools']} pools)",
        "",
        "A100-80GB and L40S nodes alternating, 100 Gbit/s NICs, two regions of four nodes "
        "joined by 1 Gbit/s (2 ms); max_stages 8; every hop costed on the link it uses "
        f"(bench/planner.py `topology_spec_text`); time limit {d['limit_s']:g} s.",
        "",
        "| backend | status | objective tok/s | bound tok/s | gap | time | shape listing |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in BACKENDS:
        r = d["rows"][name]
        lines.append(
            f"| {name} | {r['status']} | {fmt_num(r['objective'])} | {fmt_num(r['bound'])} | "
            f"{fmt_gap(r['gap'])} | {r['solve_s']:.2f} s | {r['details'].get('build_s', 0):.2f} s |"
        )
    lines += [
        "",
        f"Topology-blind plan (every hop at the slowest link): predicts "
        f"{d['blind_predicted_tok_s']:,.0f} tok/s, re-costed on the real links "
        f"{d['blind_recosted_tok_s']:,.0f} tok/s with {d['blind_cross_node_hops']} cross-node "
        f"hops; the topology-aware plan: {d['aware_tok_s']:,.0f} tok/s with "
        f"{d['aware_cross_node_hops']}.",
    ]
    return lines


def write_section(text: str) -> None:
    """Replaces (or appends) the `## Planner` section of docs/results.md, keeping the rest."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Results\n\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, x in enumerate(lines) if x.strip() == "## Planner"), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        new = (
            "".join(lines[:start])
            + text
            + ("\n" if end < len(lines) else "")
            + "".join(lines[end:])
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=200, help="random small instances (default 200)")
    ap.add_argument("--limit", type=float, default=30.0, help="time limit for b and c, seconds")
    ap.add_argument("--no-docs", action="store_true", help="do not touch docs/results.md")
    ap.add_argument(
        "--print-markdown", action="store_true", help="print the results section's markdown"
    )
    ap.add_argument(
        "--only", default="a,b,c,d", help="parts to run, e.g. d or e,f,g (implies --no-docs)"
    )
    args = ap.parse_args()
    parts = set(args.only.split(","))
    if not parts >= {"a", "b", "c", "d"}:
        args.no_docs = True
    command = "python bench/planner.py" + (f" --small {args.small}" if args.small != 200 else "")
    res: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "machine": MACHINE,
    }

    t = time.perf_counter()
    if "a" in parts:
        res["small"] = bench_small(args.small)
        print(f"a. {args.small} small instances ({time.perf_counter() - t:.0f} s)")
        print(f"   {'backend':<8}{'hits':>10}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for name, s in res.get("small", {}).get("summary", {}).items():
        print(
            f"   {name:<8}{s['hits']:>6}/{s['n']:<3}{s['p50_s'] * 1000:>10.1f}"
            f"{s['p95_s'] * 1000:>10.1f}{s['max_s'] * 1000:>10.1f}"
        )

    t = time.perf_counter()
    if "b" in parts:
        res["cluster"] = bench_cluster(args.limit)
        print(f"b. 80 layers x 64 devices ({time.perf_counter() - t:.0f} s)")
    for name, r in res.get("cluster", {}).get("rows", {}).items():
        print(
            f"   {name:<12}{r['status']:<10} obj {fmt_num(r.get('objective')):>12} "
            f"bound {fmt_num(r.get('bound')):>12} gap {fmt_gap(r.get('gap')):>10} "
            f"{r['solve_s']:.2f} s"
        )

    t = time.perf_counter()
    if "c" in parts:
        res["replan"] = bench_replan(args.limit)
        print(f"c. re-planning ({time.perf_counter() - t:.0f} s)")
    for name, s in res.get("replan", {}).get("scenarios", {}).items():
        print(
            f"   {name:<8} throughput {s['throughput_ratio'] * 100:.1f} % of from-scratch, "
            f"moves {s['aware_move_bytes'] / GIB:.0f} GiB vs {s['scratch_move_bytes'] / GIB:.0f} "
            f"GiB ({s['move_ratio'] * 100:.1f} %), {s['aware_kept_pipelines']} kept"
        )

    t = time.perf_counter()
    if "d" in parts:
        res["topology"] = d = bench_topology(args.limit)
        print(f"d. topology, 8 nodes x 4 GPUs ({time.perf_counter() - t:.0f} s)")
        for name, r in d["rows"].items():
            print(
                f"   {name:<8}{r['status']:<10} obj {fmt_num(r.get('objective')):>12} "
                f"bound {fmt_num(r.get('bound')):>12} gap {fmt_gap(r.get('gap')):>10} "
                f"{r['solve_s']:.2f} s (shapes {r['details'].get('build_s', 0):.2f} s)"
            )
        print(
            f"   blind plan {d['blind_predicted_tok_s']:,.0f} tok/s predicted, "
            f"{d['blind_recosted_tok_s']:,.0f} re-costed ({d['blind_cross_node_hops']} cross-node "
            f"hops); aware {d['aware_tok_s']:,.0f} ({d['aware_cross_node_hops']})"
        )

    t = time.perf_counter()
    if "e" in parts or "f" in parts:
        res["no_limit"] = nl = bench_no_limit(60.0, parts)
        print(f"e, f. column generation ({time.perf_counter() - t:.0f} s)")
        e = nl.get("e")
        if e is not None:
            print(
                f"   e: {e['kinds']} kinds, {e['devices']} devices, {e['layers']} layers, "
                f"max_stages {e['max_stages']}, {e['count_vectors']:,} count vectors"
            )
        e_rows = e["rows"] if e is not None else {}
        f_rows = nl["f"]["rows"] if "f" in nl else {}
        for name, r in [*e_rows.items(), *f_rows.items()]:
            print(
                f"   {name:<14}{r['status']:<10} obj {fmt_num(r.get('objective')):>12} "
                f"bound {fmt_num(r.get('bound')):>12} gap {fmt_gap(r.get('gap')):>10} "
                f"{r['solve_s']:.2f} s ({r.get('iterations')} LP rounds, "
                f"pricing {r.get('pricing_s') or 0:.1f} s, {r['details'].get('columns')} columns)"
            )

    t = time.perf_counter()
    if "g" in parts:
        res["pool"] = g = bench_pool(args.limit, 60.0)
        print(f"g. several models ({time.perf_counter() - t:.0f} s)")
        for name, r in [
            *g["rows"].items(),
            *(("208 devices / " + k, v) for k, v in g["big"]["rows"].items()),
        ]:
            split = ", ".join(
                f"{m}: {x['devices']} dev {x['throughput_tok_s']:,.0f}/{x['demand_tok_s']:,.0f} tok/s"
                for m, x in r["models"].items()
            )
            print(
                f"   {name:<16}{r['status']:<10} obj {fmt_num(r.get('objective')):>12} "
                f"gap {fmt_gap(r.get('gap')):>10} {r['solve_s']:.2f} s  [{split}]"
            )

    out_path = (
        OUT
        if parts >= {"a", "b", "c", "d"}
        else OUT.with_name(f"planner-{''.join(sorted(parts))}.json")
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out_path.relative_to(ROOT)}")
    if args.print_markdown:
        print(markdown(res, command + (f" --only {args.only}" if args.only != "a,b,c,d" else "")))
    if not args.no_docs:
        write_section(markdown(res, command))
        print(f"updated {RESULTS.relative_to(ROOT)} (## Planner)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
