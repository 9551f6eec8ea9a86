"""`speculor generate` end to end, in-process."""

from __future__ import annotations

import json

from speculor.cli import main


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


def test_generate_reads_best_config(capsys, tmp_path, text_pair_dirs):
    target, draft = map(str, text_pair_dirs)
    config = tmp_path / "best_config.json"
    config.write_text(json.dumps({"target": target, "draft": draft, "gamma": 3}))
    status = main(
        [
            "generate",
            "--target",
            target,
            "--config",
            str(config),
            "--prompt",
            "x = 1\n",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["stats"]["drafted"] > 0
    assert len(report["stats"]["drafted_by_position"]) <= 3
