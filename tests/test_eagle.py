"""EAGLE-3 heads: target feature capture, the hub checkpoint layout, and exact speculative decoding with a head.

The targets are tiny random Llamas (weights initialised at 0.2, so their greedy output is not one token repeated)
in float64 where outputs are compared, so no argmax near-tie can flip. A head whose drafts are partly accepted comes
from a few dozen training steps (`speculor.train_eagle.unrolled_loss`) on the target's own features.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import build, tiny_llama_config
from exact_reference import warped_probabilities
from test_sampling_exactness import NEW_TOKENS, PROMPT, SAMPLES, chi_square_excess
from transformers import LlamaForCausalLM

from speculor import SpeculativeDecoder
from speculor.adaptive import FixedGamma
from speculor.api import run_batch
from speculor.eagle import Eagle3Proposer, head_for_target, load_eagle3, save_eagle3
from speculor.engine import BatchEngine, DecodeRequest
from speculor.errors import SpeculorError
from speculor.runners import FastRunner, HFRunner
from speculor.sampling import SamplingParams
from speculor.train_eagle import start_from_target, target_pass, unrolled_loss

VOCAB = 64
LAYERS = (2, 2, 1)
RUNNERS = (HFRunner, FastRunner)


def random_target(vocab: int = VOCAB, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    return build(LlamaForCausalLM, tiny_llama_config(vocab, layers=4, initializer_range=0.2), seed=0, dtype=dtype)


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    return random_target()


@pytest.fixture(scope="module")
def trained_head(target):
    """A head over the even token ids plus a few odd ones (a draft vocabulary smaller than the target's), trained
    for 60 steps on the target's features over its own greedy text, so its drafts are partly accepted."""
    torch.manual_seed(0)
    ids = sorted(set(range(0, VOCAB, 2)) | {1, 3, 5})
    head = head_for_target(target, ids, LAYERS)
    start_from_target(head, target, ids)
    windows = torch.randint(0, VOCAB, (8, 8))
    with torch.no_grad():
        windows = target.generate(windows, max_new_tokens=40, do_sample=True, top_k=4, pad_token_id=0)
    draft_ids = torch.tensor(ids)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(60):
        features, teacher, _ = target_pass(target, windows, LAYERS, draft_ids)
        loss, _ = unrolled_loss(head, windows, features, teacher, steps=3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return head.eval()


def greedy(prompt: list[int], new_tokens: int, gamma: int | None) -> DecodeRequest:
    policy = FixedGamma(gamma) if gamma else None
    return DecodeRequest(prompt, new_tokens, SamplingParams(), policy, frozenset(), speculative=gamma is not None)


PROMPTS = [[5, 9, 2, 33, 17], [40, 1], [7, 7, 3, 60, 12, 8, 21]]


def target_alone(target, requests: list[DecodeRequest]) -> list[list[int]]:
    engine = BatchEngine(HFRunner(target, slots=len(requests)), None, VOCAB, None)
    return [result.token_ids for result in run_batch(engine, requests)]


def with_head(runner_class, target, head, requests: list[DecodeRequest]):
    runner = runner_class(target, slots=len(requests))
    engine = BatchEngine(runner, Eagle3Proposer(head, LAYERS, runner, VOCAB), VOCAB, None)
    return run_batch(engine, requests)


@pytest.mark.parametrize("runner_class", RUNNERS)
def test_captured_features_are_the_models_hidden_states(target, runner_class):
    """Prefill chunks (one row, two rows of different lengths) and a multi-token step hand over, for every fed
    position, exactly the hidden states transformers reports entering the chosen layers."""
    runner = runner_class(target, slots=2)
    received: dict[int, dict[int, torch.Tensor]] = {0: {}, 1: {}}

    def sink(slots, starts, features):
        for row, (slot, start) in enumerate(zip(slots, starts, strict=True)):
            for offset in range(features.shape[1]):
                received[slot][start + offset] = features[row, offset].clone()

    runner.capture_features(LAYERS, sink)
    sequences = {0: [3, 14, 15, 9, 26, 5, 35, 8], 1: [2, 7, 18, 28, 18, 4, 59, 45]}
    runner.extend(0, torch.tensor(sequences[0][:2]))
    runner.extend_rows([0, 1], [torch.tensor(sequences[0][2:5]), torch.tensor(sequences[1][:2])])
    runner.step([1, 0], torch.tensor([sequences[1][2:5], sequences[0][5:8]]))
    for slot, tokens in sequences.items():
        fed = 5 if slot == 1 else 8
        with torch.no_grad():
            hidden = target(input_ids=torch.tensor([tokens[:fed]]), output_hidden_states=True).hidden_states
        expected = torch.cat([hidden[layer][0] for layer in LAYERS], dim=-1)
        got = torch.stack([received[slot][position] for position in range(fed)])
        # The fast runner's rotary tables are float32 (as transformers computes its angles) but built in one
        # product instead of per call: float64 activations then agree to about 1e-6, the HF runner's to rounding
        # (a chunked forward against a whole one).
        tolerance = 1e-12 if runner_class is HFRunner else 1e-5
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_no_features_are_captured_without_a_head(target):
    """A runner nobody asked passes no feature buffer to its forwards (zero cost for AR and separate drafts)."""
    runner = FastRunner(target, slots=1)
    runner.extend(0, torch.tensor([1, 2, 3]))
    runner.step([0], torch.tensor([[4, 5]]))
    assert runner._tap(4) is None and runner._features_buffer is None


def write_hub_checkpoint(directory, target, draft_ids, *, hidden=None, vocab=None, with_embeddings=False):
    """A head written the way the peers write one: config.json with `LlamaForCausalLMEagle3`, draft_vocab_size and
    eagle_config, model.safetensors with bfloat16 weights under the hub names, d2t int64 and t2d bool."""
    from safetensors.torch import save_file

    text = target.config
    hidden = hidden or text.hidden_size
    vocab = vocab or text.vocab_size
    # A head made for another target reads that target's width (here: its own).
    heads, kv_heads, head_dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    draft_vocab = len(draft_ids)
    generator = torch.Generator().manual_seed(3)

    def weight(*shape):
        return (torch.randn(*shape, generator=generator) * 0.2).to(torch.bfloat16)

    tensors = {
        "fc.weight": weight(hidden, 3 * hidden),
        "midlayer.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "midlayer.hidden_norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "midlayer.self_attn.q_proj.weight": weight(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": weight(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": weight(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": weight(hidden, heads * head_dim),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "midlayer.mlp.gate_proj.weight": weight(text.intermediate_size, hidden),
        "midlayer.mlp.up_proj.weight": weight(text.intermediate_size, hidden),
        "midlayer.mlp.down_proj.weight": weight(hidden, text.intermediate_size),
        "norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": weight(draft_vocab, hidden),
        "d2t": torch.tensor(draft_ids) - torch.arange(draft_vocab),
        "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, torch.tensor(draft_ids), True),
    }
    if with_embeddings:
        tensors["embed_tokens.weight"] = weight(vocab, hidden)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "vocab_size": vocab,
        "draft_vocab_size": draft_vocab,
        "target_hidden_size": hidden,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(LAYERS), "use_aux_hidden_state": True},
    }
    (directory / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.mark.parametrize("with_embeddings", [False, True])
def test_hub_layout_loads(tmp_path, target, with_embeddings):
    draft_ids = [0, 2, 5, 6, 11, 40, 63]
    written = write_hub_checkpoint(tmp_path, target, draft_ids, with_embeddings=with_embeddings)
    head, layers = load_eagle3(tmp_path, target)
    assert layers == LAYERS
    assert head.config.draft_vocab_size == len(draft_ids) < VOCAB
    assert head.draft_to_target.tolist() == draft_ids
    assert head.t2d.dtype == torch.bool and int(head.t2d.sum()) == len(draft_ids)
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(tensor.cpu(), written[name].to(tensor.dtype))
    expected_embedding = written["embed_tokens.weight"] if with_embeddings else target.get_input_embeddings().weight
    torch.testing.assert_close(head.embedding, expected_embedding.to(head.embedding.dtype))
    assert head.lm_head.weight.dtype == torch.float64


def test_saved_head_round_trips_and_drafts_only_its_vocabulary(tmp_path, target, trained_head):
    """A head saved and loaded back drafts the same; its q lives on its draft vocabulary only, summing to one."""
    save_eagle3(trained_head, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] < VOCAB
    head, layers = load_eagle3(tmp_path, target)
    assert layers == LAYERS
    runner = HFRunner(target, slots=1)
    proposer = Eagle3Proposer(head, layers, runner, VOCAB)
    proposals = []
    propose = proposer.propose

    def recording(*arguments):
        proposals.append(propose(*arguments))
        return proposals[-1]

    proposer.propose = recording
    request = DecodeRequest(PROMPTS[0], 16, SamplingParams(temperature=1.0), FixedGamma(3), frozenset(), seed=1)
    run_batch(BatchEngine(runner, proposer, VOCAB, None), [request])
    assert proposals
    for proposal in proposals:
        assert float(proposal.probs[..., ~head.t2d].abs().max()) == 0.0
        torch.testing.assert_close(proposal.probs.sum(-1), torch.ones_like(proposal.probs.sum(-1)))


@pytest.mark.parametrize(
    ("change", "message"),
    [({"hidden": 48}, "hidden size is 32"), ({"vocab": 80}, "vocabulary of 80 tokens, but the target has 64")],
)
def test_mismatched_checkpoint_is_refused(tmp_path, target, change, message):
    write_hub_checkpoint(tmp_path, target, [0, 1, 2], with_embeddings="hidden" in change, **change)
    with pytest.raises(SpeculorError, match=message):
        load_eagle3(tmp_path, target)


def test_draft_directory_is_detected_everywhere_a_draft_goes(tmp_path, target, trained_head):
    """`SpeculativeDecoder(target, head_dir)` (the path generate, bench and serve take) drafts with the head, and
    greedy output is the target's own."""
    target_dir, head_dir = tmp_path / "target", tmp_path / "head"
    random_target(dtype=torch.float32).save_pretrained(target_dir)
    save_eagle3(trained_head, head_dir)
    decoder = SpeculativeDecoder(target_dir, head_dir, device="cpu", dtype="float64", threads=None)
    assert isinstance(decoder._proposer(), Eagle3Proposer) and decoder.speculative
    result = decoder.generate(PROMPTS[0], max_new_tokens=24, gamma=3)
    alone = decoder.generate(PROMPTS[0], max_new_tokens=24, speculative=False)
    assert result.token_ids == alone.token_ids
    assert result.stats.drafted > 0


@pytest.mark.parametrize("runner_class", RUNNERS)
def test_greedy_output_is_the_targets_with_rows_of_different_gamma(target, trained_head, runner_class):
    gammas = (1, 3, 5)
    alone = target_alone(target, [greedy(prompt, 40, None) for prompt in PROMPTS])
    results = with_head(
        runner_class, target, trained_head, [greedy(p, 40, g) for p, g in zip(PROMPTS, gammas, strict=True)]
    )
    assert [result.token_ids for result in results] == alone
    assert all(len(set(tokens)) > 3 for tokens in alone)
    accepted = sum(result.stats.accepted for result in results)
    drafted = sum(result.stats.drafted for result in results)
    assert 0 < accepted < drafted


class Alternating:
    """A γ policy that drafts nothing for some steps, then several, so the head catches up after γ = 0 phases."""

    def __init__(self, pattern: list[int]) -> None:
        self.steps = itertools.cycle(pattern)

    def next_gamma(self) -> int:
        return next(self.steps)

    def observe(self, drafted: int, accepted: int) -> None:
        """Follows its pattern whatever happens."""

    @property
    def confidence_threshold(self) -> float | None:
        return None


@pytest.mark.parametrize("runner_class", RUNNERS)
def test_rollback_across_rejections_and_gamma_zero_phases(target, trained_head, runner_class):
    requests = [
        DecodeRequest(prompt, 48, SamplingParams(), Alternating(pattern), frozenset())
        for prompt, pattern in zip(PROMPTS, ([0, 0, 3, 0, 4, 4], [2, 0, 0, 0, 5], [4, 1, 0, 3]), strict=True)
    ]
    results = with_head(runner_class, target, trained_head, requests)
    assert [result.token_ids for result in results] == target_alone(target, [greedy(p, 48, None) for p in PROMPTS])
    assert all(0 in result.stats.gamma_steps for result in results)
    accepted = sum(result.stats.accepted for result in results)
    assert 0 < accepted < sum(result.stats.drafted for result in results)


def test_seeded_rows_reproduce_with_a_head(target, trained_head):
    """A seeded row's tokens are its seed's alone (coupling): the same with the head as with the target alone, and
    the same alone as in a batch with other rows."""

    def request(seed: int, temperature: float) -> DecodeRequest:
        params = SamplingParams(temperature=temperature, top_k=8)
        return DecodeRequest(PROMPTS[0], 24, params, FixedGamma(3), frozenset(), seed=seed, reproducible=True)

    crowd = [request(seed, temperature) for seed, temperature in ((1, 0.7), (2, 1.2), (42, 0.9))]
    with_draft = [result.token_ids for result in with_head(FastRunner, target, trained_head, crowd)]
    alone = [result.token_ids for result in with_head(FastRunner, target, trained_head, [crowd[2]])]
    plain = target_alone(target, crowd)
    assert with_draft == plain
    assert alone[0] == with_draft[2]


def test_sampled_output_follows_the_targets_distribution():
    """The distribution test of tests/test_sampling_exactness.py with a head as the draft (its q over a draft
    vocabulary of 3 of the 4 tokens): the engine's 3-token outputs match the target's law, enumerated exactly."""
    vocab, layers = 4, (2, 2, 1)
    target = random_target(vocab)
    torch.manual_seed(5)
    head = head_for_target(target, [0, 1, 3], layers)
    params = SamplingParams(temperature=1.0)
    exact = {}
    for outcome in itertools.product(range(vocab), repeat=NEW_TOKENS):
        probability, context = 1.0, list(PROMPT)
        for token in outcome:
            with torch.no_grad():
                logits = target(input_ids=torch.tensor([context])).logits[0, -1]
            probability *= float(warped_probabilities(logits, params)[token])
            context.append(token)
        exact[outcome] = probability
    runner = FastRunner(target, slots=8)
    engine = BatchEngine(runner, Eagle3Proposer(head, layers, runner, vocab), vocab, None)
    requests = [
        DecodeRequest(PROMPT, NEW_TOKENS, params, FixedGamma(2), frozenset(), seed=seed) for seed in range(SAMPLES)
    ]
    counts: dict[tuple[int, ...], int] = {}
    results = run_batch(engine, requests)
    for result in results:
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
    assert sum(result.stats.drafted for result in results) > 0
    assert chi_square_excess(exact, {outcome: count / SAMPLES for outcome, count in counts.items()}) < 0


def test_logits_processors_under_a_head_keep_greedy_and_seeded_rows_the_targets(target, trained_head):
    """Penalties, bias and banned words, applied to the head's q with each drafted prefix's state: greedy rows and
    seeded rows stay the target alone's with the same options."""
    options = [
        SamplingParams(repetition_penalty=1.6, bad_words=((7, 3),)),
        SamplingParams(frequency_penalty=1.0, logit_bias=((5, 2.0),)),
        SamplingParams(temperature=0.9, presence_penalty=1.0, min_p=0.05),
    ]
    requests = [
        DecodeRequest(prompt, 24, params, FixedGamma(3), frozenset(), seed=7, reproducible=True)
        for prompt, params in zip(PROMPTS, options, strict=True)
    ]
    results = with_head(FastRunner, target, trained_head, requests)
    assert [result.token_ids for result in results] == target_alone(target, requests)
    assert sum(result.stats.accepted for result in results) > 0
