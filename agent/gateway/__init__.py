"""OpenAI-compatible HTTP gateway in front of an `agent.engine_api.Engine`."""

from agent.gateway.app import create_app

__all__ = ["create_app"]
