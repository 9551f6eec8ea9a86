"""The Hugging Face runner on the slot protocol: rows of a step are independent sequences, and every rollback — into
a sliding window already passed, into recurrent state, past the last rollback — leaves the exact cache a fresh
prefill of the kept tokens would give."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from speculor import SpeculorError
from speculor.runners.base import Runner
from speculor.runners.hf import HFRunner

VOCAB = 64


def tiny(model_type: str, **settings) -> torch.nn.Module:
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        **settings,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval()


MODELS = {
    "llama": lambda: tiny("llama"),
    "mistral-window-4": lambda: tiny("mistral", sliding_window=4),
    "gemma2-window-4": lambda: tiny("gemma2", sliding_window=4),
    "mamba": lambda: tiny("mamba", state_size=4),
}


def tokens(count: int, seed: int) -> torch.Tensor:
    return torch.randint(VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def fresh_logits(model, sequence: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
    """Logits for `next_tokens` after a runner that saw `sequence` and nothing else."""
    runner = HFRunner(model)
    runner.extend(0, sequence)
    return runner.step([0], next_tokens.view(1, -1))[0]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def test_implements_the_runner_protocol(model):
    runner = HFRunner(model, slots=3)
    assert isinstance(runner, Runner)
    assert runner.slots == 3 and runner.vocab_size == VOCAB and runner.length(2) == 0


def test_rollback_anywhere_equals_a_fresh_prefill(model):
    """Cut back inside the last step, to its start, and past earlier rollbacks (the re-feed path of recurrent
    models); each time the next step's logits equal those of a runner that only ever saw the kept tokens."""
    sequence = tokens(24, seed=1)
    runner = HFRunner(model)
    runner.extend(0, sequence[:10])
    runner.step([0], sequence[10:16].view(1, -1))
    for keep in (13, 10, 11, 7):
        runner.rollback(0, keep)
        assert runner.length(0) == keep
        logits = runner.step([0], sequence[keep : keep + 3].view(1, -1))[0]
        torch.testing.assert_close(logits, fresh_logits(model, sequence[:keep], sequence[keep : keep + 3]))


def test_a_prompt_extended_in_chunks_equals_one_prefill(model):
    """Short chunks after a recurrent state go one token a forward, long ones rebuild the state: both exact."""
    sequence = tokens(60, seed=7)
    runner = HFRunner(model)
    for start, end in ((0, 10), (10, 13), (13, 57)):
        runner.extend(0, sequence[start:end])
    assert runner.length(0) == 57
    logits = runner.step([0], sequence[57:].view(1, -1))[0]
    torch.testing.assert_close(logits, fresh_logits(model, sequence[:57], sequence[57:]))


def test_rows_of_a_step_are_independent_sequences(model):
    """Two slots at different lengths stepped together give what each gives alone."""
    first, second = tokens(12, seed=2), tokens(5, seed=3)
    runner = HFRunner(model, slots=2)
    runner.extend(0, first)
    runner.extend(1, second)
    step = torch.stack([tokens(3, seed=4), tokens(3, seed=5)])
    logits = runner.step([1, 0], step)
    assert logits.shape == (2, 3, VOCAB) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], fresh_logits(model, second, step[0]))
    torch.testing.assert_close(logits[1], fresh_logits(model, first, step[1]))
    runner.reset(1)
    assert runner.length(1) == 0 and runner.length(0) == 15


def test_misuse_is_refused_with_clear_errors():
    runner = HFRunner(LlamaForCausalLM(tiny_llama_config()).eval(), slots=2)
    with pytest.raises(SpeculorError, match="slot 2 does not exist"):
        runner.length(2)
    with pytest.raises(SpeculorError, match="one row per slot"):
        runner.step([0, 1], torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(SpeculorError, match="lists a slot twice"):
        runner.step([1, 1], torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(SpeculorError, match="slots must be an integer"):
        HFRunner(runner.model, slots=0)


class RememberingNorm(torch.nn.Module):
    """A final norm that adds what it output for the last position of the previous forward: decoding state held on a
    module, outside any cache, as RecurrentGemma holds its convolution and recurrent states."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.memory: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        output = self.norm(hidden)
        if self.memory is not None:
            output = output + self.memory
        self.memory = output[:, -1:]
        return output


def test_a_model_keeping_state_on_its_modules_is_refused():
    model = tiny("llama")
    model.model.norm = RememberingNorm(model.model.norm)
    with pytest.raises(SpeculorError, match=r"keeps decoding state on its own modules \(model\.norm\.memory follows"):
        HFRunner(model)


def test_the_load_probe_leaves_no_trace():
    """The probe decodes at load run in caches of their own: a runner's first prefill is a fresh model's."""
    model = tiny("llama")
    sequence = tokens(9, seed=8)
    expected = model(sequence.view(1, -1)).logits[0, -1].float()
    runner = HFRunner(model)
    runner.extend(0, sequence[:-1])
    torch.testing.assert_close(runner.step([0], sequence[-1:].view(1, -1))[0, 0], expected)
