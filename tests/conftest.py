"""Shared fixtures: the real SmolLM2-135M GGUF and, once per session, transformers' model of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_store(tmp_path_factory):
    """Every test, and every command a test runs, uses a store of its own, never the user's."""
    import os

    path = tmp_path_factory.mktemp("store") / "pipeshift.db"
    previous = os.environ.get("PIPESHIFT_DATABASE_URL")
    os.environ["PIPESHIFT_DATABASE_URL"] = f"sqlite:///{path}"
    yield
    if previous is None:
        os.environ.pop("PIPESHIFT_DATABASE_URL", None)
    else:
        os.environ["PIPESHIFT_DATABASE_URL"] = previous


@pytest.fixture(scope="session")
def model_source():
    from agent.loaders import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def gguf_path(model_source) -> Path:
    return Path(model_source.path)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own model of the same GGUF (fp32), the reference for parity."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of this test run's own (tests/postgres_server.py)."""
    from tests.postgres_server import PostgresServer, find_bin_dir

    if find_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed here")
    pytest.importorskip("psycopg")
    server = PostgresServer().start()
    yield server
    server.stop()


_database_names = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty database's URL: a SQLite file, or a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres").create_database(f"t{next(_database_names)}")
