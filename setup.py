"""The wheel's package list; everything else is in pyproject.toml.

The code's packages are found. The data packages, which pyproject.toml maps from other folders
(data/ -> pipeshift_data, migrations/ -> pipeshift_migrations) and whose files it lists, are
named: setuptools cannot find mapped packages, and pyproject.toml could only take one whole
list, which would miss code packages added later."""

from setuptools import find_namespace_packages, setup

CODE = find_namespace_packages(include=["planner*", "agent*", "cost_models*"])
DATA = [
    "pipeshift_data", "pipeshift_data.specs", "pipeshift_data.specs.traces", "pipeshift_data.specs.profiles",
    "pipeshift_data.traces",
    "pipeshift_migrations", "pipeshift_migrations.versions",
]

setup(packages=CODE + DATA)
