"""agent.gateway.admin: who may use the admin API. On this host only, unless the server has a
token; then a bearer token from anywhere, and nothing without it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from agent.gateway.admin import install_admin_api
from agent.gateway.errors import install_error_handlers


class NoApplies:
    """Stands in for an engine's reconfigurations: it has never applied anything."""

    def get(self, apply_id):
        return None

    def cancel(self, apply_id):
        return None

    def history(self):
        return []


def _client(token=None, host="127.0.0.1") -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    install_admin_api(app, NoApplies(), token)
    return TestClient(app, client=(host, 50000))


def test_without_a_token_this_host_may_and_others_may_not():
    assert _client().get("/admin/v1/applies").json() == {"data": []}
    assert _client(host="::1").get("/admin/v1/applies/nope").status_code == 404
    answer = _client(host="10.1.2.3").get("/admin/v1/applies")
    assert answer.status_code == 403
    assert "--admin-token" in answer.json()["error"]["message"]


def test_with_a_token_every_host_needs_it():
    for host in ("127.0.0.1", "10.1.2.3"):
        client = _client(token="s3cret", host=host)
        assert client.get("/admin/v1/applies").status_code == 401
        wrong = client.get("/admin/v1/applies", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "Bearer" in wrong.json()["error"]["message"]
        ok = client.get("/admin/v1/applies", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_unknown_apply_is_a_404_that_says_where_to_look():
    answer = _client().post("/admin/v1/applies/apply-9/cancel")
    assert answer.status_code == 404
    assert "GET /admin/v1/applies" in answer.json()["error"]["message"]


def test_a_target_needs_exactly_one_form():
    client = _client()
    one = {"pipelines": [{"stages": [{"start": 0, "end": 30}]}]}
    both = client.post("/admin/v1/applies", json={"stages": "0:30", "target": one})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    neither = client.post("/admin/v1/applies", json={"dry_run": True})
    assert neither.status_code == 400
    overhead = client.post("/admin/v1/applies", json={"stages": "0:30", "max_overhead": 2})
    assert overhead.status_code == 400 and overhead.json()["error"]["param"] == "max_overhead"
