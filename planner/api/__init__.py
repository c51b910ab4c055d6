"""The planner REST API (FastAPI): plans, applies, configurations, history, rollback, cluster."""

from planner.api.app import create_planner_app

__all__ = ["create_planner_app"]
