"""`pipeshift examples [NAME] [--to DIR]`: list the example specs that ship with pipeshift, or
copy one, with the trace and the measured profiles it reads, into DIR to plan or edit it.

A copied spec reads its trace from `traces/` beside it; a spec whose trace lay outside its own
folder has that path rewritten in the copy. A trace's folder README (licence, attribution)
travels with it."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path, PurePosixPath


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "examples", help="list the example specs, or copy one to plan it",
        description="List the example specs that ship with pipeshift, or copy one (with the "
        "trace it reads) into a folder and print the command that plans it.",
    )
    p.add_argument("name", nargs="?", help="the example to copy (a name from the list)")
    p.add_argument("--to", default=".", metavar="DIR", help="where to copy it (default: here)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cost_models.paths import specs_dir

    examples = {path.stem: path for path in sorted(specs_dir().glob("*.yaml"))}
    if args.name is None:
        for name, path in examples.items():
            print(f"{name:<36} {summary(path.read_text())}")
        print("\nCopy one with `pipeshift examples NAME --to DIR`.")
        return 0
    source = examples.get(args.name.removesuffix(".yaml"))
    if source is None:
        print(f"pipeshift examples: error: no example {args.name!r}; choose one of: "
              f"{', '.join(examples)}", file=sys.stderr)
        return 1
    try:
        spec = copy_example(source, Path(args.to))
    except OSError as exc:
        if isinstance(exc, FileExistsError) and exc.errno is None:  # _copy_bytes: other bytes there
            print(f"pipeshift examples: error: {exc} exists and differs; remove it or choose "
                  "another --to", file=sys.stderr)
        else:
            print(f"pipeshift examples: error: cannot write {exc.filename or args.to} "
                  f"({exc.strerror or exc}): choose another --to", file=sys.stderr)
        return 1
    print(f"Wrote {spec}. Plan it with:\n\n  pipeshift plan -f {spec}")
    return 0


def summary(text: str) -> str:
    """Returns the first sentence of the spec's leading comment."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    sentence = " ".join(lines).split(". ")[0].rstrip(".")
    return textwrap.shorten(sentence, 100, placeholder=" ...")


def copy_example(source: Path, to: Path) -> Path:
    """Copies the spec `source`, the traces (its own, or its models') and the profiles it names
    into `to`; returns the copied spec."""
    import yaml

    text = source.read_text()
    loaded = yaml.safe_load(text)
    workloads = [loaded.get("workload") or {}, *((m or {}).get("workload") or {} for m in loaded.get("models") or [])]
    for trace in sorted({w["trace"] for w in workloads if w.get("trace") is not None}):
        if PurePosixPath(trace).is_absolute():
            continue
        inside = ".." not in PurePosixPath(trace).parts
        target = trace if inside else f"traces/{PurePosixPath(trace).name}"
        text = text.replace(f"trace: {trace}", f"trace: {target}")
        trace_source = source.parent / trace
        _copy_bytes(trace_source.read_bytes(), to / target)
        readme = trace_source.parent / "README.md"
        if readme.is_file():
            _copy_bytes(readme.read_bytes(), (to / target).parent / "README.md")
    for profile in yaml.safe_load(text).get("profiles") or []:  # measured profiles it reads
        if not PurePosixPath(profile).is_absolute() and ".." not in PurePosixPath(profile).parts:
            _copy_bytes((source.parent / profile).read_bytes(), to / profile)
    spec = to / source.name
    _copy_bytes(text.encode(), spec)
    return spec


def _copy_bytes(data: bytes, path: Path) -> None:
    """Writes `data` to `path`; a file already there with the same bytes is kept, one with
    other bytes raises FileExistsError."""
    if path.exists():
        if path.read_bytes() != data:
            raise FileExistsError(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

