"""The PNGs of `pipeshift simulate --plot DIR`: load, configuration, TTFT and TPOT over time."""

from __future__ import annotations

from pathlib import Path

from planner.simulator import SimResult, shape


def configuration_segments(result: SimResult) -> list[tuple[float, str]]:
    """Returns (minute it starts serving, shape) for the initial configuration and each one a
    reconfiguration switched to."""
    out = [(0.0, shape(result.initial))]
    for r in result.reconfigurations:
        out.append((r.switch_s / 60, r.shape_after or f"{r.pipelines_after} pipelines"))
    return out


def plot_simulation(result: SimResult, directory: str) -> list[Path]:
    """Writes load.png, configuration.png and latency.png into `directory`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tl = result.timeline
    t = [b["t_s"] / 60 for b in tl]
    switches = [r.switch_s / 60 for r in result.reconfigurations]
    paths = []

    def save(fig, name: str) -> None:
        for x in switches:
            for ax in fig.axes:
                ax.axvline(x, color="#c44e52", lw=0.8, ls="--")
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(10, 3), constrained_layout=True)
    ax.plot(t, [b["rate_rps"] for b in tl], color="#4c72b0")
    ax.set(xlabel="minutes", ylabel="arrivals / s", title=f"load ({result.policy})")
    save(fig, "load.png")

    fig, ax = plt.subplots(figsize=(10, 3), constrained_layout=True)
    ax.step(t, [b["devices"] for b in tl], where="post", label="devices", lw=2.5)
    ax.step(t, [b["pipelines"] for b in tl], where="post", label="pipelines", ls=":", lw=2)
    top = max([b["devices"] for b in tl] + [1])
    ax.set_ylim(0, top * 1.35)
    for i, (start_min, text) in enumerate(configuration_segments(result)):  # staggered
        ax.annotate(text, (start_min, top * (1.06 + 0.13 * (i % 2))), fontsize=8)
    ax.set(xlabel="minutes", ylabel="count", title="configuration (dashed: reconfigurations)")
    ax.legend(loc="lower right")
    save(fig, "configuration.png")

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True, constrained_layout=True)
    for q in ("p50", "p90", "p99"):
        a1.plot(t, [b["ttft_ms"][q] for b in tl], label=q)
        a2.plot(t, [b["tpot_ms"][q] for b in tl], label=q)
    a1.set(ylabel="TTFT ms", yscale="log", title="latency of requests by arrival minute")
    a2.set(ylabel="TPOT ms", xlabel="minutes")
    a1.legend()
    save(fig, "latency.png")
    return paths
