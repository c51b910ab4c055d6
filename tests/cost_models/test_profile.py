"""Profiles: interpolation in measured tables, loading with file:line errors, out-of-sample fit."""

import ast
from pathlib import Path

import pytest

from cost_models.calibration import Measurement, predict_s
from cost_models.device_catalog import get_device_kind
from cost_models.latency import Efficiency
from cost_models.model_catalog import get_model_arch
from cost_models.profile import (
    EXTRAPOLATED,
    INSIDE,
    SCALED,
    ProfileError,
    Table,
    device_kind_of,
    holdout_fit,
    load_profile,
    points_of_profile,
    profile_of_points,
    save_profile,
)

ROOT = Path(__file__).resolve().parents[2]


def _bilinear_truth(b, c):
    return 1e-3 + 2e-4 * b + 3e-6 * c + 5e-7 * b * c


def test_table_is_exact_for_the_additive_form_and_anchors_beyond_the_grid():
    rows, cols = (1.0, 4.0, 16.0), (128.0, 1024.0)
    table = Table(rows, cols, tuple(tuple(_bilinear_truth(b, c) for c in cols) for b in rows))
    value, how = table.at(7, 600)
    assert how == INSIDE and value == pytest.approx(_bilinear_truth(7, 600))
    # beyond: the roofline's shape, anchored to the nearest edge (so continuous there)
    value, how = table.at(32, 600, roofline=lambda b, c: 2 * _bilinear_truth(b, c))
    assert how == SCALED and value == pytest.approx(_bilinear_truth(32, 600))
    # without a roofline: linear extrapolation, exact for this form along one axis
    value, how = table.at(32, 600)
    assert how == EXTRAPOLATED and value == pytest.approx(_bilinear_truth(32, 600))
    assert table.at(0.01, 1)[0] >= table.at(1, 128)[0] / 2  # never below half the edge


def _points(arch, kind, eff, batches, contexts, prompts):
    device = get_device_kind(kind)

    def m(phase, b, c):
        return Measurement(
            kind,
            phase,
            b,
            c,
            4,
            predict_s(arch, device, Measurement(kind, phase, b, c, 4, 1.0), 4, eff),
        )

    return [m("decode", b, c) for b in batches for c in contexts] + [
        m("prefill", 1, n) for n in prompts
    ]


def test_profile_round_trips_and_a_corner_fit_predicts_the_rest(tmp_path):
    arch = get_model_arch("smollm2-135m")
    true = Efficiency(compute=1.2, memory=1.4, overhead_s=190e-6, kv_memory=0.4, overlap=False)
    points = _points(arch, "cpu", true, (1, 2, 4, 8, 16), (128, 512, 1024, 4096), (32, 512, 2048))
    profile = profile_of_points(
        "cpu", arch.name, "fp32", {"cpu": "test"}, points, head_s={1: 1e-3, 8: 4e-3}
    )
    path = tmp_path / "p.yaml"
    save_profile(path, profile)
    back = load_profile(path)
    assert back.decode.rows == (1, 2, 4, 8, 16) and back.prefill.cols == (32, 512, 2048)
    assert back.decode.at(4, 1024)[0] == pytest.approx(
        predict_s(arch, get_device_kind("cpu"), points[10], 4, true) / 4, rel=1e-5
    )
    result = holdout_fit(
        arch, get_device_kind("cpu"), points_of_profile(back), 4, overhead_s=190e-6
    )
    assert result.fit_points == 11 and result.held_out_points == 12
    assert result.held_out_mape_pct < 2.0


def _write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """\
format: pipeshift-profile/1
kind: cpu
model: SmolLM2-135M
dtype: fp32
decode:
  batches: [1, 4]
  contexts: [128, 1024]
  layer_s:
    - [0.001, 0.002]
    - [0.003, 0.004]
"""


def test_malformed_profiles_name_file_line_and_field(tmp_path):
    with pytest.raises(ProfileError) as exc:
        load_profile(_write(tmp_path, GOOD.replace("[0.003, 0.004]", "[0.003]")))
    assert f"{tmp_path}/p.yaml:10: decode.layer_s.1: 1 values for 2 contexts" in exc.value.lines[0]
    with pytest.raises(ProfileError) as exc:
        load_profile(_write(tmp_path, GOOD.replace("[1, 4]", "[4, 1]") + "speed: 3\n"))
    joined = "\n".join(exc.value.lines)
    assert ":6: decode.batches: values must rise strictly" in joined
    assert ":11: speed: unknown field" in joined
    with pytest.raises(ProfileError) as exc:
        load_profile(_write(tmp_path, GOOD.replace("pipeshift-profile/1", "v0")))
    assert ":1: format: expected 'pipeshift-profile/1'" in exc.value.lines[0]
    with pytest.raises(ProfileError, match="cannot read the profile"):
        load_profile(tmp_path / "missing.yaml")


def test_a_new_kind_must_be_defined_entirely_and_gets_no_roofline(tmp_path):
    with pytest.raises(ProfileError) as exc:
        load_profile(_write(tmp_path, GOOD.replace("kind: cpu", "kind: npu-x")))
    line = exc.value.lines[0]
    assert ":2: kind: 'npu-x' is not in the device catalog" in line
    assert "memory_gib" in line and "prefill" in line and "head" in line
    catalog = device_kind_of(
        load_profile(_write(tmp_path, GOOD + "device: {memory_gib: 2}\n")), get_device_kind("cpu")
    )
    assert (
        catalog.memory_bytes == 2 * 2**30
        and catalog.fp32_tflops == get_device_kind("cpu").fp32_tflops
    )


def test_cost_models_never_import_the_runtime():
    """Measuring lives in agent/; cost_models/ fits and predicts and must not import upward."""
    offenders = []
    for path in sorted((ROOT / "cost_models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in ("agent", "planner")
            ]
    assert offenders == []
