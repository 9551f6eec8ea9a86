"""Tensor parallelism on the CPU: two gloo ranks, launched as torchrun would (one process each, WORLD_SIZE/RANK and
a free port in the environment), must generate exactly what one process generates, agree with each other, and fail
with an error — not hang — when a rank dies.

This file is also the ranks' program: `python tests/test_tensor_parallel.py OUT TARGET DRAFT KV1_TARGET` runs one
rank.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from speculor.cli import main

RANKS = 2
# Generous for a loaded 2-core machine; a hang (a dead rank not noticed) would run into it.
LAUNCH_TIMEOUT_SECONDS = 90
PROMPTS = [[5, 17, 42, 8, 63, 21], [9, 30, 2, 77]]
NEW_TOKENS = 20
GAMMA = 3


def decode_all(decoder) -> dict:
    """The generations both sides compare: the target alone, speculative greedy (rollbacks on every rejection),
    seeded sampling, and a batch of two rows."""
    alone = decoder.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, speculative=False)
    speculative = decoder.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, gamma=GAMMA)
    sampled = decoder.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, gamma=GAMMA, temperature=0.9, seed=7)
    batch = decoder.generate(PROMPTS, max_new_tokens=NEW_TOKENS, gamma=GAMMA)
    return {
        "alone": alone.token_ids,
        "speculative": speculative.token_ids,
        "accepted": speculative.stats.accepted,
        "drafted": speculative.stats.drafted,
        "sampled": sampled.token_ids,
        "batch": [result.token_ids for result in batch],
    }


def make_decoder(target: str, draft: str | None, tensor_parallel: int):
    from speculor import SpeculativeDecoder

    return SpeculativeDecoder(
        target, draft, device="cpu", threads=1, max_batch_size=2, tensor_parallel=tensor_parallel, runner="fast"
    )


def rank_main(out: str, target: str, draft: str, kv1_target: str, bench_target: str, bench_draft: str) -> None:
    """One rank: the generations of `decode_all`, the single-key/value-head target, and `speculor generate`, written
    to OUT.RANK.json; `speculor bench` on the pair with a tokenizer (writing to OUT.bench.RANK); then rank 1 dies
    while rank 0 starts another generation, which must fail."""
    rank = int(os.environ["RANK"])
    decoder = make_decoder(target, draft, RANKS)
    results = decode_all(decoder)
    results["kv1"] = make_decoder(kv1_target, None, RANKS).generate(PROMPTS[1], max_new_tokens=NEW_TOKENS).token_ids
    printed = io.StringIO()
    with redirect_stdout(printed):
        main(
            [
                *("generate", "--target", target, "--draft", draft, "--json", "--device", "cpu", "--runner", "fast"),
                *("--prompt-ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens", str(NEW_TOKENS)),
                *("--gamma", str(GAMMA), "--threads", "1", "--tensor-parallel", str(RANKS)),
            ]
        )
    results["printed"] = printed.getvalue()
    prompts = Path(f"{out}.prompts.{rank}.jsonl")
    prompts.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n")
    results["bench"] = main(
        [
            *("bench", "--target", bench_target, "--draft", bench_draft, "--gamma", "2", "--prompts", str(prompts)),
            *("--num-prompts", "1", "--max-new-tokens", "6", "--warmup", "0", "--device", "cpu", "--threads", "1"),
            *("--tensor-parallel", str(RANKS), "--out", f"{out}.bench.{rank}"),
        ]
    )
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))
    if rank == 1:
        os._exit(3)
    decoder.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(arguments: list[str], timeout: float) -> list[subprocess.CompletedProcess]:
    """Run `python ARGUMENTS` as RANKS processes of one gloo group, as torchrun would; fail (after killing them) if
    they have not all ended within `timeout` seconds."""
    port = free_port()
    processes = []
    for rank in range(RANKS):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(RANKS))
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", SPECULOR_TP_TIMEOUT="20")
        command = [sys.executable, *arguments]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    finished = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            finished.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks did not finish within {timeout} s (a hang)")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return finished


def save_model(path: Path, seed: int, noise_from: Path | None = None, **overrides) -> str:
    """A tiny float32 Llama saved as safetensors. With `noise_from`, that model's weights plus noise on the output
    layer: a draft that agrees with it often but not always, so speculative steps both accept and roll back."""
    from conftest import build, tiny_llama_config
    from transformers import LlamaForCausalLM

    model = build(LlamaForCausalLM, tiny_llama_config(**overrides), seed, torch.float32)
    if noise_from is not None:
        model = LlamaForCausalLM.from_pretrained(noise_from)
        with torch.no_grad():
            model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * model.lm_head.weight.std() * 0.6)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tensor_parallel")
    torch.manual_seed(0)
    target = save_model(root / "target", seed=20)
    return {
        "target": target,
        "draft": save_model(root / "draft", seed=21, noise_from=Path(target)),
        "kv1_target": save_model(root / "kv1_target", seed=22, num_key_value_heads=1),
    }


def test_two_ranks_generate_what_one_process_generates_and_fail_together(
    model_paths, text_pair_dirs, tmp_path, one_torch_thread
):
    """One launch (starting processes is most of the time): equal output, then a rank's death."""
    out = tmp_path / "ranks"
    paths = [model_paths["target"], model_paths["draft"], model_paths["kv1_target"], *map(str, text_pair_dirs)]
    survivor, dead = launch([__file__, str(out), *paths], LAUNCH_TIMEOUT_SECONDS)
    assert dead.returncode == 3, dead.stderr[-3000:]
    assert survivor.returncode != 0
    assert "lost the group" in survivor.stderr, survivor.stderr[-3000:]

    per_rank = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(RANKS)]
    assert per_rank[1].pop("printed") == "", "only rank 0 prints"
    printed = json.loads(per_rank[0].pop("printed"))
    assert per_rank[0] == per_rank[1]
    assert per_rank[0].pop("bench") == 0
    assert (tmp_path / "ranks.bench.0" / "best_config.json").exists()
    assert not (tmp_path / "ranks.bench.1").exists(), "only rank 0 writes"

    expected = decode_all(make_decoder(model_paths["target"], model_paths["draft"], 1))
    expected["kv1"] = (
        make_decoder(model_paths["kv1_target"], None, 1).generate(PROMPTS[1], max_new_tokens=NEW_TOKENS).token_ids
    )
    assert per_rank[0] == expected
    assert printed["token_ids"] == expected["speculative"]
    assert 0 < expected["accepted"] < expected["drafted"], "the draft must both agree and disagree (rollbacks)"
    assert expected["speculative"] == expected["alone"]
    for tokens in (expected["alone"], expected["sampled"], expected["kv1"], *expected["batch"]):
        assert len(set(tokens)) > 4, f"a random model repeating itself proves little: {tokens}"


def test_tensor_parallel_needs_one_process_per_rank(model_paths):
    from speculor.errors import SpeculorError

    with pytest.raises(SpeculorError, match="torchrun --nproc-per-node 2"):
        make_decoder(model_paths["target"], None, 2)


def test_hf_runner_refuses_tensor_parallel(model_paths):
    from speculor import SpeculativeDecoder
    from speculor.errors import SpeculorError

    with pytest.raises(SpeculorError, match="Hugging Face runner does not shard"):
        SpeculativeDecoder(model_paths["target"], device="cpu", runner="hf", tensor_parallel=2)


def test_shard_plan_replicates_key_value_heads_where_fewer_than_ranks():
    from speculor.runners.tensor_parallel import ShardPlan

    plans = [ShardPlan(rank, 4, heads=8, kv_heads=2, head_dim=16, intermediate_size=64) for rank in range(4)]
    assert [plan.first_kv_head for plan in plans] == [0, 0, 1, 1]
    assert {plan.rank_kv_heads for plan in plans} == {1}
    assert [plan.part("query") for plan in plans] == [slice(32 * r, 32 * (r + 1)) for r in range(4)]
    assert [plan.part("mlp") for plan in plans] == [slice(16 * r, 16 * (r + 1)) for r in range(4)]


def test_shard_plan_refuses_shapes_that_do_not_divide():
    from speculor.errors import SpeculorError
    from speculor.runners.tensor_parallel import ShardPlan

    with pytest.raises(SpeculorError, match="3 key/value heads"):
        ShardPlan(0, 2, heads=6, kv_heads=3, head_dim=8, intermediate_size=64).check()


if __name__ == "__main__":
    rank_main(*sys.argv[1:])
