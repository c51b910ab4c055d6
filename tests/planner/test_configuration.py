"""Configurations: read from `pipeshift plan --json` and `--stages`, checked with messages that
say what is wrong with the numbers, and mapped onto a serving process's workers."""

import json
import re

import pytest

from planner.build_problem import build_problem
from planner.configuration import Configuration, ConfigurationError, PipelineConfig, StageConfig
from planner.solve import plan
from planner.spec import load_spec

from .conftest import ROOT

WORKERS = [f"worker-{i}" for i in range(5)]


def two_pipelines() -> Configuration:
    return Configuration.from_json(
        {
            "pipelines": [
                {"stages": [{"device": "worker-0", "start": 0, "end": 15},
                            {"device": "worker-1", "start": 15, "end": 30}]},
                {"stages": [{"device": "worker-2", "start": 0, "end": 30}]},
            ]
        }
    )  # fmt: skip


def test_from_json_reads_a_real_plan_output_and_ignores_its_extra_keys():
    problem = build_problem(load_spec(ROOT / "data/specs/local-cpu-smollm2.yaml"))
    out = json.loads(json.dumps(plan(problem, time_limit_s=20).to_json()))
    assert "kind" in out["pipelines"][0]["stages"][0]  # the output has more than we read
    config = Configuration.from_json(out)
    assert len(config.pipelines) == len(out["pipelines"]) >= 1
    for p, raw in zip(config.pipelines, out["pipelines"], strict=True):
        assert [(s.device, s.start, s.end) for s in p.stages] == [
            (s["device"], s["start"], s["end"]) for s in raw["stages"]
        ]
    config.check(30, config.devices())
    assert config.devices()[0] == "local/cpu.0"


def test_to_json_round_trips_and_has_only_the_contract_keys():
    config = two_pipelines()
    obj = config.to_json()
    assert obj["pipelines"][0]["stages"][1] == {"device": "worker-1", "start": 15, "end": 30}
    assert Configuration.from_json(json.loads(json.dumps(obj))) == config


@pytest.mark.parametrize(
    "obj, says",
    [
        ([], "a configuration is"),
        ({"pipelines": {}}, "a configuration is"),
        ({"pipelines": [{"stages": []}]}, "pipelines[0]: give its stages"),
        ({"pipelines": [{"stages": [{"device": "a", "start": 0}]}]}, "pipelines[0].stages[0]"),
        ({"pipelines": [{"stages": [{"start": "x", "end": 3}]}]}, "pipelines[0].stages[0]"),
    ],
)
def test_from_json_rejects_malformed_objects(obj, says):
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        Configuration.from_json(obj)


def test_from_stages_text_leaves_devices_open_unless_named():
    open_ = Configuration.from_stages_text("0:10,10:20,20:30")
    assert open_.pipelines[0].devices == (None, None, None)
    assert open_.pipelines[0].ranges == [(0, 10), (10, 20), (20, 30)]
    named = Configuration.from_stages_text("0:12,12:30", WORKERS)
    assert named.pipelines[0].devices == ("worker-0", "worker-1")
    assert named.pipelines[0].owner(11) == "worker-0" and named.pipelines[0].owner(12) == "worker-1"
    with pytest.raises(ConfigurationError, match="START:END"):
        Configuration.from_stages_text("0-10,10:30")
    with pytest.raises(ConfigurationError, match="2 stages need 2 devices; 1 given"):
        Configuration.from_stages_text("0:12,12:30", ["worker-0"])


@pytest.mark.parametrize(
    "config, says",
    [
        (Configuration(()), "no pipeline"),
        (
            Configuration.from_stages_text("0:10,12:30"),
            r"pipeline 0: .*got \[12, 30\) where layer 10 should start",
        ),
        (
            Configuration.from_stages_text("0:15,10:30"),
            r"pipeline 0: .*got \[10, 30\) where layer 15 should start",
        ),
        (
            Configuration.from_stages_text("0:10,10:20"),
            "pipeline 0: stages end at layer 20, but the model has 30 layers",
        ),
        (
            Configuration.from_stages_text("0:10,10:10,10:30"),
            r"non-empty.*got \[10, 10\)",
        ),
        (
            Configuration.from_json(
                {
                    "pipelines": [
                        {"stages": [{"device": "worker-1", "start": 0, "end": 30}]},
                        {
                            "stages": [
                                {"device": "worker-0", "start": 0, "end": 10},
                                {"device": "worker-1", "start": 10, "end": 30},
                            ]
                        },
                    ]
                }
            ),  # fmt: skip
            r"device worker-1 runs two stages \(pipeline 0 layers 0-29 and pipeline 1 layers 10-29\)",
        ),
        (
            Configuration.from_stages_text("0:30", ["gpu-7"]),
            "unknown device 'gpu-7'; the devices are worker-0, worker-1",
        ),
    ],
)
def test_check_says_what_is_wrong_with_the_numbers(config, says):
    with pytest.raises(ConfigurationError, match=says):
        config.check(30, WORKERS)


def test_check_counts_stages_against_devices_and_shows_an_example():
    config = Configuration.from_stages_text("0:5,5:10,10:15,15:20,20:25,25:30")
    with pytest.raises(ConfigurationError, match="6 stages and there are 5 devices"):
        config.check(30, WORKERS)
    with pytest.raises(ConfigurationError, match="2 stages and there is 1 device: use fewer"):
        Configuration.from_stages_text("0:15,15:30").check(30, ["worker-0"])
    with pytest.raises(ConfigurationError, match=r"pipeline 1: .*e\.g\. .*0:15,15:30"):
        Configuration.from_json(
            {"pipelines": [{"stages": [{"start": 0, "end": 30}]},
                           {"stages": [{"start": 0, "end": 15}, {"start": 16, "end": 30}]}]}
        ).check(30)  # fmt: skip
    two_pipelines().check(30, WORKERS)  # a good one passes


def test_devices_and_stage_of():
    config = two_pipelines()
    assert config.devices() == ["worker-0", "worker-1", "worker-2"]
    assert config.stage_of("worker-1") == (0, StageConfig("worker-1", 15, 30))
    assert config.stage_of("worker-2") == (1, StageConfig("worker-2", 0, 30))
    assert config.stage_of("worker-4") is None
    assert PipelineConfig(config.pipelines[0].stages).describe() == "worker-0 0-14 | worker-1 15-29"


def test_map_devices_renames_in_order_of_first_appearance():
    config = Configuration.from_json(
        {"pipelines": [{"stages": [{"device": "local/cpu.2", "start": 0, "end": 15},
                                   {"device": "local/cpu.0", "start": 15, "end": 30}]},
                       {"stages": [{"device": "local/cpu.1", "start": 0, "end": 30}]}]}
    )  # fmt: skip
    mapped = config.map_devices(WORKERS)
    assert mapped.pipelines[0].devices == ("worker-0", "worker-1")
    assert mapped.pipelines[1].devices == ("worker-2",)
    assert mapped.pipelines[0].ranges == config.pipelines[0].ranges
    with pytest.raises(ConfigurationError, match=r"uses 3 devices .* only 2 are available"):
        config.map_devices(["worker-0", "worker-1"])
    # open stages stay open
    assert Configuration.from_stages_text("0:30").map_devices(["w"]).pipelines[0].devices == (None,)
