"""`pipeshift devices` on a host without NVIDIA GPUs: CPU workers and a note saying why."""

from __future__ import annotations

import json

from planner.cli import main


def test_devices_without_gpus_lists_cpu_workers_and_says_why(capsys):
    assert main(["devices", "--json", "--cpu-workers", "3"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["backend"] == "cpu"
    assert [d["kind"] for d in found["devices"]] == ["cpu"] * 3
    assert "using 3 CPU worker(s)" in found["note"]
    assert "pynvml" in found["note"] or "NVML" in found["note"] or "GPU" in found["note"]
