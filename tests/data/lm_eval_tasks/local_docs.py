"""Loads a task's documents from a JSON Lines file beside this module, so the tasks read no
network and do not depend on the directory lm-eval is started from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(file: str, **_: Any) -> Any:
    """Returns {"test": Dataset} holding one document per line of `file` (lm-eval passes the
    task's dataset_kwargs and metadata as keywords; only `file` is ours)."""
    import datasets

    lines = (HERE / file).read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(s) for s in lines if s])})
