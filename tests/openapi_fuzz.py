"""Schemathesis driven from plain Hypothesis: every operation of an OpenAPI document, positive
and negative cases, every check schemathesis has (its pytest plugin does not run on pytest 9)."""

from __future__ import annotations

from typing import Any


def fuzz_operations(schema_url: str, base_url: str, headers: dict[str, str] | None = None,
                    max_examples: int = 20, skip: tuple[str, ...] = ()) -> list[str]:
    """Fuzzes each operation (`METHOD /path`) not in `skip`; raises the first failure.
    Returns the operations fuzzed."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(schema_url)
    fuzzed = []
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        if label in skip:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @given(case=strategy)
            @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                case.call_and_validate(base_url=base_url, headers=headers)

            try:
                run()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise  # only an operation that takes nothing has no invalid input
        fuzzed.append(label)
    return fuzzed
