"""`speculor train-eagle`: a few seconds of training on a tiny target write a head in the hub layout that loads
and drafts better than the head it started from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build, tiny_llama_config, train_tiny_tokenizer
from transformers import AutoTokenizer, LlamaForCausalLM

import speculor
from speculor.cli import main
from speculor.eagle import head_for_target, load_eagle3
from speculor.train import collect_corpus, encode_documents
from speculor.train_eagle import held_out_acceptance, held_out_prompts, start_from_target

CORPUS = Path(speculor.__file__).parent


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    tokenizer = train_tiny_tokenizer()
    config = tiny_llama_config(vocab_size=len(tokenizer), layers=4, initializer_range=0.2)
    path = tmp_path_factory.mktemp("eagle_target") / "target"
    build(LlamaForCausalLM, config, seed=4, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_train_eagle_writes_a_loadable_head_that_beats_its_start(tmp_path, target_dir):
    output = tmp_path / "head"
    code = main(
        [
            "train-eagle",
            "--target",
            str(target_dir),
            "--output",
            str(output),
            "--corpus",
            str(CORPUS),
            "--max-corpus-bytes",
            "300000",
            "--steps",
            "80",
            "--batch-size",
            "4",
            "--sequence-length",
            "64",
            "--draft-vocab",
            "200",
            "--learning-rate",
            "0.003",
            "--layers",
            "1,2,3",
            "--threads",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 200
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    card = (output / "README.md").read_text()
    assert "speculor train-eagle --target" in card and "acceptance" in card
    target = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    trained, layers = load_eagle3(output, target)
    assert layers == (1, 2, 3)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    held_out = encode_documents(tokenizer, collect_corpus([CORPUS], 300_000).held_out)
    prompts = held_out_prompts(held_out, 6, 24, None)
    draft_ids = trained.draft_to_target.tolist()
    torch.manual_seed(0)
    untrained = head_for_target(target, draft_ids, layers)
    start_from_target(untrained, target, draft_ids)
    trained_acceptance, trained_length = held_out_acceptance(target, trained, layers, prompts, 3, 24)
    untrained_acceptance, untrained_length = held_out_acceptance(target, untrained.eval(), layers, prompts, 3, 24)
    assert trained_length > untrained_length
    assert trained_acceptance[0] > untrained_acceptance[0]


@pytest.mark.parametrize(
    ("layers", "message"), [("1,2", "expected three comma-separated layer numbers"), ("0,1,4", "0..3, got (0, 1, 4)")]
)
def test_feature_layers_that_cannot_feed_a_head_are_refused(tmp_path, target_dir, capsys, layers, message):
    arguments = ["train-eagle", "--target", str(target_dir), "--output", str(tmp_path / "head"), "--steps", "1"]
    try:
        code = main([*arguments, "--layers", layers, "--quiet"])
    except SystemExit as stop:
        code = stop.code
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "head").exists()


def test_training_goes_on_from_a_saved_head_keeping_its_vocabulary_and_layers(tmp_path, target_dir, capsys):
    def train(output: Path, *extra: str) -> int:
        arguments = ["train-eagle", "--target", str(target_dir), "--output", str(output), "--corpus", str(CORPUS)]
        sizes = ["--max-corpus-bytes", "100000", "--steps", "2", "--batch-size", "2", "--sequence-length", "32"]
        return main([*arguments, *sizes, "--threads", "1", "--quiet", *extra])

    assert train(tmp_path / "first", "--draft-vocab", "150", "--layers", "0,2,3") == 0
    assert train(tmp_path / "second", "--init-from", str(tmp_path / "first"), "--draft-vocab", "90") == 0
    target = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    first, first_layers = load_eagle3(tmp_path / "first", target)
    second, second_layers = load_eagle3(tmp_path / "second", target)
    assert first_layers == second_layers == (0, 2, 3)
    assert torch.equal(first.draft_to_target, second.draft_to_target)
    assert not torch.equal(first.fc.weight, second.fc.weight)
    assert f"the head in `{tmp_path / 'first'}`" in (tmp_path / "second" / "README.md").read_text()
    assert train(tmp_path / "third", "--init-from", str(tmp_path / "first"), "--layers", "1,2,3") != 0
    assert "reads layers (0, 2, 3), not (1, 2, 3)" in capsys.readouterr().err
