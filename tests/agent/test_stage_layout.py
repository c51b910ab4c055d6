"""agent.stage_layout: even splits, `--stages` parsing, and coverage checks with useful errors."""

from __future__ import annotations

import re

import pytest

from agent.stage_layout import check_stages, even_split, parse_stages


# ---- even_split ---------------------------------------------------------------------------
def sizes(stages: list[tuple[int, int]]) -> list[int]:
    return [end - start for start, end in stages]


def test_even_split_puts_the_extra_layers_first():
    stages = even_split(30, 4)
    assert sizes(stages) == [8, 8, 7, 7]
    assert stages == [(0, 8), (8, 16), (16, 23), (23, 30)]


@pytest.mark.parametrize("n_layers,n_stages", [(30, 1), (30, 3), (30, 7), (32, 5), (5, 5), (1, 1)])
def test_even_split_is_contiguous_and_balanced(n_layers, n_stages):
    stages = even_split(n_layers, n_stages)
    assert len(stages) == n_stages
    check_stages(stages, n_layers, n_stages)  # covers [0, n_layers) once, in order
    assert max(sizes(stages)) - min(sizes(stages)) <= 1


@pytest.mark.parametrize("n_layers,n_stages", [(4, 5), (30, 0), (30, -1)])
def test_even_split_refuses_impossible_splits(n_layers, n_stages):
    with pytest.raises(ValueError, match=f"cannot split {n_layers} layers into {n_stages} stages"):
        even_split(n_layers, n_stages)


# ---- parse_stages -------------------------------------------------------------------------
def test_parse_stages():
    assert parse_stages("0:10,10:20,20:30") == [(0, 10), (10, 20), (20, 30)]
    assert parse_stages(" 0:15 , 15:30 ") == [(0, 15), (15, 30)]
    assert parse_stages("0:30") == [(0, 30)]


@pytest.mark.parametrize(
    "text,bad_part",
    [
        ("0:10,10", "10"),
        ("0-10", "0-10"),
        ("0:10:20", "0:10:20"),
        ("a:b", "a:b"),
        ("0:10,,10:20", ""),
        ("", ""),
    ],
)
def test_parse_stages_errors_name_the_bad_part_and_the_format(text, bad_part):
    with pytest.raises(ValueError) as err:
        parse_stages(text)
    message = str(err.value)
    assert repr(bad_part) in message
    assert "START:END" in message
    assert "--stages 0:10,10:20,20:30" in message


# ---- check_stages -------------------------------------------------------------------------
def test_check_stages_accepts_a_covering_layout():
    check_stages([(0, 10), (10, 20), (20, 30)], n_layers=30, n_devices=3)
    check_stages([(0, 30)], n_layers=30, n_devices=4)  # spare devices are fine


@pytest.mark.parametrize(
    "stages,numbers",
    [
        ([(0, 10), (11, 30)], ["[11, 30)", "layer 10"]),  # gap: layer 10 is nowhere
        ([(0, 10), (9, 30)], ["[9, 30)", "layer 10"]),  # overlap: layer 9 twice
        ([(5, 30)], ["[5, 30)", "layer 0"]),  # does not start at 0
        ([(0, 10), (10, 10), (10, 30)], ["[10, 10)", "layer 10"]),  # empty stage
        ([(0, 20), (20, 10)], ["[20, 10)", "layer 20"]),  # backwards
    ],
)
def test_check_stages_rejects_gaps_and_overlaps(stages, numbers):
    with pytest.raises(ValueError) as err:
        check_stages(stages, n_layers=30, n_devices=8)
    message = str(err.value)
    for number in numbers:
        assert number in message
    layout = suggested_layout(message)  # shows a layout that would work, with as many stages
    assert len(layout) == len(stages)
    check_stages(layout, n_layers=30, n_devices=8)


def suggested_layout(message: str) -> list[tuple[int, int]]:
    match = re.search(r"--stages ([0-9:,]+)", message)
    assert match, f"the error shows no --stages example: {message}"
    return parse_stages(match.group(1))


@pytest.mark.parametrize(
    "n_layers",
    [
        30,
        4,
    ],
)
def test_the_layout_an_error_suggests_is_valid(n_layers):
    with pytest.raises(ValueError) as err:
        check_stages([(0, 1), (2, n_layers)], n_layers=n_layers, n_devices=8)
    check_stages(suggested_layout(str(err.value)), n_layers=n_layers, n_devices=8)


@pytest.mark.parametrize("stages,end", [([(0, 10), (10, 20)], 20), ([(0, 10), (10, 40)], 40)])
def test_check_stages_rejects_layouts_that_do_not_end_at_the_last_layer(stages, end):
    with pytest.raises(ValueError, match=f"stages end at layer {end}, but the model has 30 layers"):
        check_stages(stages, n_layers=30, n_devices=8)


def test_not_covering_error_says_what_to_do():
    with pytest.raises(ValueError) as err:
        check_stages([(0, 10), (10, 20)], n_layers=30, n_devices=8)
    assert "--stages" in str(err.value)


def test_check_stages_rejects_more_stages_than_devices():
    with pytest.raises(ValueError) as err:
        check_stages([(0, 10), (10, 20), (20, 30)], n_layers=30, n_devices=2)
    message = str(err.value)
    assert "3 stages need at least 3 devices" in message
    assert "--devices is 2" in message  # names the flag to raise
