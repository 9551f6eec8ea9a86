"""The fast runner: a static KV cache and fixed-shape steps replayed as CUDA graphs, for the Llama family.

Why it is fast: the Hugging Face runner pays hundreds of microseconds of Python and kernel launches per forward,
which on a GPU is most of a small model's step and a large share of a big one's. Here the cache is preallocated
(rollback only moves a position pointer, so `truncate` costs nothing), every step of k tokens has the same shapes
whatever its position, and so each (k, attention span) pair is captured once as a CUDA graph and replayed: one
launch per step. The attention span is the used part of the cache rounded up to a power of two, so a short
sequence does not read the whole cache.

Capture mode: manual `torch.cuda.CUDAGraph` capture of the eager step ("graph", the default on CUDA). The
alternative, `torch.compile(mode="reduce-overhead")` ("compile"), stays selectable for measurement. On an H200
(benchmarks/RESULTS.md, GPU section) it ran this runner's first version 28-38% faster per step but took 3-64 s
to compile each (k, span) shape, and a speculative run meets several; once the step's launches were cut, the
manual graph beat that compiled step, at a capture cost of milliseconds. On the CPU the same step runs eagerly
("eager"), which already saves most of transformers' per-call overhead.

Kernels: inside each step the matrix products are cuBLAS's; on CUDA the small operations between them run as
fused Triton kernels (`speculor.runners.triton_ops`: RMSNorm, q/k norm + rotary + cache write, SiLU·up, decode
attention), about half the launches of plain PyTorch. On an H200 that took the 8B-shaped step from 5.63 to 4.81 ms
(benchmarks/RESULTS.md). `kernels="torch"` keeps plain PyTorch, which is also what the CPU runs.

Uniform rounding (`fixed_width`): a verify step of k tokens and a decode step of 1 token run different matrix
kernels, so in bfloat16 the same position can get slightly different logits, and at a near-tie greedy speculative
output can differ from greedy decoding alone. With `fixed_width=W` every step is padded to W tokens and attends
over the whole cache, so every step runs the same kernels and each row's logits depend only on its own inputs:
decoding alone and verifying then agree bit for bit. The price is W tokens of work per decode step (small while
the step is bound by reading the weights) and a full-cache attention span.
"""

from __future__ import annotations

from types import ModuleType

import torch
from transformers import PreTrainedModel

from speculor.errors import SpeculorError
from speculor.runners.hf import _context_length
from speculor.runners.llama import LlamaWeights, StaticCache, forward_tokens, unsupported_reason

CAPTURE_MODES = ("graph", "compile", "eager")
KERNEL_CHOICES = ("auto", "triton", "torch")
DEFAULT_MAX_CACHE_LENGTH = 4096
SMALLEST_SPAN = 128


class FastRunner:
    """Runs a Llama-family `PreTrainedModel` through `speculor.runners.llama` on its own weights (no copy).

    `max_cache_length` caps the preallocated cache (and so `max_length`) below the model's context length, since
    e.g. a 128k-token cache of an 8B model would take 16 GB. `capture` picks the step mode: "graph" (CUDA only),
    "compile" (CUDA only) or "eager"; None means "graph" on CUDA and "eager" elsewhere. `fixed_width` runs every
    step at that width (see the module docstring); steps of more tokens are then refused. `kernels` picks how the
    small per-layer operations run: "triton" (fused kernels of `speculor.runners.triton_ops`, CUDA only), "torch"
    (plain PyTorch) or "auto" (Triton when on CUDA with Triton installed).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_cache_length: int = DEFAULT_MAX_CACHE_LENGTH,
        capture: str | None = None,
        fixed_width: int | None = None,
        kernels: str = "auto",
    ) -> None:
        if max_cache_length < 1:
            raise SpeculorError(f"max_cache_length must be ≥ 1, got {max_cache_length}")
        if fixed_width is not None and fixed_width < 1:
            raise SpeculorError(f"fixed_width must be ≥ 1, got {fixed_width}")
        self._max_length = min(_context_length(model), max_cache_length)
        reason = unsupported_reason(model, self._max_length)
        if reason is not None:
            raise SpeculorError(f"the fast runner cannot run {type(model).__name__}: {reason}")
        self.model = model.eval()
        self.weights = LlamaWeights.from_model(model)
        device = self.weights.embed.device
        capture = capture or ("graph" if device.type == "cuda" else "eager")
        if capture not in CAPTURE_MODES:
            raise SpeculorError(f"unknown capture mode {capture!r}: choose one of {', '.join(CAPTURE_MODES)}")
        if capture != "eager" and device.type != "cuda":
            raise SpeculorError(f"capture mode {capture!r} needs a CUDA device; the model is on {device}")
        self.capture = capture
        self.fused = fused_kernels(kernels, device)
        self.fixed_width = fixed_width
        # A padded step writes (masked, later overwritten) keys past the sequence end: room for them at the end.
        capacity = self._max_length + (fixed_width - 1 if fixed_width else 0)
        with torch.inference_mode():
            self.cache = StaticCache.allocate(self.weights, capacity)
            self._token_buffer = torch.zeros(capacity, dtype=torch.long, device=device)
            self._start = torch.zeros((), dtype=torch.long, device=device)
        self._length = 0
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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
    def cache_length(self) -> int:
        return self._length

    @property
    def graph_count(self) -> int:
        """How many step shapes have been captured so far (each costs a capture and a little memory)."""
        return len(self._graphs)

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor) -> None:
        self._length = 0
        count = token_ids.numel()
        if count:
            self._check_room(count)
            positions = torch.arange(count, device=self.device)
            tokens = token_ids.to(self.device)
            forward_tokens(self.weights, self.cache, tokens, positions, self._span(count), False, self.fused)
            self._length = count

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        count = token_ids.numel()
        if count < 1:
            raise SpeculorError("forward needs at least one token")
        self._check_room(count)
        width = self.fixed_width or count
        if count > width:
            raise SpeculorError(f"this runner runs steps of at most fixed_width={width} tokens, got {count}")
        start = self._length
        span = self.cache.capacity if self.fixed_width else self._span(start + count)
        self._token_buffer[:count].copy_(token_ids, non_blocking=True)
        if self.capture == "eager":
            positions = torch.arange(start, start + width, device=self.device)
            tokens = self._token_buffer[:width]
            logits = forward_tokens(self.weights, self.cache, tokens, positions, span, True, self.fused)
        else:
            self._start.fill_(start)
            logits = self._replay(width, span)
        self._length = start + count
        # A copy: the graph's output buffer is overwritten by the next replay.
        return logits[:count].clone()

    def truncate(self, length: int) -> None:
        self._length = min(self._length, max(0, length))

    def _check_room(self, count: int) -> None:
        if self._length + count > self._max_length:
            raise SpeculorError(
                f"the fast runner's cache holds {self._max_length} tokens; {self._length} + {count} do not fit "
                "(raise max_cache_length or shorten the request)"
            )

    def _span(self, end: int) -> int:
        """Cache slots attended over when the sequence ends at `end`: a power of two, so few shapes get captured."""
        span = SMALLEST_SPAN
        while span < end:
            span *= 2
        return min(span, self.cache.capacity)

    def _static_step(self, count: int, span: int) -> torch.Tensor:
        """One step over the static buffers: tokens `_token_buffer[:count]` at positions `_start + 0..count-1`."""
        positions = self._start + self.cache.slots[:count]
        tokens = self._token_buffer[:count]
        logits = forward_tokens(self.weights, self.cache, tokens, positions, span, True, self.fused)
        assert logits is not None
        return logits

    def _compile(self):
        """`torch.compile` with its own CUDA graphs: the cache must keep its address across replays, and every
        (k, span) shape is one more specialization, so the recompilation limit is raised to hold them all."""
        torch._dynamo.mark_static_address(self.cache.kv)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        return torch.compile(self._static_step, mode="reduce-overhead")

    def _replay(self, count: int, span: int) -> torch.Tensor:
        """Run the captured step for this shape, capturing it first if new. Returns the graph's output buffer."""
        if self._compiled is not None:
            return self._compiled(count, span)
        captured = self._graphs.get((count, span))
        if captured is None:
            captured = self._capture(count, span)
            self._graphs[(count, span)] = captured
        graph, output = captured
        graph.replay()
        return output

    def _capture(self, count: int, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then capture. The warm-up writes the current step's keys and values into the
        cache at the current positions, which the replay that follows writes again identically: no harm done."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._static_step(count, span)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            output = self._static_step(count, span)
        return graph, output


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
