"""Reads an SSE body the way OpenAI clients do."""

from __future__ import annotations

import json
from typing import Any


def sse_payloads(body: str) -> tuple[list[dict[str, Any]], bool]:
    """Returns the JSON payloads of `data:` events and whether the stream ended with [DONE]."""
    events = [e for e in body.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    data = [e.removeprefix("data: ") for e in events]
    done = data[-1] == "[DONE]"
    assert data.count("[DONE]") == (1 if done else 0)
    return [json.loads(d) for d in data if d != "[DONE]"], done
