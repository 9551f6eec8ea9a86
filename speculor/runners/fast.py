"""The fast runner: a static KV cache for several sequences and fixed-shape batched steps replayed as CUDA graphs,
for the Llama family (Llama, Mistral, Qwen2/3, Gemma 1/2/3 text; see `speculor.runners.llama`).

Why it is fast: the Hugging Face runner pays hundreds of microseconds of Python and kernel launches per forward,
which on a GPU is most of a small model's step and a large share of a big one's. Here the cache is preallocated,
one row per slot plus a scratch row (rollback only moves a slot's position pointer, so it costs nothing), and a
step feeds every listed slot k tokens at that slot's own positions, padded to a batch bucket (1, 2, 4, … up to
`slots`) whose extra rows compute on the scratch row and are thrown away. Every step of one (bucket, k) has the same
shapes whatever its slots and positions, which travel to the device as one small tensor, so each shape is captured
once as a CUDA graph and replayed: one launch per step.

Graph keys: with the fused Triton attention (the default on CUDA) each row reads its own cache row in place up to
its own length, so one graph per (bucket, k) serves every length: `warm_up` captures them all and serving never
captures. With PyTorch's attention (`kernels="torch"`, or more query rows per sequence than the Triton tile holds)
the step attends over the used part of the cache rounded up to a power of two (its "span", so a short sequence
does not read the whole cache), and graphs are keyed by (bucket, k, span): `warm_up` captures the smallest span,
and a longer one is captured when a sequence first reaches it (one capture: a few eager steps, milliseconds).

Capture mode: manual `torch.cuda.CUDAGraph` capture of the eager step ("graph", the default on CUDA). The
alternative, `torch.compile(mode="reduce-overhead")` ("compile"), stays selectable for measurement. On an H200
(benchmarks/RESULTS.md, GPU section) it ran this runner's first version 28-38% faster per step but took 3-64 s
to compile each step shape; once the step's launches were cut, the manual graph beat that compiled step, at a
capture cost of milliseconds. On the CPU the same step runs eagerly ("eager"), which already saves most of
transformers' per-call overhead.

Kernels: inside each step the matrix products are cuBLAS's; on CUDA the small operations between them run as
fused Triton kernels (`speculor.runners.triton_ops`: RMSNorm, q/k norm + rotary + cache write, SiLU·up, decode
attention), about half the launches of plain PyTorch. On an H200 that took the 8B-shaped step from 5.63 to 4.81 ms
(benchmarks/RESULTS.md). `kernels="torch"` keeps plain PyTorch, which is also what the CPU runs; its attention
gathers the step's cache rows into one tensor per layer.

Uniform rounding (`fixed_width`): a verify step of k tokens and a decode step of 1 token run different matrix
kernels, so in bfloat16 the same position can get slightly different logits, and at a near-tie greedy speculative
output can differ from greedy decoding alone. With `fixed_width=W` every step is padded to W tokens per row and
attends over the whole cache, so steps of one batch bucket run the same kernels and each row's logits depend only
on its own inputs: decoding alone and verifying then agree bit for bit. The price is W tokens of work per decode
step (small while the step is bound by reading the weights) and a full-cache attention span. Across different
batch buckets the matrix products may still pick different kernels (a batch-invariant guarantee would need
batch-invariant kernels).

Target features (`capture_features`, for EAGLE-3 heads): once asked, every forward copies the hidden states entering
the chosen layers into a buffer (`speculor.runners.llama.FeatureTap`) — inside the captured graph for a step, into
one buffer all graphs share like the logits — and hands a view of it to the sink after the forward. A runner nobody
asked runs exactly the graphs it ran before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from speculor.errors import SpeculorError
from speculor.runners.base import FeatureSink
from speculor.runners.hf import _context_length
from speculor.runners.llama import (
    FeatureTap,
    LlamaWeights,
    StaticCache,
    forward_tokens,
    to_device,
    unsupported_reason,
)

CAPTURE_MODES = ("graph", "compile", "eager")
KERNEL_CHOICES = ("auto", "triton", "torch")
DEFAULT_MAX_CACHE_LENGTH = 4096
SMALLEST_SPAN = 128


def batch_buckets(slots: int) -> tuple[int, ...]:
    """The row counts steps are padded to: powers of two below `slots`, then `slots` itself."""
    buckets = []
    size = 1
    while size < slots:
        buckets.append(size)
        size *= 2
    return (*buckets, slots)


@dataclass
class CapturedStep:
    """One step shape's static inputs and output: `tokens` (bucket, width); `inputs` = (the cache row of each bucket
    row, then how far the row's length advances: k for a real row, 0 for padding); `logits` (bucket·width, vocab);
    `graph` is None under torch.compile, which keeps its own graphs. `rows` remembers which (slots, k) `inputs`
    holds, so that a run of steps over the same slots sends nothing but tokens to the device. `features` is the
    buffer the graph writes target features into, when they are captured."""

    tokens: torch.Tensor
    inputs: torch.Tensor
    logits: torch.Tensor | None
    graph: torch.cuda.CUDAGraph | None
    rows: tuple[tuple[int, ...], int] | None = None
    features: torch.Tensor | None = None


class FastRunner:
    """Runs a Llama- or Gemma-family `PreTrainedModel` through `speculor.runners.llama` on its own weights (no
    copy), for `slots` sequences at once (see `speculor.runners.base.Runner`).

    `max_cache_length` caps each slot's preallocated cache (and so `max_length`) below the model's context length,
    since e.g. a 128k-token cache of an 8B model would take 16 GB per slot. `capture` picks the step mode: "graph"
    (CUDA only), "compile" (CUDA only) or "eager"; None means "graph" on CUDA and "eager" elsewhere. `fixed_width`
    runs every step at that width (see the module docstring); steps of more tokens are then refused. `kernels`
    picks how the small per-layer operations run: "triton" (fused kernels of `speculor.runners.triton_ops`, CUDA
    only), "torch" (plain PyTorch) or "auto" (Triton when on CUDA with Triton installed). `weights`, where given,
    replaces those read off the model (a tensor-parallel rank's shard, `speculor.runners.tensor_parallel`, whose
    head counts are not the config's).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        slots: int = 1,
        max_cache_length: int = DEFAULT_MAX_CACHE_LENGTH,
        capture: str | None = None,
        fixed_width: int | None = None,
        kernels: str = "auto",
        weights: LlamaWeights | None = None,
    ) -> None:
        if not isinstance(slots, int) or slots < 1:
            raise SpeculorError(f"slots must be an integer ≥ 1, got {slots!r}")
        if max_cache_length < 1:
            raise SpeculorError(f"max_cache_length must be ≥ 1, got {max_cache_length}")
        if fixed_width is not None and fixed_width < 1:
            raise SpeculorError(f"fixed_width must be ≥ 1, got {fixed_width}")
        self._max_length = min(_context_length(model), max_cache_length)
        reason = unsupported_reason(model, self._max_length)
        if reason is not None:
            raise SpeculorError(f"the fast runner cannot run {type(model).__name__}: {reason}")
        self.model = model.eval()
        self.weights = weights if weights is not None else LlamaWeights.from_model(model)
        device = self.weights.embed.device
        capture = capture or ("graph" if device.type == "cuda" else "eager")
        if capture not in CAPTURE_MODES:
            raise SpeculorError(f"unknown capture mode {capture!r}: choose one of {', '.join(CAPTURE_MODES)}")
        if capture != "eager" and device.type != "cuda":
            raise SpeculorError(f"capture mode {capture!r} needs a CUDA device; the model is on {device}")
        self.capture = capture
        self.fused = fused_kernels(kernels, device)
        self.fixed_width = fixed_width
        self.buckets = batch_buckets(slots)
        self._slots = slots
        # Padding rows of a step compute on this extra cache row, which no slot uses.
        self._scratch_row = slots
        # A padded step writes (masked, later overwritten) keys past the sequence end: room for them at the end.
        capacity = self._max_length + (fixed_width - 1 if fixed_width else 0)
        with torch.inference_mode():
            self.cache = StaticCache.allocate(self.weights, slots + 1, capacity)
        self._lengths = [0] * slots
        # The lengths again on the device, scratch row last (always 0): a step reads its rows' start positions there
        # and advances them itself, so that only a rollback, reset or extend (which mark their slot stale) makes the
        # next step send that slot's length to the device. Only stale slots are sent: another slot may have a drop
        # queued on the device (`drop_on_device`) that its host length does not know of yet.
        self._device_lengths = torch.zeros(slots + 1, dtype=torch.long, device=device)
        self._stale: set[int] = set()
        # A captured step reads positions from the device lengths, so a drop can be queued there and the host told
        # later (`settle`); an eager step reads the host's lengths, which a drop then updates at once. Tests set it
        # on an eager CPU runner to run the captured steps' bookkeeping there.
        self.positions_from_device = capture != "eager"
        self._slot_indices: dict[tuple[int, ...], torch.Tensor] = {}
        self._steps: dict[tuple[int, int, int | None], CapturedStep] = {}
        self._logits_buffer: torch.Tensor | None = None
        self._feature_layers: tuple[int, ...] | None = None
        self._feature_sink: FeatureSink | None = None
        self._features_buffer: torch.Tensor | None = None
        self._graph_pool = torch.cuda.graph_pool_handle() if capture == "graph" else None
        self._compiled = self._compile() if capture == "compile" else None

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def vocab_size(self) -> int:
        return self.weights.vocab_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def hidden_size(self) -> int:
        return int(self.weights.embed.shape[1])

    @property
    def layer_count(self) -> int:
        return len(self.weights.layers)

    def capture_features(self, layers: Sequence[int], sink: FeatureSink) -> None:
        """Start handing target features to `sink` (see `speculor.runners.base.FeatureSource`). Step shapes captured
        before are dropped, so that every graph from now on writes them. A row's start is its host length when the
        forward is issued."""
        wrong = [layer for layer in layers if not 0 <= layer < self.layer_count]
        if wrong or not layers:
            raise SpeculorError(f"feature layers must be among 0..{self.layer_count - 1}, got {list(layers)}")
        if self.capture == "compile":
            raise SpeculorError("capture mode 'compile' cannot capture target features; use 'graph' or 'eager'")
        self._feature_layers = tuple(layers)
        self._feature_sink = sink
        self._steps.clear()

    def _tap(self, tokens: int) -> FeatureTap | None:
        """Where a forward of `tokens` tokens writes its target features: the first rows of one buffer every
        forward shares (the sink copies what it keeps), grown as needed; None when no features are captured."""
        if self._feature_layers is None:
            return None
        if self._features_buffer is None or self._features_buffer.shape[0] < tokens:
            width = len(self._feature_layers) * self.hidden_size
            self._features_buffer = torch.empty((tokens, width), dtype=self.weights.embed.dtype, device=self.device)
        return FeatureTap(self._feature_layers, self._features_buffer[:tokens])

    @property
    def graph_count(self) -> int:
        """How many step shapes have been captured so far (each costs a capture and a little memory)."""
        return sum(step.graph is not None for step in self._steps.values())

    def length(self, slot: int) -> int:
        self._check_slot(slot)
        return self._lengths[slot]

    def reset(self, slot: int) -> None:
        self._check_slot(slot)
        self._lengths[slot] = 0
        self._stale.add(slot)

    def rollback(self, slot: int, length: int) -> None:
        self._check_slot(slot)
        if length < self._lengths[slot]:
            self._lengths[slot] = max(0, length)
            self._stale.add(slot)

    @property
    def copies_prefixes(self) -> bool:
        """Whether `copy_prefix` may stand in for a prefill: not while a feature sink is attached, which would never
        be handed the copied positions' features."""
        return self._feature_sink is None

    @torch.inference_mode()
    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        """Make `destination`'s cache hold the first `length` tokens of `source`'s: a prompt that several sequences
        share (n samples of one prompt) is prefilled once and copied, one device copy instead of a forward."""
        self._check_slot(source)
        self._check_slot(destination)
        if length > self._lengths[source]:
            raise SpeculorError(f"slot {source} holds {self._lengths[source]} tokens, fewer than the {length} to copy")
        self.cache.kv[:, :, destination, :, :length] = self.cache.kv[:, :, source, :, :length]
        self._lengths[destination] = length
        self._stale.add(destination)

    @property
    def drops_on_device(self) -> bool:
        """Whether `drop_on_device` runs without a host read: always on the CPU, and on CUDA with captured steps
        (an eager CUDA step needs exact host lengths, which a device-side drop would only give after a sync); never
        while a feature sink is attached, since the features it is handed are keyed by the host's lengths."""
        return (self.positions_from_device or self.device.type == "cpu") and self._feature_sink is None

    def drop_on_device(self, slots: Sequence[int], surplus: torch.Tensor) -> None:
        """Cut `surplus[i]` tokens (a device tensor, rows,) off the end of `slots[i]`'s cache without the host
        knowing how many: queued on the device, so the next step can be queued before this one's results are read.
        The host's lengths stay upper bounds (safe for spans and room checks) until `settle` is called with each
        row's count once it is known."""
        if not self.positions_from_device:
            for slot, count in zip(slots, surplus.tolist(), strict=True):
                self._lengths[slot] -= count
            return
        key = tuple(slots)
        indices = self._slot_indices.get(key)
        if indices is None:
            indices = self._slot_indices[key] = host_to_device(key, self.device)
        self._device_lengths.index_add_(0, indices, -surplus)

    def settle(self, slot: int, count: int) -> None:
        """The host learns that `drop_on_device` cut `count` tokens off `slot` (the device already did)."""
        if self.positions_from_device:
            self._lengths[slot] -= count

    @torch.inference_mode()
    def extend(self, slot: int, token_ids: torch.Tensor) -> None:
        """Run eagerly (one sequence of any length: a prompt is one shape each time, not worth a graph)."""
        self._check_slot(slot)
        count = token_ids.numel()
        if not count:
            return
        self._check_room(slot, count)
        start = self._lengths[slot]
        positions = torch.arange(start, start + count, device=self.device)
        tokens = token_ids.to(self.device).view(-1)
        span = self._span(start + count)
        tap = self._tap(count)
        forward_tokens(self.weights, self.cache, tokens, positions, [slot], span, False, self.fused, tap=tap)
        self._lengths[slot] = start + count
        self._stale.add(slot)
        if tap is not None and self._feature_sink is not None:
            self._feature_sink([slot], [start], tap.out.view(1, count, -1))

    @torch.inference_mode()
    def extend_rows(self, slots: Sequence[int], token_ids: Sequence[torch.Tensor]) -> None:
        """Several rows' chunks in one eager forward: each is padded at its end to the longest, and the padding's
        keys and values land past the row's length, where they are stale and later overwritten. The weights are
        read once for all rows — on a GPU a row's prefill alone is launch- and weight-read-bound. Rows whose padded
        chunk would not fit their cache go on their own."""
        rows = [(slot, row.view(-1)) for slot, row in zip(slots, token_ids, strict=True) if row.numel()]
        for slot, row in rows:
            self._check_slot(slot)
            self._check_room(slot, row.numel())
        width = max((row.numel() for _, row in rows), default=0)
        alone = [(slot, row) for slot, row in rows if self._lengths[slot] + width > self._max_length]
        together = [(slot, row) for slot, row in rows if self._lengths[slot] + width <= self._max_length]
        for slot, row in alone:
            self.extend(slot, row)
        if len(together) < 2:
            for slot, row in together:
                self.extend(slot, row)
            return
        width = max(row.numel() for _, row in together)
        tokens = torch.stack([F.pad(row.to(self.device), (0, width - row.numel())) for _, row in together])
        starts = [self._lengths[slot] for slot, _ in together]
        positions = (to_device(starts, self.device)[:, None] + self.cache.offsets[:width]).reshape(-1)
        span = self._span(max(starts) + width)
        sequences = [slot for slot, _ in together]
        tap = self._tap(tokens.numel())
        forward_tokens(
            self.weights, self.cache, tokens.reshape(-1), positions, sequences, span, False, self.fused, tap=tap
        )
        for slot, row in together:
            self._lengths[slot] += row.numel()
            self._stale.add(slot)
        if tap is not None and self._feature_sink is not None:
            self._feature_sink(sequences, starts, tap.out.view(len(sequences), width, -1))

    @torch.inference_mode()
    def step(self, slots: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        rows, shape = len(slots), token_ids.shape
        if len(shape) != 2 or shape[0] != rows or rows < 1 or shape[1] < 1:
            raise SpeculorError(
                f"step needs token_ids of shape (rows, k ≥ 1) with one row per slot: got {tuple(shape)} for {rows} "
                "slots"
            )
        count = shape[1]
        width = self.fixed_width or count
        if count > width:
            raise SpeculorError(f"this runner runs steps of at most fixed_width={width} tokens, got {count}")
        lengths, longest = self._lengths, 0
        for slot in slots:
            self._check_slot(slot)
            longest = max(longest, lengths[slot])
        if longest + count > self._max_length:
            for slot in slots:
                self._check_room(slot, count)
        if rows > 1 and len(set(slots)) != rows:
            raise SpeculorError(f"a step lists each slot at most once, got {list(slots)}")
        bucket = next(size for size in self.buckets if size >= rows)
        span = self.cache.capacity if self.fixed_width else self._span(longest + count)
        if self.capture == "eager":
            tap = self._tap(bucket * width)
            logits = self._eager_step(slots, token_ids, bucket, width, span, tap)
            features = tap.out if tap is not None else None
        else:
            if self._stale:
                self._send_lengths()
            captured = self._captured_step(bucket, width, span)
            exact = bucket == rows and width == count
            (captured.tokens if exact else captured.tokens[:rows, :count]).copy_(token_ids, non_blocking=True)
            rows_key = (tuple(slots), count)
            if captured.rows != rows_key:
                self._send(captured.inputs, self._step_inputs(bucket, slots, count))
                captured.rows = rows_key
            if captured.graph is not None:
                captured.graph.replay()
                logits = captured.logits
            else:
                logits = self._compiled(captured.tokens, captured.inputs, self._graph_span(width, span), None)
        if self._feature_sink is not None and features is not None:
            starts = [lengths[slot] for slot in slots]
            self._feature_sink(slots, starts, features.view(bucket, width, -1)[:rows, :count])
        for slot in slots:
            lengths[slot] += count
        # A copy: the graph's output buffer is overwritten by the next replay.
        if bucket == rows and width == count:
            return logits.view(rows, count, -1).clone()
        return logits.view(bucket, width, -1)[:rows, :count].clone()

    @torch.inference_mode()
    def warm_up(self, widths: Sequence[int]) -> None:
        """Prepare every (batch bucket, width) step shape up front, so that changing the width or the number of rows
        never captures (or compiles a Triton kernel) in the middle of serving: graphs are captured, or under
        "eager" on CUDA each shape runs once. Steps run on the scratch row only; no slot changes. With PyTorch's
        attention only the smallest span is captured (see the module docstring)."""
        widths = sorted({self.fixed_width or width for width in widths})
        if any(not isinstance(width, int) or width < 1 for width in widths):
            raise SpeculorError(f"warm_up widths must be integers ≥ 1, got {widths}")
        if self.fixed_width is not None and widths and widths[-1] > self.fixed_width:
            raise SpeculorError(f"this runner runs steps of at most fixed_width={self.fixed_width} tokens")
        if not widths or (self.capture == "eager" and self.device.type != "cuda"):
            return
        span = self.cache.capacity if self.fixed_width else self._span(1)
        self._logits_rows(self.buckets[-1] * widths[-1])
        for bucket in self.buckets:
            for width in widths:
                if self.capture == "eager":
                    self._eager_step([], torch.zeros((0, width), dtype=torch.long), bucket, width, span)
                else:
                    self._captured_step(bucket, width, span)

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self._slots:
            raise SpeculorError(f"slot {slot!r} does not exist: this runner has slots 0..{self._slots - 1}")

    def _check_room(self, slot: int, count: int) -> None:
        if self._lengths[slot] + count > self._max_length:
            raise SpeculorError(
                f"the fast runner's cache holds {self._max_length} tokens per slot; slot {slot}'s "
                f"{self._lengths[slot]} + {count} do not fit (raise max_cache_length or shorten the request)"
            )

    def _span(self, end: int) -> int:
        """Cache positions attended over when the longest row ends at `end`: a power of two, so few shapes get
        captured."""
        span = SMALLEST_SPAN
        while span < end:
            span *= 2
        return min(span, self.cache.capacity)

    def _graph_span(self, width: int, span: int) -> int | None:
        """The span a captured step is keyed by: None where the fused attention reads each row up to its own
        length, so one graph serves every span."""
        fused_attention = self.fused is not None and self._group * width <= self.fused.ATTENTION_MAX_ROWS
        return None if fused_attention else span

    @property
    def _group(self) -> int:
        return self.weights.heads // self.weights.kv_heads

    def _eager_step(
        self,
        slots: Sequence[int],
        token_ids: torch.Tensor,
        bucket: int,
        width: int,
        span: int,
        tap: FeatureTap | None = None,
    ) -> torch.Tensor:
        """The step without graphs: positions from the host's lengths (the device lengths are not used), rows as
        host ints, padded to the bucket like a captured step; or, with `positions_from_device`, from the device
        lengths as a captured step reads them."""
        rows, count = token_ids.shape
        tokens = token_ids.to(self.device)
        if bucket > rows or width > count:
            tokens = F.pad(tokens, (0, width - count, 0, bucket - rows))
        starts = [self._lengths[slot] for slot in slots] + [0] * (bucket - rows)
        if self.positions_from_device and rows:
            if self._stale:
                self._send_lengths()
            inputs = host_to_device(self._step_inputs(bucket, slots, count), self.device)
            positions = advance_positions(self._device_lengths, inputs, self.cache.offsets[:width])
        elif bucket == 1:
            positions = torch.arange(starts[0], starts[0] + width, device=self.device)
        else:
            positions = (to_device(starts, self.device)[:, None] + self.cache.offsets[:width]).reshape(-1)
        sequences = [*slots, *[self._scratch_row] * (bucket - rows)]
        return forward_tokens(
            self.weights, self.cache, tokens.reshape(-1), positions, sequences, span, True, self.fused, tap=tap
        )

    def _step_inputs(self, bucket: int, slots: Sequence[int], count: int) -> list[int]:
        """A step's `CapturedStep.inputs` for these slots, padded to `bucket` rows on the scratch row."""
        padding = bucket - len(slots)
        return [*slots, *[self._scratch_row] * padding, *[count] * len(slots), *[0] * padding]

    def _send_lengths(self) -> None:
        """Copy the stale slots' host lengths to the device (one small copy and one scatter), leaving every other
        slot's device length alone."""
        stale = sorted(self._stale)
        self._stale.clear()
        if len(stale) == self._slots:
            self._send(self._device_lengths, [*self._lengths, 0])
            return
        on_device = host_to_device([*stale, *(self._lengths[slot] for slot in stale)], self.device)
        self._device_lengths.index_copy_(0, on_device[: len(stale)], on_device[len(stale) :])

    def _send(self, target: torch.Tensor, values: list[int]) -> None:
        """Copy `values` into the device tensor `target` without blocking the host (from pinned memory)."""
        target.copy_(torch.tensor(values, dtype=torch.long, pin_memory=target.is_cuda), non_blocking=True)

    def _static_step(
        self,
        tokens: torch.Tensor,
        inputs: torch.Tensor,
        span: int | None,
        logits_out: torch.Tensor | None,
        tap: FeatureTap | None = None,
    ) -> torch.Tensor:
        """One step over static buffers: row i's tokens `tokens[i]` go to cache row `inputs[i]` from that row's
        device length on, which then advances by `inputs[bucket + i]`."""
        bucket, width = tokens.shape
        advance = self.fused.advance_positions if self.fused is not None else advance_positions
        positions = advance(self._device_lengths, inputs, self.cache.offsets[:width])
        span = self.cache.capacity if span is None else span
        logits = forward_tokens(
            self.weights,
            self.cache,
            tokens.view(-1),
            positions,
            inputs[:bucket],
            span,
            True,
            self.fused,
            logits_out,
            tap,
        )
        assert logits is not None
        return logits

    def _compile(self):
        """`torch.compile` with its own CUDA graphs: the cache must keep its address across replays, and every
        step shape is one more specialization, so the recompilation limit is raised to hold them all."""
        torch._dynamo.mark_static_address(self.cache.kv)
        torch._dynamo.mark_static_address(self._device_lengths)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        return torch.compile(self._static_step, mode="reduce-overhead")

    def _logits_rows(self, rows: int) -> torch.Tensor:
        """The first `rows` rows of the float logits buffer that every graph writes into (one buffer rather than
        one per graph, which at 64 rows × 6 widths of a 128k vocabulary would take gigabytes). Growing it leaves
        the graphs captured before with the old buffer, which they keep alive."""
        if self._logits_buffer is None or self._logits_buffer.shape[0] < rows:
            self._logits_buffer = torch.empty((rows, self.vocab_size), dtype=torch.float32, device=self.device)
        return self._logits_buffer[:rows]

    def _captured_step(self, bucket: int, width: int, span: int) -> CapturedStep:
        """The captured step for this shape, captured first if new (on the scratch row: no slot changes)."""
        key = (bucket, width, self._graph_span(width, span))
        captured = self._steps.get(key)
        if captured is None:
            captured = self._capture(bucket, width, key[2])
            self._steps[key] = captured
        return captured

    def _capture(self, bucket: int, width: int, span: int | None) -> CapturedStep:
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture."""
        tokens = torch.zeros((bucket, width), dtype=torch.long, device=self.device)
        inputs = torch.tensor(self._step_inputs(bucket, [], 0), device=self.device)
        if self._compiled is not None:
            self._compiled(tokens, inputs, span, None)
            return CapturedStep(tokens, inputs, None, None)
        logits_out = self._logits_rows(bucket * width)
        tap = self._tap(bucket * width)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._static_step(tokens, inputs, span, logits_out, tap)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._static_step(tokens, inputs, span, logits_out, tap)
        return CapturedStep(tokens, inputs, logits, graph, features=tap.out if tap is not None else None)


def host_to_device(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor of `values` on `device`, copied without waiting for the device's queued work (through pinned
    memory on CUDA; a plain copy from pageable memory would wait for the queue to drain)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def advance_positions(lengths: torch.Tensor, inputs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The positions (bucket·width,) of a step whose row i writes width = len(`offsets`) tokens (`offsets` is
    0..width-1) to cache row `inputs[i]` from that row's `lengths` entry on; then advances each row's entry by
    `inputs[bucket + i]` (0 for padding rows, so the scratch row's length stays 0 however many of them share it).
    `triton_ops.advance_positions` does the same in one launch."""
    bucket = inputs.shape[0] // 2
    rows, advances = inputs[:bucket], inputs[bucket:]
    starts = lengths[rows]
    lengths.index_put_((rows,), starts + advances)
    return (starts[:, None] + offsets).reshape(-1)


def fused_kernels(choice: str, device: torch.device) -> ModuleType | None:
    """The fused-kernel module for `choice` on `device` ("auto", "triton" or "torch"; see `FastRunner`), or None
    for plain PyTorch. Triton is imported only here, so a CPU install never needs it."""
    if choice not in KERNEL_CHOICES:
        raise SpeculorError(f"unknown kernels {choice!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise SpeculorError(f"kernels='triton' needs a CUDA device; the model is on {device}")
    try:
        from speculor.runners import triton_ops
    except ImportError as error:
        if choice == "triton":
            raise SpeculorError(f"kernels='triton' needs Triton, which failed to import: {error}") from error
        return None
    return triton_ops
