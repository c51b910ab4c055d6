"""Reading a YAML document with the line of every field, so that errors can say `FILE:LINE`.
Specs (planner/spec.py) and measured profiles (cost_models/profile.py) are read this way."""

from __future__ import annotations

from typing import Any

import yaml

Lines = dict[tuple[Any, ...], int]  # field path -> 1-based line


class YamlSyntaxError(ValueError):
    """The text is not YAML; the message is `SOURCE:LINE: YAML syntax error: ...`."""


def load_with_lines(text: str, source: str) -> tuple[Any, Lines]:
    """Returns the document in `text` and the line of each of its fields; raises
    YamlSyntaxError saying where the syntax breaks."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlSyntaxError(f"{source}:{line}: YAML syntax error: {problem}; fix the syntax") from None
    lines: Lines = {}
    if root is not None:
        _line_map(root, (), lines)
    return data, lines


def _line_map(node: yaml.Node, path: tuple[Any, ...], out: Lines) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            _line_map(value_node, (*path, key_node.value), out)
            out[(*path, key_node.value)] = key_node.start_mark.line + 1  # a field is where its key is
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), out)
