import random
from dataclasses import replace

import pytest

from cost_models.calibration import (
    Measurement,
    fit_all,
    fit_efficiency,
    mape,
    predict_s,
    save_calibration,
)
from cost_models.device_catalog import get_device_kind
from cost_models.latency import Efficiency, load_efficiencies
from cost_models.model_catalog import get_model_arch


def _synthetic(arch, kind, eff, dtype_bytes=2):
    """Points that the roofline with `eff` produces exactly, decode and prefill mixed."""
    device = get_device_kind(kind)
    points = []
    for batch in (1, 4, 16, 64, 256):
        for context in (128, 1024, 4096):
            m = Measurement(kind, "decode", batch, context, 4, 1.0)
            points.append(
                Measurement(
                    kind, "decode", batch, context, 4, predict_s(arch, device, m, dtype_bytes, eff)
                )
            )
    for n in (64, 512, 2048):
        m = Measurement(kind, "prefill", 1, n, 4, 1.0)
        points.append(
            Measurement(kind, "prefill", 1, n, 4, predict_s(arch, device, m, dtype_bytes, eff))
        )
    return points


def test_fit_recovers_known_factors_from_synthetic_points():
    arch = get_model_arch("llama-3.1-8b")
    true = Efficiency(compute=0.45, memory=0.7, overhead_s=40e-6)
    fit = fit_efficiency(arch, get_device_kind("A100-80GB"), _synthetic(arch, "A100-80GB", true))
    assert fit.efficiency.compute == pytest.approx(0.45, rel=0.02)
    assert fit.efficiency.memory == pytest.approx(0.7, rel=0.02)
    assert fit.efficiency.overhead_s == pytest.approx(40e-6, rel=0.1)
    assert fit.mape < 1.0 and fit.n_points == 18


def test_fit_handles_noise_and_cpu_factors_above_the_guess(tmp_path):
    arch = get_model_arch("smollm2-135m")
    cpu = get_device_kind("cpu")
    # The CPU peak is only a guess, so a factor above 1 must be reachable; the cache is
    # gathered before attention, so KV traffic runs slower than weight streaming.
    true = Efficiency(compute=1.3, memory=0.9, overhead_s=150e-6, kv_memory=0.3)
    clean = _synthetic(arch, "cpu", true, dtype_bytes=4)
    rng = random.Random(0)
    noisy = [replace(p, measured_s=p.measured_s * rng.uniform(0.96, 1.04)) for p in clean]
    fits = fit_all(arch, noisy, dtype_bytes=4)
    fit = fits["cpu"]
    assert fit.efficiency.compute == pytest.approx(1.3, rel=0.1)
    assert fit.efficiency.kv == pytest.approx(0.3, rel=0.1)
    assert fit.mape < 3.0
    # Weight streaming and per-layer overhead are both constant per layer of one model, so
    # noise may shift time between them; their sum, and so every prediction, stays right.
    predicted = [predict_s(arch, cpu, p, 4, fit.efficiency) for p in clean]
    assert mape(predicted, [p.measured_s for p in clean]) < 2.0

    path = tmp_path / "calibration.json"
    save_calibration(path, arch, fits, 4, noisy)
    assert load_efficiencies(path)["cpu"] == fit.efficiency


def test_mape_and_measurement_validation():
    assert mape([1.1, 0.9], [1.0, 1.0]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="phase"):
        Measurement("cpu", "train", 1, 1, 1, 1.0)


@pytest.mark.parametrize("overlap", [True, False])
def test_fit_tells_overlapping_from_additive_devices(overlap):
    """A GPU overlaps compute with memory traffic (max); one CPU core does them in turn (sum)."""
    arch = get_model_arch("smollm2-135m")
    true = Efficiency(compute=0.8, memory=0.9, overhead_s=100e-6, kv_memory=0.4, overlap=overlap)
    fit = fit_efficiency(arch, get_device_kind("cpu"), _synthetic(arch, "cpu", true, dtype_bytes=4), 4)
    assert fit.efficiency.overlap is overlap
    assert fit.mape < 1.0
