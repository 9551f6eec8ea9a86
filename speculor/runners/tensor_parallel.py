"""Tensor parallelism for the fast runner: a model too big for one GPU split across the ranks of a process group.

Each decoder layer is split the usual way for a column-then-row pair of matrix products. The query, key and value
projections and the gate and up projections are split by output rows, so a rank computes its own attention heads
and its own slice of the MLP's intermediate width with no communication; the attention output and down projections
are split by input columns, so each rank's product is a partial sum, and one all-reduce after the attention and one
after the MLP make the hidden state whole again on every rank (`speculor.runners.llama.residual_block`). Norms,
biases of the row-split products, the embedding and the output layer are replicated, so the logits — and every
decision taken on them — are the same on every rank.

Key/value heads are split with the query heads. Where a model has fewer key/value heads than ranks, each is
replicated over the ranks whose query heads read it, so every rank still holds at least one; the cache per rank is
then that one head.

No rank materializes the whole model: the architecture is built on the meta device (shapes only), then each
parameter is read from the safetensors files as just this rank's rows or columns (`safe_open` slices) and moved to
the rank's device, and `LlamaWeights.from_model` fuses q/k/v and gate/up per rank as it does for a whole model.
The result is an ordinary `FastRunner` over a shard: its own static KV cache, and on CUDA its own graphs, captured
with the NCCL all-reduces inside.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from speculor.distributed import TensorParallelGroup, collectives
from speculor.errors import SpeculorError
from speculor.loading import LoadedModel, _load_tokenizer
from speculor.runners.fast import FastRunner
from speculor.runners.llama import OFFSET_NORM_MODEL_TYPES, LlamaWeights, unsupported_reason

# Which dimension of each projection a rank holds: output rows (a column-parallel product) or input columns (a
# row-parallel one, whose partial sums are all-reduced), and which split — query heads, key/value heads or the MLP's
# intermediate width — picks the rank's part. Every other parameter is replicated.
ROW_SPLITS = {"q_proj": "query", "k_proj": "kv", "v_proj": "kv", "gate_proj": "mlp", "up_proj": "mlp"}
COLUMN_SPLITS = {"o_proj": "query", "down_proj": "mlp"}

# Reads parameter `name` (full shape `shape`), keeping only `rows` × `columns`, as a tensor on the rank's device.
TensorSource = Callable[[str, torch.Size, slice, slice], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which heads and which part of the MLP a rank holds: rank `rank` of `size`."""

    rank: int
    size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def for_model(cls, model: PreTrainedModel, rank: int, size: int) -> ShardPlan:
        """The plan for `model` (its shapes, which may be on the meta device), checking that it divides."""
        config = model.config
        attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        plan = cls(
            rank=rank,
            size=size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=attention.head_dim,
            intermediate_size=int(mlp.gate_proj.weight.shape[0]),
        )
        plan.check()
        return plan

    def check(self) -> None:
        problems = []
        if self.heads % self.size:
            problems.append(f"{self.heads} attention heads")
        if self.intermediate_size % self.size:
            problems.append(f"an MLP width of {self.intermediate_size}")
        if self.kv_heads % self.size and self.size % self.kv_heads:
            problems.append(f"{self.kv_heads} key/value heads (need a multiple or a divisor of the rank count)")
        if problems:
            raise SpeculorError(f"cannot split the model over {self.size} ranks: {', '.join(problems)}")

    @property
    def rank_heads(self) -> int:
        return self.heads // self.size

    @property
    def rank_kv_heads(self) -> int:
        """At least one: key/value heads are replicated where there are fewer than ranks."""
        return max(self.kv_heads // self.size, 1)

    @property
    def first_kv_head(self) -> int:
        if self.kv_heads >= self.size:
            return self.rank * self.rank_kv_heads
        return self.rank // (self.size // self.kv_heads)

    def part(self, split: str) -> slice:
        """This rank's rows of a projection's output (or columns of its input) for a split."""
        if split == "query":
            width = self.rank_heads * self.head_dim
            return slice(self.rank * width, (self.rank + 1) * width)
        if split == "kv":
            start = self.first_kv_head * self.head_dim
            return slice(start, start + self.rank_kv_heads * self.head_dim)
        width = self.intermediate_size // self.size
        return slice(self.rank * width, (self.rank + 1) * width)


def meta_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The architecture without weights (parameters on the meta device take no memory)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def shard_weights(
    model: PreTrainedModel,
    plan: ShardPlan,
    device: torch.device,
    dtype: torch.dtype,
    read: TensorSource,
    process_group: dist.ProcessGroup | None,
) -> LlamaWeights:
    """Fill `model`'s meta parameters with this rank's shard from `read` and rebuild its computed buffers on
    `device`, then collect the fast runner's weights with this rank's head counts and the group to reduce over
    (None for a whole model: a plan of one rank). A parameter shared by two modules (tied embeddings) stays
    shared."""
    reason = unsupported_reason(model, 0)
    if reason is not None:
        raise SpeculorError(f"the fast runner cannot shard {type(model).__name__}: {reason}")
    loaded: dict[int, torch.nn.Parameter] = {}
    everything = slice(None)
    for module_name, module in model.named_modules():
        role = module_name.rsplit(".", 1)[-1]
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) not in loaded:
                rows = plan.part(ROW_SPLITS[role]) if role in ROW_SPLITS else everything
                columns = plan.part(COLUMN_SPLITS[role]) if role in COLUMN_SPLITS and name == "weight" else everything
                tensor = read(f"{module_name}.{name}", parameter.shape, rows, columns)
                loaded[id(parameter)] = torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
            module._parameters[name] = loaded[id(parameter)]
    backbone = model.model
    with torch.device(device):
        backbone.rotary_emb = type(backbone.rotary_emb)(config=model.config)
    if hasattr(backbone.embed_tokens, "scalar_embed_scale"):
        backbone.embed_tokens.embed_scale = torch.tensor(backbone.embed_tokens.scalar_embed_scale, device=device)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise SpeculorError(f"no weights for {', '.join(left[:5])} of {type(model).__name__}")
    weights = LlamaWeights.from_model(model)
    return dataclasses.replace(weights, heads=plan.rank_heads, kv_heads=plan.rank_kv_heads, group=process_group)


@contextmanager
def checkpoint_source(directory: Path) -> Iterator[TensorSource]:
    """A `TensorSource` over a directory's safetensors files (one file, or shards listed in
    model.safetensors.index.json), reading each tensor's slice only."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = json.loads(index.read_text())["weight_map"]
    elif (directory / "model.safetensors").exists():
        with safe_open(directory / "model.safetensors", framework="pt") as handle:
            files = dict.fromkeys(handle.keys(), "model.safetensors")
    else:
        raise SpeculorError(f"{directory} holds no safetensors weights, which tensor parallelism loads shard by shard")
    with ExitStack() as stack:
        handles = {
            name: stack.enter_context(safe_open(directory / name, framework="pt")) for name in set(files.values())
        }

        def read(name: str, shape: torch.Size, rows: slice, columns: slice) -> torch.Tensor:
            if name not in files:
                raise SpeculorError(f"{directory} has no tensor {name!r}")
            part = handles[files[name]].get_slice(name)
            return part[rows] if len(shape) == 1 else part[rows, columns]

        yield read


def random_source(seed: int, device: torch.device, offset_norms: bool) -> TensorSource:
    """A `TensorSource` of random weights made directly at the shard's shape (benchmarks of models nobody needs to
    download): norm weights 1 (0 where the model adds 1 itself, `offset_norms`), other weights normal with std
    0.02."""
    generator = torch.Generator(device).manual_seed(seed)

    def read(name: str, shape: torch.Size, rows: slice, columns: slice) -> torch.Tensor:
        size = [len(range(*rows.indices(shape[0]))), *shape[1:]]
        if len(shape) > 1:
            size[1] = len(range(*columns.indices(shape[1])))
        if "norm" in name:
            return torch.zeros(size, device=device) if offset_norms else torch.ones(size, device=device)
        return torch.empty(size, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=generator)

    return read


class TensorParallelRunner(FastRunner):
    """A `FastRunner` over one rank's shard, from a checkpoint directory (`from_pretrained`) or random
    (`random_fast_runner`). Every rank must make the same calls in the same order; a collective failing
    because another rank died surfaces as a `SpeculorError` naming this rank."""

    def __init__(self, model: PreTrainedModel, weights: LlamaWeights, group: TensorParallelGroup, **options) -> None:
        self.group = group
        super().__init__(model, weights=weights, **options)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, group: TensorParallelGroup, dtype: torch.dtype, **options
    ) -> TensorParallelRunner:
        """Load this rank's shard of the checkpoint in `directory` (options as for `FastRunner`)."""
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise SpeculorError(f"tensor parallelism loads a local model directory; {str(directory)!r} is not one")
        config = AutoConfig.from_pretrained(path)
        model = meta_model(config, dtype)
        if (path / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(path)
        plan = ShardPlan.for_model(model, group.rank, group.size)
        with checkpoint_source(path) as read:
            weights = shard_weights(model, plan, group.device, dtype, read, group.group)
        model.config.name_or_path = str(path)
        return cls(model, weights, group, **options)

    def extend(self, slot: int, token_ids: torch.Tensor) -> None:
        with collectives(self.group):
            super().extend(slot, token_ids)

    def extend_rows(self, slots: Sequence[int], token_ids: Sequence[torch.Tensor]) -> None:
        with collectives(self.group):
            super().extend_rows(slots, token_ids)

    def step(self, slots: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        with collectives(self.group):
            return super().step(slots, token_ids)

    def warm_up(self, widths: Sequence[int]) -> None:
        with collectives(self.group):
            super().warm_up(widths)


def load_sharded_target(
    source: str | os.PathLike | PreTrainedModel, group: TensorParallelGroup, dtype: torch.dtype, **options
) -> tuple[LoadedModel, TensorParallelRunner]:
    """A decoder's target under tensor parallelism: this rank's runner, and the model (holding the shard) with the
    directory's tokenizer. `options` go to `FastRunner`. The model of a target loaded so before stands for its
    runner, which is then shared (`speculor bench` builds one decoder per draft over one target): a second copy of
    a shard would not fit beside the first."""
    if isinstance(source, PreTrainedModel):
        held = _sharded_runners.get(source)
        runner = held() if held is not None else None
        if runner is None:
            raise SpeculorError(
                "tensor parallelism loads the target from its directory, each rank reading only its shard: pass the "
                "path, not a loaded model"
            )
        if runner.slots != options.get("slots", 1) or runner.fixed_width != options.get("fixed_width"):
            raise SpeculorError("a sharded target is shared only by decoders of the same batch size and fixed width")
        name = source.config.name_or_path
        return LoadedModel(name, source, _load_tokenizer(name)), runner
    runner = TensorParallelRunner.from_pretrained(source, group, dtype, **options)
    _sharded_runners[runner.model] = weakref.ref(runner)
    name = os.path.expanduser(os.fspath(source))
    return LoadedModel(name, runner.model, _load_tokenizer(name)), runner


# Sharded targets by their model, for decoders given the model of one already loaded (`load_sharded_target`); weak
# both ways, so a shard is freed with the last decoder using it.
_sharded_runners: weakref.WeakKeyDictionary[PreTrainedModel, weakref.ref[TensorParallelRunner]] = (
    weakref.WeakKeyDictionary()
)


def random_fast_runner(
    config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
    group: TensorParallelGroup | None,
    seed: int = 0,
    **options,
) -> FastRunner:
    """A fast runner over random weights of `config`'s shapes, made at the shard's shapes on `device`: this rank's
    shard under `group`, or the whole model (replicated on every rank, as a draft is) without one. For benchmarks
    of models too big to build whole."""
    model = meta_model(config, dtype)
    rank, size = (group.rank, group.size) if group is not None else (0, 1)
    plan = ShardPlan.for_model(model, rank, size)
    read = random_source(seed, device, config.model_type in OFFSET_NORM_MODEL_TYPES)
    weights = shard_weights(model, plan, device, dtype, read, group.group if group is not None else None)
    if group is None:
        return FastRunner(model, weights=weights, **options)
    return TensorParallelRunner(model, weights, group, **options)
