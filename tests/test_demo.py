"""`speculor demo` end to end on the CPU, with short completions to keep the test quick."""

from __future__ import annotations

import torch

from speculor.cli import main
from speculor.demo import DEMO_PROMPTS


def test_demo_exits_zero_and_prints_its_table(capsys):
    threads = torch.get_num_threads()
    assert main(["demo", "--device", "cpu", "--max-new-tokens", "12"]) == 0
    torch.set_num_threads(threads)
    output = capsys.readouterr().out
    assert "target alone vs speculative, greedy" in output
    assert output.count("prompt ") >= len(DEMO_PROMPTS)
    assert "draft-4x128-long" in output
    summary = next(line for line in output.splitlines() if line.startswith("│ all "))
    assert "True" in summary


def test_bad_demo_arguments_fail_before_any_model_loads(capsys, monkeypatch):
    """`--gamma 0` is a typo to report at once, not after seconds of loading the shipped models."""

    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded before the arguments were checked")

    monkeypatch.setattr("speculor.api.SpeculativeDecoder", no_loading)
    assert main(["demo", "--device", "cpu", "--gamma", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--gamma must be at least 1" in lines[0]
