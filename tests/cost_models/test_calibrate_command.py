import json

import pytest

from planner.cli import main

pytest.importorskip("torch")


def test_calibrate_times_real_layers_fits_and_writes_json(tmp_path, capsys):
    out = tmp_path / "calibration.json"
    argv = [
        "calibrate", "--model", "smollm2-135m", "--random-weights", "--layers", "1",
        "--batches", "1,2", "--contexts", "16,64", "--prefill-tokens", "8",
        "--repeats", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "MAPE" in printed and "per-layer overhead" in printed
    doc = json.loads(out.read_text())
    cpu = doc["kinds"]["cpu"]
    assert cpu["n_points"] == 5 and cpu["compute"] > 0 and cpu["memory"] > 0
    assert {p["phase"] for p in doc["points"]} == {"decode", "prefill"}
    assert all(p["measured_s"] > 0 for p in doc["points"])
