"""Structured outputs are exact under speculation: the draft proposes under the grammar's mask after each drafted
prefix, the target verifies each position under the mask after the drafts before it, and the output is the target
alone's under the grammar.

Checked against references apart from the engine: a fresh xgrammar matcher stepped one token at a time beside a full
forward of the Hugging Face target per token (greedy identity, float32, drafts partly accepted); every output of 60
generated JSON schemas parses and validates (a small validator here), greedy and sampled, speculating with the
shipped pair; the sampled law against the exact enumeration over a 4-token vocabulary, with a mask taken one draft
too early shown to fail the same test; seeded rows identical to the target alone's sample.
"""

from __future__ import annotations

import itertools
import json
import pickle
import random
import re

import pytest
import torch
import xgrammar
from exact_reference import warped_probabilities
from fakes import TableRunner
from test_sampling_exactness import SAMPLES, chi_square_excess

from speculor import SpeculativeDecoder, SpeculorError, StructuredOutput
from speculor.adaptive import FixedGamma
from speculor.api import run_batch
from speculor.cli import main
from speculor.engine import BatchEngine, DecodeRequest
from speculor.grammar import CompiledStructure, RowGrammars, StructureCompiler
from speculor.models import shipped
from speculor.proposers import DraftModelProposer
from speculor.sampling import SamplingParams

# The float32 pair's 96 ids: ids 0–94 stand for the printable ASCII characters (JSON's among them), 95 ends the text.
CHARACTERS = "".join(chr(code) for code in range(32, 127))
EOS = 95
SMALL_STRUCTURES = [
    StructuredOutput.json_schema(
        {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 999},
                "kind": {"enum": ["ab", "cd", "e"]},
                "name": {"type": "string", "maxLength": 5},
            },
            "required": ["id", "kind", "name"],
        },
        strict=True,
    ),
    StructuredOutput.regex(r"[a-f]{2,4}-[0-9]{2}(x|yz)"),
    StructuredOutput.choice(["alpha", "beta", "gamma", "b"]),
    StructuredOutput.grammar('root ::= item ("," item)*\nitem ::= [a-c] [0-9]? | "(" root ")"'),
    StructuredOutput.json_object(),
]


@pytest.fixture(scope="module")
def char_compiler() -> StructureCompiler:
    return StructureCompiler.for_vocabulary([*CHARACTERS, "<eos>"], [EOS])


@pytest.fixture(scope="module")
def char_decoder(float32_pair):
    target, draft = float32_pair
    decoder = SpeculativeDecoder(target, draft, dtype=torch.float32, max_batch_size=8)
    decoder.eos_ids = frozenset({EOS})
    return decoder


@pytest.fixture(scope="module")
def shipped_decoder():
    family = shipped()
    return SpeculativeDecoder(family.target, family.best_draft, dtype=torch.float32, device="cpu", max_batch_size=16)


@torch.no_grad()
def reference_greedy(model, prompt: list[int], structure: CompiledStructure, max_new_tokens: int) -> list[int]:
    """The target alone under the grammar: a full forward per token, a fresh matcher stepped token by token, the
    mask (with the structure's tokens allowed anywhere) applied by xgrammar's own function, then argmax; an end id
    ends it."""
    grammar = structure.grammar
    matcher = xgrammar.GrammarMatcher(grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)
    generated: list[int] = []
    while len(generated) < max_new_tokens and not matcher.is_terminated():
        logits = model(torch.tensor([[*prompt, *generated]])).logits[0, -1:].float()
        logits = logits[:, : grammar.tokenizer_info.vocab_size].clone()
        matcher.fill_next_token_bitmask(bitmask)
        if structure.allowed_anywhere is not None:
            bitmask &= structure.allowed_anywhere
        xgrammar.apply_token_bitmask_inplace(logits, bitmask)
        token = int(logits.argmax())
        assert matcher.accept_token(token)
        generated.append(token)
    return generated


def prompts(count: int, seed: int, vocab: int = 95) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 10))] for _ in range(count)]


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_rows_under_a_grammar_equal_the_target_alone(char_decoder, char_compiler, float32_pair, gamma):
    target, _ = float32_pair
    compiled = [char_compiler.compile(structure) for structure in SMALL_STRUCTURES]
    cases = prompts(len(compiled) + 1, seed=gamma)
    requests = [
        char_decoder.request(prompt, max_new_tokens=48, gamma=gamma, structured=structure)
        for prompt, structure in zip(cases, compiled, strict=False)
    ]
    plain = char_decoder.request(cases[-1], max_new_tokens=12, gamma=gamma)
    results = run_batch(char_decoder.new_engine(), [*requests, plain])
    for request, structure, result in zip(requests, compiled, results, strict=False):
        expected = reference_greedy(target, request.prompt_ids, structure, 48)
        assert result.token_ids == expected, structure
    assert results[-1].token_ids == char_decoder.generate(cases[-1], max_new_tokens=12, gamma=gamma).token_ids
    drafted = sum(result.stats.drafted for result in results[:-1])
    accepted = sum(result.stats.accepted for result in results[:-1])
    assert 0 < accepted < drafted, "drafts partly accepted"
    text = "".join(CHARACTERS[token] for token in results[0].token_ids[:-1])
    assert set(json.loads(text)) == {"id", "kind", "name"}


def test_greedy_real_text_under_a_schema_equals_the_target_alone(shipped_decoder):
    structure = StructuredOutput.json_schema(
        {
            "type": "object",
            "properties": {
                "function": {"type": "string", "maxLength": 16},
                "arguments": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
                "pure": {"type": "boolean"},
            },
            "required": ["function", "arguments", "pure"],
        },
        strict=True,
    )
    request = shipped_decoder.request("def load(path):\n    ", max_new_tokens=40, gamma=4, structured=structure)
    result = run_batch(shipped_decoder.new_engine(), [request])[0]
    compiled = request.params.structured
    assert result.token_ids == reference_greedy(shipped_decoder.target.model, request.prompt_ids, compiled, 40)
    assert 0 < result.stats.accepted < result.stats.drafted, "drafts partly accepted"
    assert result.text.startswith('{"function": "')


def test_prompt_lookup_drafts_are_verified_under_the_grammar(float32_pair, char_compiler):
    """A proposer that knows no grammar: its drafts may break it, and the target's masks must reject exactly those."""
    target, _ = float32_pair
    lookup = SpeculativeDecoder(target, ngram=1, dtype=torch.float32)
    lookup.eos_ids = frozenset({EOS})
    structure = char_compiler.compile(StructuredOutput.regex("[a-e]{4,12}"))
    prompt = [CHARACTERS.index(character) for character in "abcdeabcdeaxbxcxdx"]
    result = lookup.generate(prompt, max_new_tokens=20, gamma=3, structured=structure)
    assert result.token_ids == reference_greedy(target, prompt, structure, 20)
    assert 0 < result.stats.accepted < result.stats.drafted


# Sixty JSON schemas, generated: nested objects, arrays, enums, patterns, bounded integers, required and optional
# properties. Every leaf is bounded so that every output ends within the token budget.
NAMES = ["id", "name", "kind", "size", "tags", "owner", "items", "color", "flag", "code", "meta", "path"]
PATTERNS = ["^[a-z]{2,5}$", "^[0-9]{3}-[0-9]{2}$", "^(GET|POST)/[a-z]{1,6}$", "^v[0-9]\\.[0-9]$"]


def random_leaf(rng: random.Random) -> dict:
    choice = rng.randrange(6)
    if choice == 0:
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if choice == 1:
        return {"type": "string", "maxLength": rng.randint(1, 10)}
    if choice == 2:
        return {"enum": rng.sample(["red", "green", "blue", "x", "yes", "no", "def", "import"], rng.randint(2, 4))}
    if choice == 3:
        return {"type": "boolean"}
    if choice == 4:
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    return {"type": "array", "items": random_leaf(rng), "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 2)}


def random_object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(NAMES, rng.randint(1, 3))
    properties = {
        name: random_object(rng, depth - 1) if depth and rng.random() < 0.3 else random_leaf(rng) for name in names
    }
    required = [name for name in names if rng.random() < 0.7]
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    if rng.random() < 0.3:
        return {"type": "array", "items": schema, "minItems": 1, "maxItems": 2} if depth < 1 else schema
    return schema


SCHEMAS = [random_object(random.Random(index), depth=1 + index % 2) for index in range(60)]


def validates(value: object, schema: dict) -> bool:
    """Whether a JSON value satisfies the schema, for the keywords the generated schemas use."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        if not isinstance(value, dict) or not set(schema.get("required", ())) <= set(value):
            return False
        if schema.get("additionalProperties") is False and not set(value) <= set(schema["properties"]):
            return False
        return all(validates(value[name], schema["properties"][name]) for name in value if name in schema["properties"])
    if kind == "array":
        if not isinstance(value, list) or not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1e9):
            return False
        return all(validates(item, schema["items"]) for item in value)
    if kind == "integer":
        bounded = schema.get("minimum", -1e18) <= value <= schema.get("maximum", 1e18) if type(value) is int else False
        return bounded
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        if not isinstance(value, str) or len(value) > schema.get("maxLength", 1e9):
            return False
        return "pattern" not in schema or re.search(schema["pattern"], value) is not None
    raise AssertionError(f"the validator does not know {kind!r}")


@pytest.fixture(scope="module")
def wide_char_decoder(float32_pair):
    target, draft = float32_pair
    decoder = SpeculativeDecoder(target, draft, dtype=torch.float32, max_batch_size=len(SCHEMAS))
    decoder.eos_ids = frozenset({EOS})
    return decoder


@pytest.mark.parametrize(
    "sampling",
    [dict(), dict(temperature=0.9, reproducible=False), dict(temperature=1.0, top_p=0.95)],
    ids=["greedy", "sampled", "seeded"],
)
def test_every_output_validates_against_its_schema(wide_char_decoder, char_compiler, sampling):
    """All sixty schemas in one batch, on the float32 pair with one character per token (so a random model writes
    long values and every bound of the schemas is reached)."""
    requests = [
        wide_char_decoder.request(
            prompt,
            max_new_tokens=240,
            gamma=3,
            seed=index if sampling else None,
            structured=char_compiler.compile(StructuredOutput.json_schema(schema, strict=True)),
            **sampling,
        )
        for index, (schema, prompt) in enumerate(zip(SCHEMAS, prompts(len(SCHEMAS), seed=9), strict=True))
    ]
    results = run_batch(wide_char_decoder.new_engine(), requests)
    for schema, result in zip(SCHEMAS, results, strict=True):
        text = "".join(CHARACTERS[token] for token in result.token_ids[:-1])
        assert result.finish_reason == "eos", (schema, text)
        assert validates(json.loads(text), schema), (schema, text)
    assert sum(result.stats.accepted for result in results) > 0


def test_real_text_validates_against_its_schema(shipped_decoder):
    """The shipped pair and tokenizer, multi-character tokens: a few of the schemas, greedy and sampled."""
    schemas = SCHEMAS[:6]
    requests = [
        shipped_decoder.request(
            "def main():\n    config = ",
            max_new_tokens=160,
            gamma=3,
            temperature=0.8 * (index % 2),
            seed=index,
            structured=StructuredOutput.json_schema(schema, strict=True),
        )
        for index, schema in enumerate(schemas)
    ]
    for schema, result in zip(schemas, run_batch(shipped_decoder.new_engine(), requests), strict=True):
        assert result.finish_reason == "eos" and validates(json.loads(result.text), schema), (schema, result.text)


def test_json_object_regex_choice_and_grammar_outputs_match(shipped_decoder):
    cases = [
        (StructuredOutput.regex(r"(add|sub)\([a-z]{1,6}, [0-9]{1,3}\)"), r"(add|sub)\([a-z]{1,6}, [0-9]{1,3}\)"),
        (StructuredOutput.choice(["return None", "pass", "raise"]), r"return None|pass|raise"),
        (
            StructuredOutput.grammar('root ::= "import " [a-z]{1,8} ("." [a-z]{1,8})?'),
            r"import [a-z]{1,8}(\.[a-z]{1,8})?",
        ),
    ]
    for structure, pattern in cases:
        for temperature in (0.0, 1.0):
            result = shipped_decoder.generate(
                "    ", max_new_tokens=40, gamma=3, temperature=temperature, seed=1, structured=structure
            )
            assert re.fullmatch(pattern, result.text) and result.finish_reason == "eos", result.text
    result = shipped_decoder.generate("x = ", max_new_tokens=200, gamma=3, structured=StructuredOutput.json_object())
    assert result.finish_reason == "length" or isinstance(json.loads(result.text), dict)
    assert result.text.startswith("{")


def test_seeded_rows_under_a_grammar_equal_the_target_alones_sample(shipped_decoder):
    structure = StructuredOutput.json_schema(SCHEMAS[3], strict=True)
    options = dict(max_new_tokens=120, temperature=1.0, seed=17, structured=structure)
    alone = shipped_decoder.generate("import json\n", speculative=False, **options).token_ids
    for gamma in (1, 4):
        assert shipped_decoder.generate("import json\n", gamma=gamma, **options).token_ids == alone
    crowd = [shipped_decoder.request("def f(", max_new_tokens=20, gamma=2, temperature=0.8, seed=3)]
    results = run_batch(
        shipped_decoder.new_engine(), [crowd[0], shipped_decoder.request("import json\n", gamma=3, **options)]
    )
    assert results[1].token_ids == alone
    assert validates(json.loads(results[1].text), SCHEMAS[3])


def test_a_finished_grammar_ends_a_row_that_ignores_eos(shipped_decoder):
    result = shipped_decoder.generate(
        "x = ", max_new_tokens=30, gamma=2, ignore_eos=True, structured=StructuredOutput.choice(["True", "False"])
    )
    assert result.text in {"True", "False"} and result.finish_reason == "eos"


def test_a_structure_is_compiled_once_per_tokenizer(shipped_decoder):
    structure = StructuredOutput.json_schema(SCHEMAS[0])
    first = shipped_decoder.request("a", structured=structure).params.structured
    again = shipped_decoder.request("b", structured=StructuredOutput.json_schema(SCHEMAS[0])).params.structured
    assert first is again
    assert shipped_decoder.request("c", structured=StructuredOutput.json_schema(SCHEMAS[0], strict=False)).params != (
        shipped_decoder.request("c", structured=structure).params
    )


def test_a_request_with_a_structure_travels_pickled(shipped_decoder):
    """A tensor-parallel server's rank 0 sends whole requests to the other ranks: the structure is compiled again
    there, once, and decodes the same."""
    request = shipped_decoder.request(
        "x = ", max_new_tokens=30, gamma=2, structured=StructuredOutput.choice(["1", "2"])
    )
    copy, again = pickle.loads(pickle.dumps(request)), pickle.loads(pickle.dumps(request))
    assert copy.params.structured is not request.params.structured
    assert copy.params.structured is again.params.structured
    results = run_batch(shipped_decoder.new_engine(), [request, copy])
    assert results[0].token_ids == results[1].token_ids and results[0].text in {"1", "2"}


def test_generate_command_takes_a_structure(capsys, tmp_path):
    family = shipped()
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS[5]))
    pair = ["generate", "--target", str(family.target), "--draft", str(family.best_draft), "--prompt", "x = "]
    threads = torch.get_num_threads()
    try:
        for structure, check in (
            (["--regex", "[a-f]{2}-[0-9]{2}"], lambda text: re.fullmatch("[a-f]{2}-[0-9]{2}", text)),
            (["--json-schema", str(schema_file)], lambda text: validates(json.loads(text), SCHEMAS[5])),
            (["--choice", "on", "--choice", "off"], lambda text: text in {"on", "off"}),
        ):
            assert main([*pair, *structure, "--max-new-tokens", "120", "--json"]) == 0
            report = json.loads(capsys.readouterr().out)
            assert report["finish_reason"] == "eos" and check(report["text"]), report["text"]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("structure", "message"),
    [
        (lambda: StructuredOutput.json_schema({"type": "objekt"}), "JSON schema .*objekt"),
        (lambda: StructuredOutput.json_schema("{not json"), "not valid JSON"),
        (lambda: StructuredOutput.regex("[a-"), "regex .*'\\['"),
        (lambda: StructuredOutput.grammar("root ::= missing"), "grammar .*missing"),
        (lambda: StructuredOutput.choice([]), "choice"),
    ],
)
def test_an_invalid_structure_is_refused_naming_the_problem(shipped_decoder, structure, message):
    with pytest.raises(SpeculorError, match=message):
        shipped_decoder.request("a", structured=structure())


def test_min_tokens_beside_a_structure_is_refused(shipped_decoder):
    with pytest.raises(SpeculorError, match="min_tokens"):
        shipped_decoder.request("a", structured=StructuredOutput.choice(["x"]), min_tokens=3)


# The sampled law: a 4-token vocabulary whose tokens stand for "a".."d", under a grammar whose mask at a position
# depends on the token before it (after a pair's first letter only its two successors may follow).
VOCAB = 4
PROMPT = [1, 2]
SAMPLED_TOKENS = 4
PAIRS = 'root ::= ("a" [bc] | "b" [cd] | "c" [da] | "d" [ab])*'
SUCCESSORS = {0: (1, 2), 1: (2, 3), 2: (3, 0), 3: (0, 1)}


def allowed_after(generated: tuple[int, ...]) -> tuple[int, ...]:
    """The reference mask, written out by hand: any letter starts a pair, then one of its two successors."""
    return tuple(range(VOCAB)) if len(generated) % 2 == 0 else SUCCESSORS[generated[-1]]


def exact_law(params: SamplingParams) -> dict[tuple[int, ...], float]:
    target = TableRunner(VOCAB, seed=0)
    law = {}
    for outcome in itertools.product(range(VOCAB), repeat=SAMPLED_TOKENS):
        probability = 1.0
        for index, token in enumerate(outcome):
            logits = target.logits_after(PROMPT + list(outcome[:index])).clone()
            forbidden = [t for t in range(VOCAB) if t not in allowed_after(outcome[:index])]
            logits[forbidden] = float("-inf")
            probability *= float(warped_probabilities(logits, params)[token])
        law[outcome] = probability
    return law


def empirical_law(params: SamplingParams, gamma: int) -> dict[tuple[int, ...], float]:
    rows = 8
    target = TableRunner(VOCAB, seed=0, slots=rows)
    draft = TableRunner(VOCAB, seed=1, sharpness=2.5, slots=rows)
    engine = BatchEngine(target, DraftModelProposer(draft, VOCAB), VOCAB, None)
    requests = [
        DecodeRequest(PROMPT, SAMPLED_TOKENS, params, FixedGamma(gamma), frozenset(), seed=seed)
        for seed in range(SAMPLES)
    ]
    counts: dict[tuple[int, ...], int] = {}
    for result in run_batch(engine, requests):
        outcome = tuple(result.token_ids) if result.finish_reason == "length" else ("error",)
        counts[outcome] = counts.get(outcome, 0) + 1
    return {outcome: count / SAMPLES for outcome, count in counts.items()}


@pytest.fixture(scope="module")
def pairs_params() -> SamplingParams:
    compiled = StructureCompiler.for_vocabulary(["a", "b", "c", "d"], []).compile(StructuredOutput.grammar(PAIRS))
    return SamplingParams(temperature=1.0, structured=compiled)


@pytest.mark.parametrize("gamma", [2, 3])
def test_sampled_rows_under_a_grammar_follow_the_target_alones_law(pairs_params, gamma):
    empirical = empirical_law(pairs_params, gamma)
    assert set(empirical) <= {o for o, p in exact_law(pairs_params).items() if p > 0}
    assert chi_square_excess(exact_law(pairs_params), empirical) < 0


def test_a_mask_taken_one_draft_too_early_is_caught(pairs_params, monkeypatch):
    """Wrong on purpose: position j is masked with the state after j − 1 drafted tokens (the first position with
    the committed state), the off-by-one of a verifier that pairs each mask with the wrong draft."""
    original = RowGrammars.mask

    def early(self, logits, drafted, offset=0):
        for position in range(logits.shape[1]):
            prefix = max(offset + position - 1, 0)
            original(self, logits[:, position : position + 1], drafted, prefix)

    monkeypatch.setattr(RowGrammars, "mask", early)
    assert chi_square_excess(exact_law(pairs_params), empirical_law(pairs_params, 3)) > 0
