"""`speculor generate` end to end, in-process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch

from speculor import train
from speculor.api import DEFAULT_MAX_BATCH_SIZE
from speculor.cli import (
    COMMAND_MODULES,
    DEFAULT_BATCH_SIZE,
    DTYPE_CHOICES,
    KERNEL_CHOICES,
    RUNNER_CHOICES,
    main,
)
from speculor.loading import DTYPES
from speculor.runners import RUNNER_KINDS, fast
from speculor.train_command import MAX_CORPUS_BYTES_HELP
from speculor.wording import counted


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Commands set torch's CPU thread count for the whole process; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_generate_json_with_compare(capsys, text_pair_dirs):
    target, draft = map(str, text_pair_dirs)
    status = main(
        [
            "generate",
            "--target",
            target,
            "--draft",
            draft,
            "--prompt",
            "def add(a, b):\n",
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--compare",
            "--json",
        ]
    )
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"text", "token_ids", "stats", "baseline", "speedup", "identical"}
    assert report["identical"] is True
    assert report["token_ids"] == report["baseline"]["token_ids"]
    assert len(report["token_ids"]) == 16
    assert {
        "drafted",
        "accepted",
        "acceptance_rate",
        "mean_accepted_length",
        "target_forwards",
        "draft_forwards",
        "accepted_by_position",
        "wall_seconds",
        "tokens_per_second",
        "draft_seconds",
        "verify_seconds",
        "other_seconds",
    } <= set(report["stats"])


def test_generate_streams_text_then_a_stats_line(capsys, text_pair_dirs):
    target, _ = map(str, text_pair_dirs)
    status = main(
        [
            "generate",
            "--target",
            target,
            "--ngram",
            "2",
            "--prompt",
            "import os\n",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0
    assert "tok/s" in captured.err and "TAR" in captured.err
    assert captured.out.strip()


def test_generate_from_token_ids_without_text(capsys, text_pair_dirs):
    target, draft = map(str, text_pair_dirs)
    status = main(
        [
            "generate",
            "--target",
            target,
            "--draft",
            draft,
            "--prompt-ids",
            "5,6,7",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--json",
            "--temperature",
            "0.8",
            "--seed",
            "1",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and len(report["token_ids"]) == 6


def test_generate_takes_target_and_the_nearest_temperatures_choice_from_the_config_and_says_so(
    capsys, tmp_path, text_pair_dirs
):
    target, draft = map(str, text_pair_dirs)
    config = tmp_path / "best_config.json"
    greedy = {"temperature": 0.0, "draft": draft, "gamma": 3}
    sampled = {"temperature": 1.0, "ngram": 2, "gamma": 2}
    config.write_text(json.dumps({"target": target, **greedy, "by_temperature": [greedy, sampled]}))
    argv = ["generate", "--config", str(config), "--prompt", "x = 1\n", "--max-new-tokens", "8", "--ignore-eos"]
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["stats"]["drafted"] > 0 and len(report["stats"]["drafted_by_position"]) <= 3
    assert captured.err.count("\n") == 1
    assert f"the choice measured at T=0: target {target}, draft {draft}, γ 3" in captured.err

    assert main([*argv, "--json", "--temperature", "0.8", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert "the choice measured at T=1: " in captured.err and "draft ngram 2, γ 2" in captured.err
    assert len(json.loads(captured.out)["stats"]["drafted_by_position"]) <= 2


def test_single_prompt_json_says_why_it_stopped_and_target_alone_says_it_did_not_speculate(capsys, text_pair_dirs):
    target, _ = map(str, text_pair_dirs)
    argv = ["generate", "--target", target, "--prompt", "x = 1\n", "--max-new-tokens", "5", "--ignore-eos"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "length"
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "no speculation" in err and "TAR" not in err


def test_a_count_of_one_reads_in_the_singular(capsys, text_pair_dirs):
    assert [counted(count, "step") for count in (0, 1, 2, 1024)] == ["0 steps", "1 step", "2 steps", "1,024 steps"]
    assert [counted(count, "batch", "batches") for count in (1, 3)] == ["1 batch", "3 batches"]
    target, _ = map(str, text_pair_dirs)
    assert main(["generate", "--target", target, "--prompt", "x = 1\n", "--max-new-tokens", "1"]) == 0
    stats_line = capsys.readouterr().err
    assert stats_line.startswith("1 token, ") and "1 tokens" not in stats_line


def test_version_and_every_commands_help_shows_its_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and re.fullmatch(r"speculor \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    expected = {
        "generate": ["--max-new-tokens MAX_NEW_TOKENS", "(default: 64)"],
        "serve": ["(default: 8000)"],
        "bench": ["(default: 20)", "(default: 128)"],
        "train": ["(default: 8192)", "(default: 8 MB on the CPU, 200 MB on a GPU"],
        "train-parallel": ["(default: 8 MB on the CPU, 200 MB on a GPU"],
        "demo": ["(default 96)"],
    }
    for command, needles in expected.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        assert all(" ".join(needle.split()) in shown for needle in needles), (command, needles)
        assert "(default: None)" not in shown and "(default: False)" not in shown and "(default: )" not in shown


HEAVY_MODULES = ("torch", "transformers", "fastapi", "numpy")


@pytest.mark.parametrize(
    "module",
    COMMAND_MODULES,
)
def test_defining_a_command_imports_no_model_stack(module):
    """`speculor --help` must answer at once, so no command module may import torch, transformers or the server at
    import time. A fresh interpreter per module, since this one has them all loaded already."""
    script = (
        f"import argparse, importlib, sys, speculor; "
        f"importlib.import_module({module!r}).register(argparse.ArgumentParser().add_subparsers()); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY_MODULES!r})), "
        "speculor.models.shipped().target.name)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]", "target"]


def test_option_choices_match_the_modules_that_define_them():
    assert set(DTYPE_CHOICES) == set(DTYPES)
    assert RUNNER_CHOICES == RUNNER_KINDS
    assert KERNEL_CHOICES == fast.KERNEL_CHOICES
    assert DEFAULT_BATCH_SIZE == DEFAULT_MAX_BATCH_SIZE
    cpu_cap, gpu_cap = train.DEFAULT_CPU_CORPUS_BYTES / 1e6, train.DEFAULT_GPU_CORPUS_BYTES / 1e6
    assert f"(default: {cpu_cap:g} MB on the CPU, {gpu_cap:g} MB on a GPU;" in MAX_CORPUS_BYTES_HELP


def test_generate_reports_its_cpu_threads(capsys, text_pair_dirs):
    target, _ = map(str, text_pair_dirs)
    argv = ["generate", "--target", target, "--ngram", "2", "--prompt", "x = 1\n", "--max-new-tokens", "4"]
    assert main([*argv, "--ignore-eos", "--device", "cpu", "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu_threads"] == torch.get_num_threads() == 1
    assert main([*argv, "--device", "cpu", "--threads", "0"]) == 2
    assert "threads must be at least 1" in capsys.readouterr().err


def test_prompts_file_prints_one_json_line_per_prompt_in_order(capsys, tmp_path, text_pair_dirs):
    target, draft = map(str, text_pair_dirs)
    prompts = ["def add(a, b):\n", "import os\n", [5, 6, 7], "class Point:\n"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    argv = ["generate", "--target", target, "--draft", draft, "--max-new-tokens", "6", "--ignore-eos", "--compare"]
    assert main([*argv, "--prompts-file", str(jsonl), "--batch-size", "3", "--gamma", "2"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert all(line["identical"] and len(line["token_ids"]) == 6 for line in lines)
    assert len({tuple(line["token_ids"]) for line in lines}) > 1
    assert "4 prompts, batch size 3: 24 tokens" in captured.err and "identical 4/4" in captured.err

    plain = tmp_path / "prompts.txt"
    plain.write_text("x = 1\n\nfor item in items:\n")
    assert main(["generate", "--target", target, "--ngram", "2", "--prompts-file", str(plain)]) == 0
    assert [json.loads(line)["index"] for line in capsys.readouterr().out.splitlines()] == [0, 1]


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ('{"prompt": "a"}\n{"text": "b"}\n', [], 'line 2: needs a "prompt"'),
        ('{"prompt": "a"}\nnot json\n', [], "line 2: not a JSON object"),
        ("\n\n", [], "holds no prompt"),
        ("x = 1\n", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_prompts_file_mistakes_are_one_clear_line(capsys, tmp_path, text_pair_dirs, content, extra, message):
    target, _ = map(str, text_pair_dirs)
    path = tmp_path / "prompts"
    path.write_text(content)
    assert main(["generate", "--target", target, "--prompts-file", str(path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_batch_size_needs_a_prompts_file(capsys, text_pair_dirs):
    target, _ = map(str, text_pair_dirs)
    assert main(["generate", "--target", target, "--prompt", "x", "--batch-size", "4"]) == 2
    assert "--batch-size applies to --prompts-file" in capsys.readouterr().err


def test_a_model_name_not_on_disk_fails_at_once_with_one_line(capsys, monkeypatch):
    """Offline, a name that is neither a directory nor cached must not wait for transformers' retries (half a
    minute): one `error:` line naming the model, within seconds."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()
    status = main(["generate", "--target", "no-such-org/no-such-model", "--prompt", "x", "--device", "cpu"])
    seconds = time.perf_counter() - began
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and seconds < 5
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "no-such-org/no-such-model" in lines[0] and "neither a local directory" in lines[0]


def test_generate_takes_the_processor_options_and_stays_identical_to_the_target_alone(capsys, text_pair_dirs):
    target, draft = map(str, text_pair_dirs)
    common = ["generate", "--target", target, "--prompt", "def add(a, b):\n", "--max-new-tokens", "12", "--json"]
    assert main([*common, "--draft", draft, "--ignore-eos", "--gamma", "3"]) == 0
    plain = json.loads(capsys.readouterr().out)["token_ids"]
    options = ["--repetition-penalty", "1.5", "--frequency-penalty", "0.5", "--logit-bias", f"{plain[0]}=-100"]
    options += ["--min-tokens", "3", "--bad-word", "return", "--stop-token-id", "0", "--min-p", "0.1"]
    assert main([*common, "--draft", draft, "--ignore-eos", "--gamma", "3", "--compare", *options]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical"] is True
    assert report["token_ids"][0] != plain[0]
    assert main([*common, "--logit-bias", "x=1"]) == 2
    assert "ID=BIAS" in capsys.readouterr().err
