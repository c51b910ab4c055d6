"""A wheel built from the repository works outside the checkout: it carries the device and
model catalogs, the example specs with their traces, and the store's migrations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cost_models.paths import specs_dir
from planner.examples_command import copy_example
from planner.spec import load_spec
from planner.store.database import head_revision

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: pyproject.toml, setup.py and the folders they package. Building from a
# copy leaves no build/ or egg-info in the checkout, and no stale build/lib in the wheel.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "planner", "agent", "cost_models", "data",
           "migrations")


def test_every_example_copies_with_the_trace_it_reads(tmp_path):
    examples = sorted(specs_dir().glob("*.yaml"))
    assert examples
    for source in examples:
        spec = load_spec(copy_example(source, tmp_path / source.stem))
        workloads = [spec.workload] if spec.models is None else [m.workload for m in spec.models]
        for workload in workloads:
            if workload.trace is not None:
                assert (tmp_path / source.stem / workload.trace).is_file()
                assert ".." not in Path(workload.trace).parts
        if spec.models is None:
            spec.lengths()  # reads the trace, when the spec names one
        for profile in spec.profiles:  # loading the spec read them from the copy
            assert (tmp_path / source.stem / profile).is_file()


def run(args: list, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_plans_an_example_outside_the_checkout(tmp_path):
    try:  # offline, without build isolation: setuptools must build wheels itself (>= 70.1)
        import setuptools.command.bdist_wheel  # noqa: F401
    except ImportError:
        pytest.importorskip("wheel")
    assert not tmp_path.is_relative_to(ROOT)
    src, dist, venv, work = (tmp_path / d for d in ("src", "dist", "venv", "work"))
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", src, "--no-deps", "--no-build-isolation", "--no-index", "-w", dist],
        cwd=tmp_path)
    (wheel,) = dist.glob("pipeshift-*.whl")

    # A fresh venv holding the wheel; the dependencies come from this interpreter's
    # site-packages through a .pth file (a path there is not a site dir, so the editable
    # install of pipeshift in it stays inactive).
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp_path)
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "dev-dependencies.pth").write_text("\n".join(ours) + "\n")

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PIPESHIFT_DATA_DIR", "PIPESHIFT_DATABASE_URL", "VIRTUAL_ENV")}
    work.mkdir()
    where = run([python, "-c", "import planner, cost_models.paths as p; "
                 "print(planner.__file__, p.data_dir(), p.migrations_dir(), sep='\\n')"],
                cwd=work, env=env).stdout.split()
    assert all(Path(w).is_relative_to(site) for w in where), where

    pipeshift = venv / "bin" / "pipeshift"
    listed = run([pipeshift, "examples"], cwd=work, env=env).stdout
    assert "local-cpu-smollm2" in listed and "azure-conv-a100-l40s-llama31-8b" in listed
    for name in ("local-cpu-smollm2", "azure-conv-a100-l40s-llama31-8b", "local-cpu-profiled-smollm2"):
        copied = run([pipeshift, "examples", name, "--to", "."], cwd=work, env=env).stdout
        assert f"pipeshift plan -f {name}.yaml" in copied
        planned = run([pipeshift, "plan", "-f", f"{name}.yaml", "--json"], cwd=work, env=env)
        result = json.loads(planned.stdout)
        assert result["status"] in ("OPTIMAL", "FEASIBLE") and result["pipelines"], result
    assert (work / "traces" / "AzureLLMInferenceTrace_conv.csv").is_file()
    assert "CC-BY" in (work / "traces" / "README.md").read_text()

    created = run([pipeshift, "init", "--database-url", f"sqlite:///{tmp_path / 'store.db'}"],
                  cwd=work, env=env).stdout
    assert f"Created the store at sqlite:///{tmp_path / 'store.db'} (schema {head_revision()})" \
        in created, created
