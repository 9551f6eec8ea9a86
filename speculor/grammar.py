"""Structured outputs: JSON object mode, JSON schema, regex, a choice list and EBNF grammars, as a token mask that
is exact under speculation.

A grammar is one more logits processor (`speculor.processors.RowProcessors`): at every position it sets the logits
of the tokens the grammar forbids after the row's tokens so far to −inf. Under speculation the state at drafted
position i is the grammar's state after the committed tokens *and the drafts before i*, so each row keeps one
matcher (`GrammarRow`) that advances through the drafts as the draft model proposes them (each draft is drawn from
masked logits, so drafts are always valid) and gives the verifier the γ + 1 masks after each drafted prefix (those
the draft already asked for are kept, only the last is new). When the step's tokens are committed, the matcher
rolls back the drafts that were rejected and consumes what was emitted — a rollback, not a rebuild from the whole
output, so a row's cost per step does not grow with its length. The masks depend on the drafted tokens, so a row
with a grammar reads its drafts on the host once per drafted position and once for the verify; rows without a
grammar read nothing, and batches where no row has any processor never reach this module.

The end ids (the model's EOS ids, or the tokenizer's where the model names none) are the grammar's stop tokens:
allowed exactly where the grammar accepts the output as complete, and once the grammar can take nothing more they
are all that is left; they end the row (even a row that ignores EOS), so a finished grammar ends it.

The library is xgrammar rather than llguidance, chosen on speed measured on the CPU
(`benchmarks/grammar_libraries.py`: 2 shared cores, the shipped 8,192-token tokenizer, 5 JSON schemas with nested
objects, arrays, enums, patterns and bounds, 685 tokens of valid output, 5 repeats): advancing the matcher one token
and computing the next mask took 3.0 µs on average with xgrammar 0.2.9 (median 1.8) against 19 µs with llguidance
1.9.1 (median 12); compiling a schema took 1.6 ms (median) against 0.6 ms. The per-token cost recurs at every drafted
and verified position of every step, the compile happens once per schema (cached here), so xgrammar's is the cost
that matters. xgrammar is imported only when a grammar is compiled: its import (about 0.6 s after torch) would
otherwise slow every use of speculor that needs no grammar.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy
import torch

from speculor.errors import SpeculorError

if TYPE_CHECKING:
    import xgrammar
    from transformers import PreTrainedTokenizerBase

StructureKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
# JSON is generated compactly on one line, with the separators Python's json.dumps writes: free whitespace would let
# a model spend its whole budget on blank lines inside an object.
JSON_SEPARATORS = (", ", ": ")
# Compiled grammars kept per tokenizer (least recently used dropped first).
CACHED_GRAMMARS = 512
BITS = 32
# The time and C++ source location xgrammar puts before its error messages ("[20:54:25] /project/cpp/x.cc:94: ").
LIBRARY_LOCATION = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


@dataclass(frozen=True)
class StructuredOutput:
    """What a row's output must be, as the request gave it (hashable, so it keys the compile cache).

    `kind` "json_object": any JSON object; "json_schema": `source` is the schema as JSON text, and `strict` (the
    default, as vLLM compiles schemas) forbids properties the schema does not name unless it allows them explicitly;
    `strict=False` allows them wherever the schema leaves `additionalProperties` open, JSON Schema's own default,
    which lets a model add properties without end;
    "regex": `source` is the pattern the whole output matches; "choice": `source` is a JSON list of the strings the
    output may be; "grammar": `source` is an EBNF grammar (GBNF, as llama.cpp and vLLM's xgrammar backend take it)
    whose start rule is `root`. Build one with the class methods."""

    kind: StructureKind
    source: str = ""
    strict: bool = True

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str, strict: bool = True) -> StructuredOutput:
        """A JSON schema (a mapping or its JSON text). Its properties are generated in the order it names them."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise SpeculorError(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, Mapping):
            raise SpeculorError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema), bool(strict))

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        if not isinstance(pattern, str) or not pattern:
            raise SpeculorError(f"a regex must be a non-empty string, got {pattern!r}")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredOutput:
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise SpeculorError(f"a choice must be a non-empty list of non-empty strings, got {options!r}")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, ebnf: str) -> StructuredOutput:
        if not isinstance(ebnf, str) or not ebnf.strip():
            raise SpeculorError(f"a grammar must be a non-empty EBNF string, got {ebnf!r}")
        return cls("grammar", ebnf)


class CompiledStructure:
    """A structure compiled for one tokenizer and vocabulary; `new_row()` starts a matcher for one generation.
    Compared by identity: the compiler hands out one object per (structure, tokenizer), so sampling parameters
    holding it compare equal exactly when they name the same structure. `end_ids` are the grammar's stop tokens,
    which end the row. `allowed_anywhere` (a bitmask, None: every token) is ANDed into each of the grammar's masks:
    JSON structures forbid the tokens holding a control character, which compact JSON never contains raw, though
    xgrammar 0.2.9's strings with a maxLength admit them (its rule for their characters omits the exclusion its
    other strings have), and a strict JSON reader would refuse the answer."""

    def __init__(
        self,
        structure: StructuredOutput,
        grammar: xgrammar.CompiledGrammar,
        vocab_size: int,
        end_ids: frozenset[int],
        allowed_anywhere: torch.Tensor | None,
        compiler: StructureCompiler,
    ) -> None:
        self.structure = structure
        self.grammar = grammar
        self.vocab_size = vocab_size
        self.end_ids = end_ids
        self.allowed_anywhere = allowed_anywhere
        self._compiler = compiler

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as the structure and its compiler's tokenizer description, and compiled again where it is
        unpickled (a tensor-parallel server's rank 0 sends whole requests to the other ranks)."""
        return (_compiled_from_portable, (self._compiler.portable(), self.structure))

    def new_row(self) -> GrammarRow:
        return GrammarRow(self)

    def __repr__(self) -> str:
        return f"CompiledStructure({self.structure!r})"


class StructureCompiler:
    """Compiles structures for one tokenizer, each once (cached). The end ids are the grammar's stop tokens."""

    def __init__(self, tokenizer_info: xgrammar.TokenizerInfo, vocab_size: int, end_ids: frozenset[int]) -> None:
        import xgrammar

        self.vocab_size = vocab_size
        self.end_ids = end_ids
        self._tokenizer_info = tokenizer_info
        self._json_tokens: torch.Tensor | None = None
        self._portable: tuple[bytes, int, frozenset[int]] | None = None
        self._compiler = xgrammar.GrammarCompiler(tokenizer_info, max_threads=1)
        self._cache: OrderedDict[StructuredOutput, CompiledStructure] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_vocabulary(cls, tokens: Sequence[str], end_ids: Sequence[int]) -> StructureCompiler:
        """A compiler over a plain vocabulary (token i is the text `tokens[i]`), for tests and tokenizer-less
        models whose ids stand for known strings."""
        import xgrammar

        info = xgrammar.TokenizerInfo(list(tokens), vocab_size=len(tokens), stop_token_ids=sorted(end_ids))
        return cls(info, len(tokens), frozenset(end_ids))

    def compile(self, structure: StructuredOutput) -> CompiledStructure:
        """The compiled structure, from the cache when it was compiled before. Raises `SpeculorError` naming what is
        wrong with a schema, pattern or grammar the library cannot compile."""
        with self._lock:
            cached = self._cache.get(structure)
            if cached is not None:
                self._cache.move_to_end(structure)
                return cached
        allowed = self._json_safe_tokens() if structure.kind in ("json_object", "json_schema") else None
        compiled = CompiledStructure(structure, self._compile(structure), self.vocab_size, self.end_ids, allowed, self)
        with self._lock:
            compiled = self._cache.setdefault(structure, compiled)
            while len(self._cache) > CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def portable(self) -> tuple[bytes, int, frozenset[int]]:
        """What rebuilds this compiler in another process: its tokenizer description (xgrammar's JSON, compressed,
        made once), vocabulary size and end ids."""
        if self._portable is None:
            description = zlib.compress(self._tokenizer_info.serialize_json().encode())
            self._portable = (description, self.vocab_size, self.end_ids)
        return self._portable

    def _json_safe_tokens(self) -> torch.Tensor:
        """The bitmask of the tokens without a control character (bytes 0–31), computed once per tokenizer."""
        if self._json_tokens is None:
            words = (self.vocab_size + BITS - 1) // BITS
            safe = numpy.ones(words * BITS, dtype=bool)
            for token, piece in enumerate(self._tokenizer_info.decoded_vocab[: self.vocab_size]):
                safe[token] = not any(byte < 0x20 for byte in bytes(piece))
            self._json_tokens = torch.from_numpy(numpy.packbits(safe, bitorder="little").view(numpy.int32).copy())
        return self._json_tokens

    def _compile(self, structure: StructuredOutput) -> xgrammar.CompiledGrammar:
        compiler = self._compiler
        what = {
            "json_object": "the JSON object grammar",
            "json_schema": "the JSON schema",
            "regex": "the regex",
            "choice": "the choice list",
            "grammar": "the grammar",
        }[structure.kind]
        try:
            if structure.kind == "json_object":
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=False
                )
            if structure.kind == "json_schema":
                return compiler.compile_json_schema(
                    structure.source, any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=structure.strict
                )
            if structure.kind == "regex":
                return compiler.compile_regex(structure.source)
            if structure.kind == "choice":
                options = json.loads(structure.source)
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
            return compiler.compile_grammar(structure.source)
        except Exception as error:  # xgrammar reports a bad input as RuntimeError, ValueError or its own errors
            lines = str(error).strip().splitlines()
            problem = LIBRARY_LOCATION.sub("", lines[-1]) if lines else type(error).__name__
            raise SpeculorError(f"{what} cannot be compiled: {problem}") from None


_compilers: weakref.WeakKeyDictionary[Any, dict[tuple[int, frozenset[int]], StructureCompiler]] = (
    weakref.WeakKeyDictionary()
)
_compilers_lock = threading.Lock()


def structure_compiler(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, end_ids: frozenset[int]
) -> StructureCompiler:
    """The compiler for a Hugging Face tokenizer, shared by every decoder that uses the same tokenizer object (so a
    schema is compiled once per tokenizer, not once per decoder). The grammar ends on the model's end ids, or on
    the tokenizer's EOS where the model names none."""
    import xgrammar

    stop = frozenset(end_ids)
    if not stop and tokenizer.eos_token_id is not None:
        stop = frozenset({tokenizer.eos_token_id})
    if not stop:
        raise SpeculorError(
            "structured outputs need an end-of-text token, and neither the model nor its tokenizer has one"
        )
    with _compilers_lock:
        per_tokenizer = _compilers.setdefault(tokenizer, {})
        key = (vocab_size, stop)
        if key not in per_tokenizer:
            info = xgrammar.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop)
            )
            per_tokenizer[key] = StructureCompiler(info, vocab_size, stop)
        return per_tokenizer[key]


_portable_compilers: dict[tuple[bytes, int, frozenset[int]], StructureCompiler] = {}


def _compiled_from_portable(
    portable: tuple[bytes, int, frozenset[int]], structure: StructuredOutput
) -> CompiledStructure:
    """Unpickling a `CompiledStructure`: the compiler rebuilt from its description once per process, then the
    structure compiled (cached like any other)."""
    import xgrammar

    with _compilers_lock:
        compiler = _portable_compilers.get(portable)
        if compiler is None:
            description, vocab_size, end_ids = portable
            info = xgrammar.TokenizerInfo.deserialize_json(zlib.decompress(description).decode())
            compiler = _portable_compilers[portable] = StructureCompiler(info, vocab_size, end_ids)
    return compiler.compile(structure)


class GrammarRow:
    """One generation's grammar state: a matcher at the row's committed tokens, advanced through this step's drafts.

    `_ahead` are the drafted tokens the matcher consumed past the committed ones, `_masks[k]` the bitmask after the
    committed tokens and `_ahead[:k]` once computed (the draft asks for them in order; the verifier asks again, and
    only the mask after the last draft is new)."""

    def __init__(self, compiled: CompiledStructure) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled.grammar)
        self._allowed_anywhere = compiled.allowed_anywhere
        self.words = (compiled.vocab_size + BITS - 1) // BITS
        self._committed = 0
        self._ahead: list[int] = []
        self._masks: dict[int, torch.Tensor] = {}

    def commit(self, output: Sequence[int]) -> None:
        """Move to the row's committed output: the drafts that were accepted stay consumed, the rest are rolled
        back, then the tokens emitted after them are consumed. Raises `SpeculorError` for a token the grammar
        forbids (which masked logits never produce)."""
        new = list(output[self._committed :])
        kept = _common_prefix(self._ahead, new)
        self._roll_back_to(kept)
        for index, token in enumerate(new[kept:], start=self._committed + kept):
            if not self._matcher.accept_token(token):
                raise SpeculorError(f"output token {token} at position {index} breaks the row's grammar")
        self._committed = len(output)
        self._ahead = []
        self._masks = {}

    def fill_mask_after(self, drafts: Sequence[int], out: torch.Tensor) -> None:
        """Write into `out` (int32, one bit per token) the tokens allowed after the committed ones and `drafts`.
        Where a draft breaks the grammar, or follows its end, every token is allowed: the mask before that draft
        makes the target reject it, so nothing after it is ever used."""
        kept = _common_prefix(self._ahead, drafts)
        self._roll_back_to(kept)
        for token in drafts[kept:]:
            if self._matcher.is_terminated() or not self._matcher.accept_token(token):
                out.fill_(-1)
                return
            self._ahead.append(token)
        cached = self._masks.get(len(self._ahead))
        if cached is not None:
            out.copy_(cached)
        elif self._matcher.is_terminated():
            out.fill_(-1)
        else:
            self._matcher.fill_next_token_bitmask(out[None], 0)
            if self._allowed_anywhere is not None:
                out &= self._allowed_anywhere
            self._masks[len(self._ahead)] = out.clone()

    def _roll_back_to(self, kept: int) -> None:
        surplus = len(self._ahead) - kept
        if surplus:
            self._matcher.rollback(surplus)
            del self._ahead[kept:]
            self._masks = {length: mask for length, mask in self._masks.items() if length <= kept}


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


@dataclass(frozen=True)
class RowGrammars:
    """The grammars of a batch's rows (None for a row without one), for `RowProcessors`."""

    rows: tuple[GrammarRow | None, ...]

    def select(self, rows: torch.Tensor) -> RowGrammars:
        return RowGrammars(tuple(self.rows[index] for index in rows.tolist()))

    def mask(self, logits: torch.Tensor, drafted: torch.Tensor, offset: int) -> None:
        """Set to −inf, in place, the logits (rows, P, V) of tokens a row's grammar forbids at position j, after its
        committed tokens and its first `offset + j` drafted tokens (`drafted`, rows × ≥ offset + P − 1). One host
        read of the drafts of the rows with a grammar; the others are left untouched."""
        constrained = [index for index, grammar in enumerate(self.rows) if grammar is not None]
        if not constrained:
            return
        positions, vocab = logits.shape[1], logits.shape[2]
        drafted_width = offset + positions - 1
        host_drafts = drafted[constrained, :drafted_width].tolist() if drafted_width > 0 else [[]] * len(constrained)
        words = max(self.rows[index].words for index in constrained)  # type: ignore[union-attr]
        bitmask = torch.empty(len(constrained), positions, words, dtype=torch.int32)
        for place, (index, drafts) in enumerate(zip(constrained, host_drafts, strict=True)):
            grammar = self.rows[index]
            assert grammar is not None
            for position in range(positions):
                grammar.fill_mask_after(drafts[: offset + position], bitmask[place, position])
        # Bit i of a little-endian int32 word is bit i % 8 of its byte i // 8: unpacked in that order, one byte per
        # token.
        unpacked = numpy.unpackbits(bitmask.numpy().view(numpy.uint8), axis=-1, bitorder="little")
        # Ids past the grammar's vocabulary (an embedding padded beyond the tokenizer) are never allowed.
        allowed = torch.zeros(len(constrained), positions, vocab, dtype=torch.bool)
        covered = min(vocab, unpacked.shape[-1])
        allowed[..., :covered] = torch.from_numpy(unpacked[..., :covered]).view(torch.bool)
        forbidden = ~allowed.to(logits.device)
        if len(constrained) == logits.shape[0]:
            logits.masked_fill_(forbidden, float("-inf"))
        else:
            rows = torch.tensor(constrained, dtype=torch.long, device=logits.device)
            logits[rows] = logits[rows].masked_fill(forbidden, float("-inf"))
