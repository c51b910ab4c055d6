"""Stage layouts: parse `--stages 0:10,10:20,20:30`, split evenly, and check coverage."""

from __future__ import annotations


def even_split(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Returns `n_stages` contiguous ranges whose sizes differ by at most one layer."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages")
    base, extra = divmod(n_layers, n_stages)
    stages, start = [], 0
    for i in range(n_stages):
        end = start + base + (1 if i < extra else 0)
        stages.append((start, end))
        start = end
    return stages


def parse_stages(text: str) -> list[tuple[int, int]]:
    """Parses `0:10,10:20,20:30` into [(0, 10), (10, 20), (20, 30)]."""
    stages = []
    for part in text.split(","):
        try:
            start, end = (int(x) for x in part.strip().split(":"))
        except ValueError:
            raise ValueError(f"stage {part!r} is not START:END (e.g. --stages 0:10,10:20,20:30)") from None
        stages.append((start, end))
    return stages


def format_stages(stages: list[tuple[int, int]]) -> str:
    return ",".join(f"{s}:{e}" for s, e in stages)


def check_stages(stages: list[tuple[int, int]], n_layers: int, n_devices: int) -> None:
    """Raises ValueError unless the stages cover layers [0, n_layers) once, in order, on enough devices."""
    example = format_stages(even_split(n_layers, min(len(stages), n_layers)))
    if len(stages) > n_devices:
        raise ValueError(f"{len(stages)} stages need at least {len(stages)} devices; --devices is {n_devices}")
    expected = 0
    for start, end in stages:
        if start != expected or end <= start:
            raise ValueError(
                f"stages must be contiguous and non-empty from layer 0: got [{start}, {end}) where "
                f"layer {expected} should start (e.g. --stages {example})"
            )
        expected = end
    if expected != n_layers:
        raise ValueError(
            f"stages end at layer {expected}, but the model has {n_layers} layers: "
            f"cover them all (e.g. --stages {example})"
        )
