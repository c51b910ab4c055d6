"""`pipeshift demo --model M`: the splits it starts from and changes to follow M's layer count
(they were SmolLM2's 0:15,15:30 and 0:10,10:20,20:30 whatever the model, so any other model
failed before serving)."""

from __future__ import annotations

import argparse
import json

from agent import demo_command
from agent.demo_command import fill_default_splits
from planner.cli import main


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo_command.register(parser.add_subparsers())
    return parser.parse_args(["demo", *argv])


def llama_dir(tmp_path, n_layers: int):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": n_layers, "num_attention_heads": 4, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return str(tmp_path)


def test_smollm2_keeps_its_splits():
    args = demo_args()
    fill_default_splits(args)
    assert (args.stages, args.to) == ("0:15,15:30", "0:10,10:20,20:30")


def test_another_model_is_split_by_its_own_layers(tmp_path):
    args = demo_args("--model", llama_dir(tmp_path, 6))
    fill_default_splits(args)
    assert (args.stages, args.to) == ("0:3,3:6", "0:2,2:4,4:6")


def test_given_splits_are_kept(tmp_path):
    args = demo_args("--model", llama_dir(tmp_path, 6), "--stages", "0:4,4:6", "--to", "0:1,1:6")
    fill_default_splits(args)
    assert (args.stages, args.to) == ("0:4,4:6", "0:1,1:6")


def test_a_model_too_shallow_for_three_stages_is_a_message(tmp_path, capsys):
    assert main(["demo", "--model", llama_dir(tmp_path, 2)]) == 2
    err = capsys.readouterr().err
    assert "give --stages and --to" in err and "Traceback" not in err
