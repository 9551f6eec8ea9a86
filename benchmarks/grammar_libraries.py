"""xgrammar against llguidance on the host work structured outputs repeat: compiling a JSON schema (once per schema,
cached by speculor.grammar) and, per generated token, advancing the matcher by the token and computing the next
token mask (at every drafted and verified position of every step). The measurement behind speculor.grammar's choice.

    pip install llguidance                        # not a dependency of speculor; xgrammar is
    python benchmarks/grammar_libraries.py        # the shipped tokenizer (8,192 tokens)
    python benchmarks/grammar_libraries.py --tokenizer PATH --repeats 10

Each schema's output is a valid instance written compactly (", " and ": " separators, as speculor.grammar compiles
schemas), tokenized by the tokenizer; both libraries walk the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from transformers import AutoTokenizer

from speculor.models import shipped

SEPARATORS = (", ", ": ")
CASES = [
    (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    (
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"id": {"type": "integer"}, "tag": {"enum": ["red", "green", "blue"]}},
                        "required": ["id", "tag"],
                    },
                }
            },
            "required": ["items"],
        },
        {"items": [{"id": 1, "tag": "red"}, {"id": 22, "tag": "blue"}, {"id": 333, "tag": "green"}]},
    ),
    (
        {
            "type": "object",
            "properties": {
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "city": {"type": "string", "maxLength": 20},
                "ok": {"type": "boolean"},
            },
            "required": ["zip", "city", "ok"],
        },
        {"zip": "12345", "city": "Springfield", "ok": True},
    ),
    (
        {
            "type": "object",
            "properties": {
                "a": {
                    "type": "object",
                    "properties": {
                        "b": {
                            "type": "object",
                            "properties": {
                                "c": {"type": "number"},
                                "d": {"type": "array", "items": {"type": "string"}},
                            },
                            "required": ["c", "d"],
                        }
                    },
                    "required": ["b"],
                }
            },
            "required": ["a"],
        },
        {"a": {"b": {"c": 3.25, "d": ["x", "yy", "zzz"]}}},
    ),
    (
        {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            },
            "required": ["title", "rating"],
        },
        {"title": "def main(): pass", "rating": 4, "tags": ["python", "code"]},
    ),
]


def llguidance_walk(tokenizer, schema: dict, tokens: list[int]) -> tuple[float, list[float]]:
    """(seconds to compile and give the first mask, seconds per token to consume it and give the next mask)."""
    import llguidance
    import llguidance.torch

    began = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
    )
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    bitmask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)
    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
    compiled = time.perf_counter() - began
    steps = []
    for token in tokens:
        began = time.perf_counter()
        if not matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        steps.append(time.perf_counter() - began)
    return compiled, steps


def xgrammar_walk(info, schema: dict, tokens: list[int]) -> tuple[float, list[float]]:
    import xgrammar

    began = time.perf_counter()
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled_grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
    matcher = xgrammar.GrammarMatcher(compiled_grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    compiled = time.perf_counter() - began
    steps = []
    for token in tokens:
        began = time.perf_counter()
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")
        matcher.fill_next_token_bitmask(bitmask, 0)
        steps.append(time.perf_counter() - began)
    return compiled, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (default: the shipped target's)")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    import llguidance.hf
    import xgrammar

    hf_tokenizer = AutoTokenizer.from_pretrained(options.tokenizer or shipped().target)
    vocab_size = len(hf_tokenizer)
    walks = {
        "llguidance": (llguidance_walk, llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)),
        "xgrammar": (xgrammar_walk, xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)),
    }
    for name, (walk, tokenizer) in walks.items():
        compiles, steps = [], []
        for schema, instance in CASES:
            tokens = hf_tokenizer.encode(json.dumps(instance, separators=SEPARATORS), add_special_tokens=False)
            for _ in range(options.repeats):
                compiled, per_token = walk(tokenizer, schema, tokens)
                compiles.append(compiled)
                steps += per_token
        print(
            f"{name}: compile + first mask median {1e3 * statistics.median(compiles):.2f} ms "
            f"(max {1e3 * max(compiles):.2f}); consume + next mask mean {1e6 * statistics.mean(steps):.1f} µs, "
            f"median {1e6 * statistics.median(steps):.1f} µs over {len(steps)} tokens ({vocab_size}-token vocabulary)"
        )


if __name__ == "__main__":
    main()
