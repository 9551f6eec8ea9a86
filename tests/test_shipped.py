"""The family shipped in `speculor/models`: it loads, it shares one tokenizer, it fits its size budget, and the best
draft really is a good draft for the target."""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import speculor
from speculor.models import BEST_DRAFT, DRAFTS, shipped

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MIB = 1 << 20
# Python headers written for this test: not in the training corpus (the interpreter's own source files).
HELD_OUT_PROMPTS = (
    'def celsius_to_fahrenheit(degrees):\n    """Convert a temperature from Celsius to Fahrenheit."""\n',
    'def flatten(nested):\n    """Return a flat list of the items of a list of lists."""\n',
    'def count_vowels(word):\n    """Return how many vowels word contains."""\n',
    'class Queue:\n    """A first-in, first-out queue."""\n\n    def __init__(self):\n',
    'def load_config(path):\n    """Read a JSON configuration file and return it as a dict."""\n',
    'def chunks(items, size):\n    """Yield successive lists of at most size items."""\n',
)


@pytest.fixture(scope="module")
def family():
    return shipped()


@pytest.fixture(scope="module")
def decoder(family):
    return speculor.SpeculativeDecoder(family.target, family.best_draft, device="cpu")


def test_shipped_lists_target_and_drafts_with_the_best_marked(family):
    assert list(family.drafts) == list(DRAFTS)
    assert family.best_draft_name == BEST_DRAFT
    assert family.best_draft == family.drafts[BEST_DRAFT]
    assert family.target.name == "target"


def test_every_model_loads_with_its_tokenizer_and_all_share_one_vocabulary(family):
    target_vocab = AutoTokenizer.from_pretrained(family.target).get_vocab()
    assert len(target_vocab) == 8192
    for path in (family.target, *family.drafts.values()):
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer.get_vocab() == target_vocab, path.name
        assert model.config.vocab_size == len(target_vocab)
        assert model.config.tie_word_embeddings
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.bos_token_id
        assert (path / "README.md").read_text().count("held-out loss") == 1


def test_weights_fit_the_package_budget(family):
    sizes = [file.stat().st_size for file in family.target.parent.rglob("*") if file.is_file()]
    weights = sum(file.stat().st_size for file in family.target.parent.rglob("*.safetensors"))
    assert max(sizes) <= 16 * MIB
    # Six small models and an EAGLE-3 head; the whole repository must stay well under 64 MiB.
    assert weights <= 58 * MIB


def test_a_prompt_ending_in_a_newline_tokenizes_like_the_start_of_its_continuation(family):
    """The boundary that matters for HumanEval: the newline must not merge with the indentation that follows."""
    tokenizer = AutoTokenizer.from_pretrained(family.target)
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    prompt_ids = tokenizer.encode(prompt)
    continued_ids = tokenizer.encode(prompt + "    return a + b\n")
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert continued_ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(continued_ids, skip_special_tokens=True) == prompt + "    return a + b\n"


@pytest.mark.parametrize("prompt", HELD_OUT_PROMPTS[:3])
def test_greedy_speculative_output_equals_the_target_alone(decoder, prompt):
    alone = decoder.generate(prompt, max_new_tokens=40, speculative=False, ignore_eos=True)
    speculative = decoder.generate(prompt, max_new_tokens=40, gamma=4, ignore_eos=True)
    assert speculative.token_ids == alone.token_ids
    assert speculative.stats.target_forwards < alone.stats.target_forwards


def test_completions_are_code_not_an_immediate_end_of_text(decoder):
    result = decoder.generate(HELD_OUT_PROMPTS[1], max_new_tokens=24)
    assert result.text.startswith("    ")
    assert len(result.token_ids) == 24


def test_best_draft_acceptance_rate_on_held_out_prompts(decoder):
    """Measured 0.729 (draft-4x128-long, γ=4, 48 tokens per prompt, greedy); the 1-layer draft gets 0.22 here and
    a random draft of the same shape 0.002, so 0.6 leaves room for rounding across CPUs while still proving the
    draft learned the target."""
    drafted = accepted = 0
    for prompt in HELD_OUT_PROMPTS:
        stats = decoder.generate(prompt, max_new_tokens=48, gamma=4, ignore_eos=True).stats
        drafted += stats.drafted
        accepted += stats.accepted
    assert accepted / drafted > 0.6


def test_shipped_is_reachable_after_a_plain_import():
    """`import speculor; speculor.models.shipped()` works in a fresh interpreter, without importing torch."""
    script = "import sys, speculor; print(speculor.models.shipped().best_draft_name, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [BEST_DRAFT, "False"]
