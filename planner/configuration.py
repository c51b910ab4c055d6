"""A configuration as plain data: pipelines (replicas), each an ordered list of stages
`(device, start, end)` covering the model's layers once. The shape of `pipeshift plan --json`'s
`pipelines`, of `pipeshift serve --plan`, of the admin API's targets and of the store:

    {"pipelines": [{"stages": [{"device": "worker-0", "start": 0, "end": 15}, ...]}, ...]}

One pipeline's layout (parsing `0:10,10:30`, checking coverage) is agent/stage_layout.py's;
this module adds what spans pipelines: devices, and which device runs what.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.stage_layout import check_stages, format_stages, parse_stages

STAGE_SHAPE = '{"device": NAME, "start": INT, "end": INT}'


class ConfigurationError(ValueError):
    """A configuration that cannot serve as written; the message says what to change."""


@dataclass(frozen=True)
class StageConfig:
    device: str | None  # None: the diff planner picks a device
    start: int
    end: int

    def describe(self) -> str:
        """Returns `worker-0 0-14` (layers inclusive; `?` for a device still to pick)."""
        return f"{self.device or '?'} {self.start}-{self.end - 1}"


@dataclass(frozen=True)
class PipelineConfig:
    stages: tuple[StageConfig, ...]

    @property
    def devices(self) -> tuple[str | None, ...]:
        return tuple(s.device for s in self.stages)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.stages]

    def owner(self, layer: int) -> str | None:
        """Returns the device of the stage holding `layer`; raises KeyError if none does."""
        for s in self.stages:
            if s.start <= layer < s.end:
                return s.device
        raise KeyError(f"no stage holds layer {layer}")

    def describe(self) -> str:
        """Returns `worker-0 0-14 | worker-1 15-29`."""
        return " | ".join(s.describe() for s in self.stages)


def read_json_file(path: str | Path, label: str) -> Any:
    """Returns the JSON in `path`; raises ValueError starting with `label` when it cannot be
    read or is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{label}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{label}: not JSON ({exc})") from None


@dataclass(frozen=True)
class Configuration:
    pipelines: tuple[PipelineConfig, ...]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Configuration:
        """Returns the configuration `{"pipelines": [{"stages": [{"device", "start", "end"}]}]}`
        describes; other keys (the rest of `pipeshift plan --json`'s output) are ignored."""
        if not isinstance(obj, dict) or not isinstance(obj.get("pipelines"), list):
            raise ConfigurationError(
                f'a configuration is {{"pipelines": [{{"stages": [{STAGE_SHAPE}, ...]}}, ...]}}'
            )
        pipelines = []
        for i, p in enumerate(obj["pipelines"]):
            stages = p.get("stages") if isinstance(p, dict) else None
            if not isinstance(stages, list) or not stages:
                raise ConfigurationError(f"pipelines[{i}]: give its stages as a non-empty list")
            pipelines.append(PipelineConfig(tuple(_stage(s, i, j) for j, s in enumerate(stages))))
        return cls(tuple(pipelines))

    def to_json(self) -> dict[str, Any]:
        return {
            "pipelines": [
                {"stages": [{"device": s.device, "start": s.start, "end": s.end} for s in p.stages]}
                for p in self.pipelines
            ]
        }

    @classmethod
    def from_stages_text(
        cls, text: str, device_names: Sequence[str] | None = None
    ) -> Configuration:
        """Returns one pipeline read from `0:10,10:30`; its devices are None unless names are
        given (then taken in order, one per stage)."""
        try:
            ranges = parse_stages(text)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        names: Sequence[str | None] = [None] * len(ranges)
        if device_names is not None:
            if len(device_names) < len(ranges):
                raise ConfigurationError(
                    f"{len(ranges)} stages need {len(ranges)} devices; {len(device_names)} given "
                    f"({', '.join(device_names)}): give fewer stages or more devices"
                )
            names = device_names[: len(ranges)]
        stages = tuple(StageConfig(d, s, e) for d, (s, e) in zip(names, ranges, strict=True))
        return cls((PipelineConfig(stages),))

    def check(self, n_layers: int, devices: Collection[str] | None = None) -> None:
        """Raises ConfigurationError unless every pipeline covers [0, n_layers) once, in order,
        with non-empty stages, and no device runs two stages (nor is unknown, when `devices`
        lists the known ones)."""
        if not self.pipelines:
            raise ConfigurationError("the configuration has no pipeline: give at least one")
        for i, p in enumerate(self.pipelines):
            try:
                check_stages(p.ranges, n_layers, len(p.ranges))
            except ValueError as exc:
                raise ConfigurationError(f"pipeline {i}: {exc}") from None
        seen: dict[str, tuple[int, StageConfig]] = {}
        for i, p in enumerate(self.pipelines):
            for s in p.stages:
                if s.device is None:
                    continue
                if s.device in seen:
                    first_i, first = seen[s.device]
                    raise ConfigurationError(
                        f"device {s.device} runs two stages (pipeline {first_i} layers "
                        f"{first.start}-{first.end - 1} and pipeline {i} layers {s.start}-{s.end - 1}): "
                        "give each stage its own device"
                    )
                seen[s.device] = (i, s)
                if devices is not None and s.device not in devices:
                    raise ConfigurationError(
                        f"pipeline {i}: unknown device {s.device!r}; the devices are "
                        f"{', '.join(devices)}"
                    )
        if devices is not None:
            wanted = sum(len(p.stages) for p in self.pipelines)
            if wanted > len(devices):
                raise ConfigurationError(
                    f"the configuration has {wanted} stages and there "
                    + ("is 1 device" if len(devices) == 1 else f"are {len(devices)} devices") + ": "
                    "use fewer stages or pipelines, or more devices"
                )

    def devices(self) -> list[str]:
        """Returns the devices used, in pipeline and stage order, once each."""
        named = (s.device for p in self.pipelines for s in p.stages if s.device is not None)
        return list(dict.fromkeys(named))

    def stage_of(self, device: str) -> tuple[int, StageConfig] | None:
        """Returns (pipeline index, stage) of the stage `device` runs, or None."""
        for i, p in enumerate(self.pipelines):
            for s in p.stages:
                if s.device == device:
                    return i, s
        return None

    def map_devices(self, names: Sequence[str]) -> Configuration:
        """Returns the configuration with its devices, in order of first appearance, renamed to
        `names` in order (a plan's devices onto a serving process's workers)."""
        ours = self.devices()
        if len(ours) > len(names):
            raise ConfigurationError(
                f"the configuration uses {len(ours)} devices ({', '.join(ours)}) and only "
                f"{len(names)} are available ({', '.join(names)}): plan for at most {len(names)}"
            )
        rename = dict(zip(ours, names, strict=False))
        return Configuration(
            tuple(
                PipelineConfig(
                    tuple(
                        StageConfig(None if s.device is None else rename[s.device], s.start, s.end)
                        for s in p.stages
                    )
                )
                for p in self.pipelines
            )
        )

    def describe(self) -> str:
        """Returns `[0:15,15:30]; [0:30]`: each pipeline's stages."""
        return "; ".join(f"[{format_stages(p.ranges)}]" for p in self.pipelines)


def _stage(obj: Any, i: int, j: int) -> StageConfig:
    try:
        device = obj.get("device")
        return StageConfig(
            None if device is None else str(device), int(obj["start"]), int(obj["end"])
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ConfigurationError(f"pipelines[{i}].stages[{j}]: a stage is {STAGE_SHAPE}") from None
