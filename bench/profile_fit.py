"""Out-of-sample check of a measured profile: fit on a corner of the grid, predict the rest.

    python bench/profile_fit.py [--profile PROFILE.yaml] [--max-batch 4] [--max-context 1024]
    python bench/profile_fit.py --measure [--layers 4] [--repeats 5] [--out PROFILE.yaml]

With --measure, times the real SmolLM2-135M layers on this machine (agent/profiling.py) over
batch 1-16 x context 128-4096 (decode) and prompts of 32-2048 tokens (prefill), and writes the
profile. Then fits the roofline's factors on the points with batch <= --max-batch and context
(prompt tokens for prefill) <= --max-context only, and prints, for every other point, the
measured time against two predictions:
  roofline: the fitted roofline alone (cost_models/calibration.py);
  planner:  what the planner does with a profile that covers only the corner - the corner's
            table, and the roofline anchored to its nearest edge beyond it
            (cost_models/profile.py).
Writes bench/out/profile_fit.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cost_models.calibration import mape, predict_s  # noqa: E402
from cost_models.device_catalog import get_device_kind  # noqa: E402
from cost_models.memory import dtype_bytes_of  # noqa: E402
from cost_models.model_catalog import get_model_arch  # noqa: E402
from cost_models.profile import (  # noqa: E402
    Profile,
    holdout_fit,
    load_profile,
    points_of_profile,
    profile_of_points,
    save_profile,
    split_points,
)
from cost_models.profiled_latency import operating_costs  # noqa: E402

OUT = ROOT / "bench" / "out"


def measure(args: argparse.Namespace) -> Profile:
    """Returns the profile measured on this machine (and writes it to --out)."""
    import torch

    from agent import profiling
    from cost_models.calibration import fit_efficiency

    torch.set_num_threads(1)
    setup = profiling.ProfilingSetup(layers=args.layers, repeats=args.repeats)
    stage, arch, origin = profiling.build_stage(setup)
    print(f"measuring {arch.name} layers [{stage.start}, {stage.end}), fp32, 1 thread, {origin}")
    batches = [1, 2, 4, 8, 16]
    points = profiling.measure_grid(
        stage, arch, "cpu", batches, [128, 512, 1024, 2048, 4096], [1], [32, 128, 512, 2048], setup
    )
    overhead_s = profiling.measure_overhead_s(setup)
    fit = fit_efficiency(arch, get_device_kind("cpu"), points, 4, overhead_s=overhead_s)
    profile = profile_of_points(
        "cpu",
        arch.name,
        "fp32",
        profiling.host_description("cpu", 1),
        points,
        fit,
        head_s=profiling.measure_head_s(arch, batches, setup),
        measured_overhead_s=overhead_s,
        path=args.out,
    )
    save_profile(args.out, profile)
    print(f"wrote {args.out}")
    return load_profile(args.out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None, help="a profile to read instead of measuring")
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(OUT / "profile-cpu.yaml"))
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-context", type=int, default=1024)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.measure or args.profile is None:
        profile = measure(args)
    else:
        profile = load_profile(args.profile)
    arch = get_model_arch(profile.model)
    kind = get_device_kind(profile.kind)
    dtype_bytes = dtype_bytes_of(profile.dtype)
    points = points_of_profile(profile)
    overhead_s = profile.fit_stats.get("measured_overhead_s")
    result = holdout_fit(
        arch, kind, points, dtype_bytes, overhead_s, args.max_batch, args.max_context
    )
    # The planner's view: a profile holding only the corner, roofline anchored beyond it.
    fit_part, _ = split_points(points, args.max_batch, args.max_context)
    corner = profile_of_points(
        profile.kind, profile.model, profile.dtype, profile.host, fit_part, None, path="corner"
    )
    corner = dataclasses.replace(corner, efficiency=result.efficiency)

    def planner_s(p: object) -> float:
        costs = operating_costs(
            arch, kind, profile.dtype, dtype_bytes, result.efficiency,
            p.batch, p.context, p.context, profile=corner,  # type: ignore[attr-defined]
        )  # fmt: skip
        return costs.layer_decode_s if p.phase == "decode" else costs.layer_prefill_s  # type: ignore[attr-defined]

    rows = []
    print(f"host: {profile.host.get('cpu')} ({', '.join(profile.host.get('vector_extensions', []))}), "
          f"{profile.host.get('threads')} thread(s); profile {args.profile or args.out}")  # fmt: skip
    print(
        f"fit on batch <= {args.max_batch}, context <= {args.max_context}: {result.fit_points} "
        f"points (MAPE {result.fit_mape_pct:.1f} % on them); predicting {result.held_out_points}"
    )
    print(f"{'phase':8}{'batch':>6}{'context':>8}{'measured ms':>13}{'roofline ms':>13}"
          f"{'err':>8}{'planner ms':>12}{'err':>8}")  # fmt: skip
    for p, pred in result.rows:
        plan = planner_s(p)
        rows.append(
            {"phase": p.phase, "batch": p.batch, "context": p.context,
             "measured_ms": p.measured_s * 1e3, "roofline_ms": pred * 1e3, "planner_ms": plan * 1e3}
        )  # fmt: skip
        print(
            f"{p.phase:8}{p.batch:6d}{p.context:8d}{p.measured_s * 1e3:13.3f}{pred * 1e3:13.3f}"
            f"{(pred / p.measured_s - 1) * 100:+7.1f}%{plan * 1e3:12.3f}"
            f"{(plan / p.measured_s - 1) * 100:+7.1f}%"
        )
    measured = [p.measured_s for p, _ in result.rows]
    planner_mape = mape([planner_s(p) for p, _ in result.rows], measured)
    eff = result.efficiency
    print(
        f"held-out MAPE: roofline {result.held_out_mape_pct:.1f} % (max "
        f"{result.held_out_max_error_pct:.1f} %), planner {planner_mape:.1f} %; fit: compute "
        f"{eff.compute:.3f}, memory {eff.memory:.3f}, kv {eff.kv:.3f}, overhead "
        f"{eff.overhead_s * 1e6:.0f} us, overlap {eff.overlap}"
    )
    in_sample = mape([predict_s(arch, kind, p, dtype_bytes, eff) for p in points],
                     [p.measured_s for p in points])  # fmt: skip
    doc = {
        "host": profile.host,
        "profile": args.profile or args.out,
        "max_batch": args.max_batch,
        "max_context": args.max_context,
        "fit_points": result.fit_points,
        "held_out_points": result.held_out_points,
        "fit_mape_pct": result.fit_mape_pct,
        "held_out_mape_pct": result.held_out_mape_pct,
        "held_out_max_error_pct": result.held_out_max_error_pct,
        "planner_held_out_mape_pct": planner_mape,
        "all_points_mape_pct": in_sample,
        "efficiency": eff.__dict__,
        "rows": rows,
    }
    (OUT / "profile_fit.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
