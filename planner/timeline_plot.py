"""The timeline of one apply (`pipeshift show APPLY_ID --plot FILE.png`): its phases as bars,
and under them the gap before every token of each request that streamed through it."""

from __future__ import annotations

from typing import Any

PHASE_COLOURS = {"prepare": "#9e9e9e", "prefetch": "#4c72b0", "precopy": "#55a868", "switch": "#c44e52",
                 "cleanup": "#8172b2"}


def plot_timeline(apply: dict[str, Any], path: str, title: str | None = None) -> None:
    """Writes the PNG of `apply` (an ApplyOut as JSON: phases with started_at/ended_at in unix
    seconds, serving.streams with token times) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in apply["phases"] if p.get("started_at") is not None]
    serving = apply.get("serving") or {}
    streams = serving.get("streams") or []
    t0 = min([p["started_at"] for p in phases] or [0.0])
    fig, (bars, gaps) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, height_ratios=(1, 3),
                                     constrained_layout=True)
    for row, phase in enumerate(reversed(phases)):
        start = phase["started_at"] - t0
        width = max((phase["ended_at"] or phase["started_at"]) - phase["started_at"], 0.002)
        bars.broken_barh([(start, width)], (row - 0.4, 0.8), color=PHASE_COLOURS.get(phase["name"], "#777"))
        label = f"{phase['name']} {width * 1000:.0f} ms" if width < 1 else f"{phase['name']} {width:.1f} s"
        bars.text(start + width, row, f"  {label}", va="center", fontsize=8)
    bars.set_yticks(range(len(phases)), [p["name"] for p in reversed(phases)])
    bars.set_title(title or f"apply {apply['id']}: {apply.get('outcome') or apply['state']}")
    for number, stream in enumerate(streams):
        times = [t - t0 for t in stream["tokens"]]
        gaps.plot(times[1:], [1000 * (b - a) for a, b in zip(times, times[1:], strict=False)],
                  marker=".", markersize=2, linewidth=0.6, label=f"request {number + 1}")
    for phase in phases:
        if phase.get("ended_at") and phase["name"] != "switch":
            gaps.axvspan(phase["started_at"] - t0, phase["ended_at"] - t0, alpha=0.08,
                         color=PHASE_COLOURS.get(phase["name"], "#777"), linewidth=0)
        if phase["name"] == "switch" and phase.get("ended_at"):
            for edge in (phase["started_at"], phase["ended_at"]):
                gaps.axvline(edge - t0, color=PHASE_COLOURS["switch"], linewidth=0.8, linestyle="--")
    windows = serving.get("windows") or {}
    note = "   ".join(f"{name}: TPOT p50 {w['tpot_ms_p50']:.0f} ms, max gap {w['max_gap_ms']:.0f} ms"
                       for name, w in windows.items() if w and w.get("tpot_ms_p50") is not None)
    gaps.set_ylabel("gap before token (ms)")
    gaps.set_xlabel("seconds since the apply began")
    gaps.set_ylim(bottom=0)
    if note:
        gaps.set_title(note, fontsize=9)
    if streams and len(streams) <= 12:
        gaps.legend(fontsize=7, ncol=4, loc="upper right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
