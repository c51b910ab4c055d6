"""A CLI command (apply, device add/drain, plan --server) against a server started with
--admin-token: without the token, or with another, the 401 said only "the admin API needs
`Authorization: Bearer TOKEN` (the server's --admin-token)", which a user of `pipeshift device
add` cannot send by hand; it now says how the command takes the token."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from agent.gateway.admin import install_admin_api
from agent.gateway.errors import install_error_handlers
from agent.gateway.server import ServerThread
from planner.admin_client import AdminClient, AdminError
from tests.gateway.test_admin_auth import NoApplies


@pytest.fixture
def server() -> Iterator[str]:
    app = FastAPI()
    install_error_handlers(app)
    install_admin_api(app, NoApplies(), "sekrit")
    with ServerThread(app) as running:
        yield running.base_url


@pytest.mark.parametrize(("token", "expected"), [
    (None, "give the server's token with --token or PIPESHIFT_ADMIN_TOKEN"),
    ("wrong", "the token given (--token or PIPESHIFT_ADMIN_TOKEN) is not the server's"),
])
def test_a_refused_token_says_how_to_give_the_right_one(server: str, token: str | None, expected: str) -> None:
    with pytest.raises(AdminError) as raised:
        AdminClient(server, token).applies()
    assert raised.value.status == 401 and expected in str(raised.value)
    assert AdminClient(server, "sekrit").applies() == []
