"""Where pipeshift finds its data files (device and model catalogs, example specs)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("PIPESHIFT_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))
