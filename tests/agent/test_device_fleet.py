"""Draining plans the least movement that frees a device."""

from __future__ import annotations

import pytest

from agent.device_fleet import DeviceRefused, drain_target
from planner.configuration import Configuration


def config(text: str) -> Configuration:
    """Returns pipelines written `w0:0-15,w1:15-30; w2:0-30`."""
    pipelines = []
    for p in text.split(";"):
        stages = []
        for s in p.split(","):
            device, layers = s.strip().split(":")
            start, end = layers.split("-")
            stages.append({"device": device, "start": int(start), "end": int(end)})
        pipelines.append({"stages": stages})
    return Configuration.from_json({"pipelines": pipelines})


def test_a_spare_takes_the_stage_as_it_is() -> None:
    target = drain_target(config("w0:0-10,w1:10-20,w2:20-30"), "w1", ["w3"])
    assert target == config("w0:0-10,w3:10-20,w2:20-30")


def test_without_a_spare_the_neighbour_takes_the_layers() -> None:
    current = config("w0:0-10,w1:10-20,w2:20-30")
    assert drain_target(current, "w1", []) == config("w0:0-20,w2:20-30")
    assert drain_target(current, "w0", []) == config("w1:0-20,w2:20-30")
    assert drain_target(current, "w2", []) == config("w0:0-10,w1:10-30")


def test_a_single_stage_pipeline_goes_while_another_serves() -> None:
    current = config("w0:0-30; w1:0-15,w2:15-30")
    assert drain_target(current, "w0", []) == config("w1:0-15,w2:15-30")
    target = drain_target(current, "w2", [])
    assert target == config("w0:0-30; w1:0-30")
    target.check(30)


def test_the_last_device_cannot_be_drained() -> None:
    with pytest.raises(DeviceRefused, match="only device serving"):
        drain_target(config("w0:0-30"), "w0", [])
