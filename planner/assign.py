"""Which concrete device runs each stage, and what a configuration change moves.

The solvers decide shapes (devices per kind); here each stage gets a device. With a current
configuration, devices of one kind go to stages by a min-cost assignment whose cost is the
layers a device would have to load; without one, devices are taken in spec order, keeping a
pipeline on one node where the pool allows.
"""

from __future__ import annotations

from collections.abc import Sequence

from ortools.graph.python import linear_sum_assignment

from planner.migration_prices import has_pool_prices, stages_charge_tok_s
from planner.problem import PlanningProblem
from planner.solution import Migration, Pipeline

StageSlot = tuple[int, int, int]  # (kind, start, end)


def held_ranges(problem: PlanningProblem) -> dict[str, tuple[int, int]]:
    """Returns the layer range each device holds in the current configuration."""
    if problem.migration is None:
        return {}
    return {s.device: (s.start, s.end) for p in problem.migration.current for s in p}


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def min_cost_assignment(costs: Sequence[Sequence[int]]) -> list[int]:
    """Returns the column of each row that minimises the summed cost, each column used once.

    Rows are things to place, columns the devices they can go to (`len(rows) <= len(columns)`;
    spare columns stay unused). Costs are integers. Among assignments of equal cost the one
    with the smallest sum of column indices wins, so the answer is deterministic: each real
    row's arc costs `cost * scale + column`, with `scale` larger than any sum of column
    indices (and the solver itself is deterministic). OR-Tools' linear sum assignment on the
    square matrix padded with zero-cost rows (a padding row is a device left idle). Raises
    ValueError for more rows than columns.
    """
    n_rows = len(costs)
    n_cols = len(costs[0]) if costs else 0
    if n_rows == 0:
        return []
    if any(len(row) != n_cols for row in costs):
        raise ValueError(f"every row needs {n_cols} costs, one per column")
    if n_rows > n_cols:
        raise ValueError(f"{n_rows} things to place on {n_cols} devices: give at least {n_rows}")
    scale = max(4096, n_cols * n_cols)  # a sum of distinct column indices is < n_cols**2
    solver = linear_sum_assignment.SimpleLinearSumAssignment()
    for r in range(n_cols):
        for c in range(n_cols):
            solver.add_arc_with_cost(r, c, int(costs[r][c]) * scale + c if r < n_rows else 0)
    status = solver.solve()
    if status != solver.OPTIMAL:
        raise RuntimeError(
            f"min-cost assignment of {n_rows} rows to {n_cols} columns failed ({status})"
        )
    return [solver.right_mate(r) for r in range(n_rows)]


def assign_devices(
    problem: PlanningProblem, slots: Sequence[Sequence[StageSlot]], taken: set[str]
) -> list[list[tuple[str, int, int]]]:
    """Returns, per new pipeline, its (device, start, end) stages; `taken` devices are skipped."""
    free = [d for d in problem.devices if d.name not in taken]
    held = held_ranges(problem)
    out: list[list[tuple[str, int, int]]] = [[("", s, e) for _, s, e in p] for p in slots]
    if held:
        for kind in range(len(problem.kinds)):
            want = [
                (i, j) for i, p in enumerate(slots) for j, (k, _, _) in enumerate(p) if k == kind
            ]
            have = [d for d in free if d.kind == kind]
            if not want:
                continue
            costs = [
                [(e - s) - _overlap((s, e), held.get(dev.name, (0, 0))) for dev in have]
                for _, s, e in (slots[i][j] for i, j in want)
            ]
            for (i, j), c in zip(want, min_cost_assignment(costs), strict=True):
                _, s, e = slots[i][j]
                out[i][j] = (have[c].name, s, e)
        return out
    used: set[str] = set()
    for i, p in enumerate(slots):
        node = None
        for j, (kind, s, e) in enumerate(p):
            pool = [d for d in free if d.kind == kind and d.name not in used]
            dev = next((d for d in pool if d.node == node), pool[0])
            used.add(dev.name)
            node = dev.node
            out[i][j] = (dev.name, s, e)
    return out


def migration_of(problem: PlanningProblem, pipelines: Sequence[Pipeline]) -> Migration | None:
    """Returns the bytes moving from the current configuration to `pipelines` (None if none),
    and what the objective charges the new pipelines' loads: sum over their stages of
    mu_p * b_i (planner/migration_prices.py), mu * model_weight_bytes each with one price."""
    if problem.migration is None:
        return None
    held = held_ranges(problem)
    present = {d.name for d in problem.devices}
    # a layer can come from a peer when some present device holds it now
    peer_layers = {layer for dev, (s, e) in held.items() if dev in present for layer in range(s, e)}
    w = problem.layer_weight_bytes
    loads, frees = [], []
    peer_bytes = disk_bytes = 0.0
    new_ranges: dict[str, tuple[int, int]] = {}
    for p in pipelines:
        for st in p.stages:
            new_ranges[st.device] = (st.start, st.end)
            old = held.get(st.device, (0, 0))
            fresh = [layer for layer in range(st.start, st.end) if not old[0] <= layer < old[1]]
            # one load per contiguous run (a stage can grow at both ends)
            for layer in fresh:
                if loads and loads[-1][0] == st.device and loads[-1][2] == layer:
                    loads[-1] = (st.device, loads[-1][1], layer + 1)
                else:
                    loads.append((st.device, layer, layer + 1))
            for layer in fresh:
                if layer in peer_layers:
                    peer_bytes += w
                else:
                    disk_bytes += w
    for dev, (s, e) in held.items():
        new = new_ranges.get(dev, (0, 0))  # (0, 0): the device holds nothing now
        # the dropped part of the old range (freed once the switch is done)
        if s < min(e, new[0]):
            frees.append((dev, s, min(e, new[0])))
        if max(s, new[1]) < e:
            frees.append((dev, max(s, new[1]), e))
    kept = [p for p in pipelines if p.kept]
    kept_idx = {tuple(st.device for st in p.stages) for p in kept}
    kv = sum(
        q
        for stages, q in zip(
            problem.migration.current, problem.migration.kv_bytes_per_pipeline, strict=True
        )
        if tuple(s.device for s in stages) not in kept_idx
    )
    kind_of = {d.name: d.kind for d in problem.devices}
    charge = 0.0
    for p in pipelines:
        if p.kept:
            continue
        if has_pool_prices(problem):
            charge += stages_charge_tok_s(
                problem, [(kind_of[st.device], st.end - st.start) for st in p.stages]
            )
        else:
            charge += problem.migration.tok_s_per_byte * problem.model_weight_bytes
    return Migration(
        weight_bytes=peer_bytes + disk_bytes,
        weight_bytes_from_peer=peer_bytes,
        weight_bytes_from_disk=disk_bytes,
        kv_bytes=kv,
        kept_pipelines=len(kept),
        loads=tuple(loads),
        frees=tuple(frees),
        weight_charge_tok_s=charge,
    )
