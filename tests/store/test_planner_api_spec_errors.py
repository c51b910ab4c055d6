"""A spec body the planner API refuses (422) names only what is wrong in the form it has: one
model, or several (`models`). It listed the other form's missing and extra fields as well:
for a misspelt `workload.request_rate`, five errors, four of them about `models`."""

from __future__ import annotations

from fastapi.testclient import TestClient

from planner.api.app import create_planner_app
from planner.store import init_schema, open_store

ONE_MODEL = {
    "model": "SmolLM2-135M",
    "devices": [{"kind": "H100-SXM", "count": 2}],
    "workload": {"prompt_tokens": 100, "output_tokens": 20, "request_rate_per_s": 3},
}


def refusal(api: TestClient, spec: object) -> list[tuple[str, ...]]:
    answer = api.post("/v1/plans", json={"spec": spec})
    assert answer.status_code == 422, answer.text
    return [tuple(str(part) for part in error["loc"]) for error in answer.json()["detail"]]


def test_a_mistake_is_reported_in_the_form_the_spec_has(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_schema(url)
    store = open_store(url)
    try:
        api = TestClient(create_planner_app(store, "http://127.0.0.1:9"))
        misspelt = {**ONE_MODEL, "workload": {"prompt_tokens": 100, "output_tokens": 20, "request_rate": 3}}
        assert refusal(api, misspelt) == [("body", "spec", "SpecBody", "workload", "request_rate")]
        pool = {"models": [{"model": "SmolLM2-135M", "workload": misspelt["workload"]}],
                "devices": ONE_MODEL["devices"]}
        assert refusal(api, pool) == [("body", "spec", "PoolSpecBody", "models", "0", "workload", "request_rate")]
        assert len(refusal(api, 5)) == 1  # not a mapping: one error
    finally:
        store.close()
