"""`speculor train`: its pure parts (shapes, schedule, distillation loss, tokenizer, corpus) and a tiny end-to-end
run on the CPU whose result loads with Hugging Face and decodes speculatively."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import speculor
from speculor import train
from speculor.cli import main
from speculor.errors import SpeculorError
from speculor.train import (
    END_OF_TEXT,
    ModelShape,
    TrainSettings,
    build_tokenizer,
    collect_corpus,
    distillation_loss,
    learning_rate_at,
    train_family,
    train_model,
    training_plan,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOURCE = Path(speculor.__file__).parent
TINY = {"vocab_size": 300, "steps": 3, "batch_size": 2, "sequence_length": 32, "progress": False}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A few of speculor's own modules: real Python, small enough to train on in a second."""
    directory = tmp_path_factory.mktemp("corpus")
    for name in ("engine.py", "api.py", "verify.py", "sampling.py", "loading.py"):
        shutil.copy(SOURCE / name, directory / name)
    (directory / "copy_of_verify.py").write_bytes((SOURCE / "verify.py").read_bytes())
    return directory


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, corpus_dir) -> Path:
    output = tmp_path_factory.mktemp("family")
    train_family(output, ["target:2x32", "draft:1x16"], corpus=corpus_dir, distill_from="target", seed=1, **TINY)
    return output


def test_shape_parsing_and_derived_sizes():
    shape = ModelShape.parse("target:8x384@180")
    assert (shape.name, shape.layers, shape.width, shape.seconds) == ("target", 8, 384, 180.0)
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate_size) == (6, 3, 64, 1024)
    assert ModelShape.parse("d:1x48").heads == 3
    config = ModelShape.parse("d:4x128").config(vocab_size=512, context_length=64, end_of_text_id=0)
    assert config.tie_word_embeddings and config.num_key_value_heads == 1 and config.eos_token_id == 0


@pytest.mark.parametrize("text", ["target", "t:8", "t:0x64", "t:2x20", "t:2x64@", ":2x64"])
def test_bad_shapes_are_refused(text):
    with pytest.raises(SpeculorError):
        ModelShape.parse(text)


def test_schedule_warms_up_peaks_and_decays_to_the_floor():
    peak = 1e-3
    assert learning_rate_at(0.0, peak) < learning_rate_at(0.02, peak) < peak
    assert learning_rate_at(0.03, peak) == pytest.approx(peak)
    assert learning_rate_at(0.5, peak) > learning_rate_at(0.9, peak)
    assert learning_rate_at(1.0, peak) == pytest.approx(0.1 * peak)


def test_distillation_loss_is_zero_only_for_the_teachers_distribution():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=generator)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(teacher + 5.0, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert distillation_loss(torch.randn(2, 5, 11, generator=generator), teacher).item() > 0.05


def test_tokenizer_isolates_newlines_and_wraps_text_in_end_of_text():
    tokenizer = build_tokenizer(["def f(x):\n    return x\n\n"] * 50, vocab_size=300)
    prompt = "def f(x):\n"
    prompt_ids = tokenizer.encode(prompt)
    full_ids = tokenizer.encode(prompt + "    return x\n")
    assert prompt_ids[0] == tokenizer.convert_tokens_to_ids(END_OF_TEXT) == tokenizer.eos_token_id
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(prompt_ids[-1:]) == "\n"
    assert tokenizer.decode(full_ids, skip_special_tokens=True) == prompt + "    return x\n"


def test_corpus_drops_duplicates_and_splits_by_path(corpus_dir, tmp_path):
    corpus = collect_corpus([corpus_dir])
    assert corpus.files == 5  # copy_of_verify.py has the same bytes as verify.py
    assert corpus.train and corpus.held_out
    assert collect_corpus([corpus_dir]).train == corpus.train
    capped = collect_corpus([corpus_dir], max_bytes=(SOURCE / "engine.py").stat().st_size + 10)
    assert capped.bytes < corpus.bytes
    with pytest.raises(SpeculorError, match="no usable"):
        collect_corpus([tmp_path])


def test_trained_family_loads_and_decodes_speculatively(family_dir):
    summary = json.loads((family_dir / "family.json").read_text())
    assert summary["models"]["draft"]["distilled_from"] == "target"
    assert summary["models"]["target"]["steps"] == 3
    for name in ("target", "draft"):
        directory = family_dir / name
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert model.dtype == torch.float16
        assert model.config.num_hidden_layers == {"target": 2, "draft": 1}[name]
        assert tokenizer.eos_token_id == model.generation_config.eos_token_id
        card = (directory / "README.md").read_text()
        assert "held-out loss" in card and "tokens seen" in card and "train_family(" in card
        assert "barely trained" in card and "plausible Python" not in card  # three steps teach nothing
        assert math.isfinite(summary["models"][name]["held_out_loss"])
    decoder = speculor.SpeculativeDecoder(family_dir / "target", family_dir / "draft", device="cpu")
    alone = decoder.generate("def f(x):\n", max_new_tokens=12, speculative=False, ignore_eos=True)
    speculative = decoder.generate("def f(x):\n", max_new_tokens=12, ignore_eos=True)
    assert speculative.token_ids == alone.token_ids and len(alone.token_ids) == 12


def test_cli_trains_new_drafts_for_a_saved_target(family_dir, corpus_dir, tmp_path, capsys):
    """Distilling from a directory reuses that model's tokenizer, so the new draft pairs with the old target."""
    output = tmp_path / "more"
    argv = ["train", "--output", str(output), "--model", "extra:1x16", "--corpus", str(corpus_dir)]
    argv += ["--distill-from", str(family_dir / "target"), "--steps", "2", "--batch-size", "2"]
    argv += ["--sequence-length", "32", "--quiet"]
    assert main(argv) == 0
    assert "extra\t1x16" in capsys.readouterr().out
    card = (output / "extra" / "README.md").read_text()
    assert "speculor train --output" in card and "--distill-from" in card
    assert AutoTokenizer.from_pretrained(output / "extra").get_vocab() == (
        AutoTokenizer.from_pretrained(family_dir / "target").get_vocab()
    )
    decoder = speculor.SpeculativeDecoder(family_dir / "target", output / "extra", device="cpu")
    assert len(decoder.generate("x = ", max_new_tokens=4, ignore_eos=True).token_ids) == 4


def test_bad_family_requests_are_refused(tmp_path, corpus_dir):
    with pytest.raises(SpeculorError, match="unique"):
        train_family(tmp_path, ["a:1x16", "a:1x16"], corpus=corpus_dir, **TINY)
    with pytest.raises(SpeculorError, match="distill_from"):
        train_family(tmp_path, ["a:1x16"], corpus=corpus_dir, distill_from="a", **TINY)
    with pytest.raises(SpeculorError, match="fewer than one window"):
        train_family(tmp_path, ["a:1x16"], corpus=corpus_dir, **(TINY | {"sequence_length": 1_000_000}))
    with pytest.raises(SpeculorError, match="positive number of steps or seconds"):
        train_family(tmp_path, ["a:1x16"], corpus=tmp_path / "not read", **(TINY | {"steps": None, "seconds": 0}))


def test_training_says_what_it_will_spend_before_it_starts():
    shapes = [ModelShape.parse("target:4x128@90"), ModelShape.parse("draft:2x64")]
    assert training_plan(shapes, TrainSettings(seconds=60.0)) == (
        "training: target 90 s, draft 60 s; 150 s in all, plus a held-out pass after each model"
    )
    assert training_plan(shapes, TrainSettings(steps=1)) == "training: 2 models, 1 step each"


def test_progress_bar_shows_a_live_loss_and_no_seconds_per_second(capsys):
    """With a time budget the bar counts seconds; its postfix (step, steps/s, smoothed loss, tok/s) is redrawn
    about once a second with fresh values, and the meaningless seconds-per-second rate is not shown."""
    stream = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(seconds=3.0, batch_size=2, sequence_length=16, progress=True)
    train_model(ModelShape("tiny", 1, 16), stream, stream[:512], 64, 0, settings)
    shown = capsys.readouterr().err
    losses = re.findall(r"train CE (\d+\.\d+)", shown)
    assert not re.search(r"\ds/s", shown) and "steps/s" in shown and "/3 s [" in shown
    assert len(losses) >= 3 and len(set(losses)) >= 2
    assert "s of a 3 s budget" in shown


def test_a_distilled_models_bar_names_both_losses(capsys):
    """The KL to the teacher is near zero long before the model is any good; the bar must also show the
    cross-entropy, which the held-out loss printed at the end can be compared with."""
    stream = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(seconds=None, steps=3, batch_size=2, sequence_length=16, progress=True)
    teacher, _ = train_model(ModelShape("teacher", 1, 16), stream, stream[:512], 64, 0, settings)
    capsys.readouterr()
    train_model(ModelShape("student", 1, 16), stream, stream[:512], 64, 0, settings, teacher=teacher)
    shown = capsys.readouterr().err
    assert re.search(r"train CE \d+\.\d+, KL to teacher \d+\.\d+", shown)


def test_a_time_budget_stops_before_a_step_that_would_overrun_it(monkeypatch):
    """With steps of 0.4 s, a 1 s budget fits two: the third would end at 1.2 s, so it is not started."""
    stream = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(0))
    windows = train._windows

    def slow_windows(*args):
        time.sleep(0.4)
        return windows(*args)

    monkeypatch.setattr(train, "_windows", slow_windows)
    settings = TrainSettings(seconds=1.0, batch_size=2, sequence_length=16, progress=False)
    _, report = train_model(ModelShape("tiny", 1, 16), stream, stream[:17], 64, 0, settings)
    assert report["steps"] == 2 and report["seconds"] <= 1.0
