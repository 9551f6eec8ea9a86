import csv
import io
import json
import os
import re

import pytest
import torch
from rich.console import Console

import speculor.api
from speculor.bench_report import (
    PLOTS,
    BenchConfig,
    ConfigResult,
    PromptRun,
    adaptive_comparisons,
    batch_run,
    best_config,
    plot_throughput_vs_latency,
    print_table,
    summarize,
)
from speculor.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Commands set torch's CPU thread count for the whole process; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def stats(**values) -> dict:
    base = {
        "drafted": 0,
        "accepted": 0,
        "new_tokens": 10,
        "target_forwards": 10,
        "draft_forwards": 0,
        "accepted_by_position": [],
        "drafted_by_position": [],
        "wall_seconds": 1.0,
        "draft_seconds": 0.0,
        "verify_seconds": 1.0,
        "prefill_seconds": 0.0,
        "time_to_first_token": 0.1,
    }
    base.update(values)
    base["tokens_per_second"] = base["new_tokens"] / base["wall_seconds"]
    return base


def made_up_results() -> tuple[ConfigResult, ConfigResult]:
    """Baseline: 10 tokens in 1 s and 0.5 s (10 and 20 tok/s), 0.1 s per target forward. The draft configuration
    runs two γ=2 steps per prompt: all accepted, then one accepted and one rejected (3 of 4, one rejection)."""
    baseline = ConfigResult(
        BenchConfig(0.0), [PromptRun(0, stats(), [1] * 5), PromptRun(1, stats(wall_seconds=0.5), [2] * 5)]
    )
    drafting = {
        "drafted": 4,
        "accepted": 3,
        "new_tokens": 5,
        "target_forwards": 2,
        "draft_forwards": 4,
        "draft_seconds": 0.04,
        "drafted_by_position": [2, 2],
        "accepted_by_position": [2, 1],
    }
    config = BenchConfig(0.0, "fixed", draft="tiny-draft", gamma=2)
    result = ConfigResult(
        config,
        [
            PromptRun(0, stats(**drafting, wall_seconds=5 / 15), [1] * 5, rejections=1),
            PromptRun(1, stats(**drafting, wall_seconds=0.1), [2, 2, 2, 2, 9], rejections=1),
        ],
    )
    return baseline, result


def test_summary_matches_hand_computed_values():
    baseline, result = made_up_results()
    row = summarize(result, baseline)
    assert row["tar"] == pytest.approx(6 / 8)
    assert row["alpha"] == pytest.approx(6 / 8)  # 6 accepted, 2 rejections
    assert row["mean_gamma"] == pytest.approx(2.0)
    assert row["mean_accepted_length"] == pytest.approx(2.5)
    assert row["acceptance_by_position"] == [1.0, 0.5]
    # tok/s 15 and 50 against 10 and 20: speedups 1.5 and 2.5.
    assert row["speedup_median"] == pytest.approx(2.0)
    assert row["speedup_by_prompt"] == pytest.approx([1.5, 2.5])
    # 0.08 s over 8 draft forwards; 2 s over 4 target forwards.
    assert row["draft_ms_per_forward"] == pytest.approx(10.0)
    assert row["verify_ms_per_forward"] == pytest.approx(500.0)
    assert row["tokens_per_second_median"] == pytest.approx(32.5)
    # 0.01 s per draft forward over 0.1 s per target forward.
    assert row["cost_ratio"] == pytest.approx(0.1)
    # E(0.75, 2) = (1 - 0.75³) / 0.25 = 2.3125; / (2 · 0.1 + 1).
    assert row["predicted_speedup"] == pytest.approx(2.3125 / 1.2)
    assert (row["greedy_identical"], row["greedy_checked"]) == (1, 2)
    assert summarize(baseline, baseline)["speedup_median"] == pytest.approx(1.0)


def test_best_config_and_vllm_equivalent():
    baseline, result = made_up_results()
    rows = [summarize(baseline, baseline), summarize(result, baseline)]
    best = best_config(rows, "tiny-target", [0.0])
    assert {key: best[key] for key in ("target", "draft", "gamma", "temperature")} == {
        "target": "tiny-target",
        "draft": "tiny-draft",
        "gamma": 2,
        "temperature": 0.0,
    }
    assert best["vllm_speculative_config"] == {"model": "tiny-draft", "num_speculative_tokens": 2}
    ngram_row = dict(rows[1], draft=None, ngram=3, drafter="ngram:3", speedup_median=3.0)
    assert best_config([*rows, ngram_row], "t", [0.0])["vllm_speculative_config"] == {
        "method": "ngram",
        "num_speculative_tokens": 2,
        "prompt_lookup_max": 3,
        "prompt_lookup_min": 1,
    }
    slow = dict(rows[1], speedup_median=0.8)
    nothing = best_config([rows[0], slow], "t", [0.0])
    assert "gamma" not in nothing and "draft" not in nothing and nothing["vllm_speculative_config"] is None


def test_best_config_names_local_models_by_absolute_path_and_hub_ids_as_given(tmp_path, monkeypatch):
    """bench is given paths relative to where it runs; the file it writes must work from any directory."""
    (tmp_path / "models" / "draft").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    baseline, result = made_up_results()
    result = ConfigResult(BenchConfig(0.0, "fixed", draft="models/draft", gamma=2), result.runs)
    rows = [summarize(baseline, baseline), summarize(result, baseline)]
    best = best_config(rows, "org/hub-target", [0.0])
    draft = str(tmp_path / "models" / "draft")
    assert best["target"] == "org/hub-target" and best["draft"] == best["by_temperature"][0]["draft"] == draft
    assert best["vllm_speculative_config"] == {"model": draft, "num_speculative_tokens": 2}


def terminal_rows(batch_sizes: tuple[int, ...]) -> list[dict]:
    """Summary rows as a large sweep makes them: three drafters (one a long hub id), every γ policy, two
    temperatures, wide numbers (five-digit tokens/s)."""
    rows = []
    drafters = ("speculor/models/draft-4x128-long", "meta-llama/Llama-3.1-8B-Instruct", "ngram:3")
    policies = [*(("fixed", gamma) for gamma in (1, 2, 4, 6, 8)), ("confidence", 8), ("leviathan", 8)]
    for size in batch_sizes:
        for temperature in (0.0, 0.8):
            greedy = temperature == 0
            configs = [("target alone", "target", None)]
            configs += [(drafter, policy, gamma) for drafter in drafters for policy, gamma in policies]
            configs += [(drafter, "load-aware", None) for drafter in drafters]
            for drafter, policy, gamma in configs:
                alone = policy == "target"
                rows.append(
                    {
                        "drafter": drafter,
                        "policy": policy,
                        "gamma": gamma,
                        "temperature": temperature,
                        "batch_size": size,
                        "tar": None if alone else 0.7345,
                        "mean_accepted_length": 1.0 if alone else 3.92,
                        "tokens_per_second_median": 11428.34,
                        "row_tokens_per_second_median": 178.56,
                        "gamma_per_step": 3.46 if policy == "load-aware" else None,
                        "speedup_median": 1.0 if alone else 1.503,
                        "greedy_identical": 20 if greedy and not alone else None,
                        "greedy_checked": 20 if greedy and not alone else None,
                    }
                )
    return rows


@pytest.mark.parametrize("batch_sizes", [(1,), (1, 64)])
def test_the_terminal_table_fits_80_columns_with_every_number_whole(batch_sizes):
    console = Console(file=io.StringIO(), width=80, record=True, highlight=False)
    print_table(terminal_rows(batch_sizes), console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    shown = ["11428.3", "0.735", "3.92", "1.50x", "20/20", "conf", "Lev", "auto", "draft-4x128-long"]
    if len(batch_sizes) > 1:
        shown += ["178.6", "3.46", "batch size 64"]
    assert all(number in text for number in shown)


def test_adaptive_rows_are_compared_with_the_best_fixed_gamma_of_their_drafter():
    baseline, result = made_up_results()
    fixed = summarize(result, baseline)
    leviathan = dict(fixed, policy="leviathan", label="lev", speedup_median=2.2, speedup_by_prompt=[1.6, 2.4])
    confidence = dict(fixed, policy="confidence", label="conf", speedup_median=1.1, speedup_by_prompt=[1.0, 1.2])
    verdicts = {
        item["label"]: (item["beats_best_fixed"], item["prompts_won"], item["prompts"])
        for item in adaptive_comparisons([fixed, leviathan, confidence])
    }
    assert verdicts == {"lev": (True, 1, 2), "conf": (False, 0, 2)}


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n" + json.dumps({"turns": ["Hello world!"]}) + "\n")
    return path


def test_bench_command_writes_every_output(text_pair_dirs, prompt_file, tmp_path, capsys):
    target, draft = text_pair_dirs
    out = tmp_path / "out"
    argv = ["bench", "--target", str(target), "--draft", str(draft), "--ngram", "2", "--gamma", "1,2"]
    argv += ["--temperature", "0,0.8", "--adaptive", "--prompts", str(prompt_file), "--num-prompts", "2"]
    argv += [
        "--max-new-tokens",
        "8",
        "--dtype",
        "float64",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    assert main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    rows = results["configs"]
    # Per temperature: the target alone, the draft at γ 1 and 2 plus three adaptive policies, n-gram at γ 1 and 2 plus
    # the load-aware policy.
    assert len(rows) == 2 * (1 + 5 + 3)
    assert {row["policy"] for row in rows} == {"target", "fixed", "confidence", "leviathan", "load-aware"}
    for row in rows:
        assert row["prompts"] == 2
        assert row["tokens_per_second_median"] > 0
        assert row["tokens_per_second_p10"] <= row["tokens_per_second_median"] <= row["tokens_per_second_p90"]
    draft_rows = [row for row in rows if row["draft"] == str(draft) and row["policy"] == "fixed"]
    assert all(row["cost_ratio"] > 0 and row["predicted_speedup"] > 0 for row in draft_rows)
    greedy = [row for row in rows if row["temperature"] == 0 and row["policy"] != "target"]
    assert all(row["greedy_identical"] == row["greedy_checked"] == 2 for row in greedy)
    assert results["meta"]["command"].startswith("speculor bench --target ")
    assert results["meta"]["leviathan_cost_ratios"][str(draft)] > 0
    assert results["meta"]["cpu_threads"] == torch.get_num_threads() >= 1
    assert len(results["per_prompt"]) == len(rows)

    with (out / "results.csv").open() as handle:
        assert [line["label"] for line in csv.DictReader(handle)] == [row["label"] for row in rows]
    for name in ("speedup_vs_gamma.png", "tar_vs_cost.png", "throughput_vs_latency.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
    best = json.loads((out / "best_config.json").read_text())
    assert best["target"] == str(target) and best["temperature"] == 0.0
    assert [choice["temperature"] for choice in best["by_temperature"]] == [0.0, 0.8]
    vllm = json.loads((out / "vllm_speculative_config.json").read_text())
    assert vllm == best["vllm_speculative_config"]
    if vllm is not None:
        assert best["gamma"] in (1, 2) and ("draft" in best or "ngram" in best)
    report = (out / "report.md").read_text()
    assert "## Recommendation" in report and "16/16 generations identical" in report
    console = capsys.readouterr().out
    assert "speculor bench" in console
    assert re.search(r"^T=0: ", console, re.MULTILINE) and re.search(r"^T=0\.8: ", console, re.MULTILINE)


def test_bench_prices_itself_first_and_ctrl_c_saves_what_every_configuration_finished(
    text_pair_dirs, prompt_file, tmp_path, capsys, monkeypatch
):
    """Ctrl-C during the second prompt's second configuration: the first prompt, which both configurations finished,
    is saved and said to be; the cost (generations, an estimate of the time) was printed before the first one."""
    target, _ = text_pair_dirs
    real_run_batch, calls = speculor.api.run_batch, []

    def interrupted_on_the_fourth_run(*arguments, **options):
        calls.append(None)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_run_batch(*arguments, **options)

    monkeypatch.setattr(speculor.api, "run_batch", interrupted_on_the_fourth_run)
    out = tmp_path / "out"
    argv = ["bench", "--target", str(target), "--ngram", "2", "--gamma", "2", "--prompts", str(prompt_file)]
    argv += ["--max-new-tokens", "4", "--dtype", "float64", "--device", "cpu", "--warmup", "0", "--out", str(out)]
    assert main(argv) == 130
    printed = capsys.readouterr()
    assert re.search(r"2 configurations, 4 generations of up to 4 tokens .*this takes about \d+ s", printed.err)
    assert f"interrupted: saved what every configuration finished, 1 of 2 prompts, to {out}" in printed.out
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["interrupted"] is True
    assert [row["prompts"] for row in results["configs"]] == [1, 1]
    assert "interrupted (Ctrl-C)" in (out / "report.md").read_text()


def test_best_config_works_from_another_directory(text_pair_dirs, prompt_file, tmp_path, monkeypatch, capsys):
    target, draft = text_pair_dirs
    monkeypatch.chdir(target.parent)
    argv = ["bench", "--target", target.name, "--draft", draft.name, "--gamma", "1", "--prompts", str(prompt_file)]
    argv += ["--max-new-tokens", "4", "--dtype", "float64", "--device", "cpu", "--warmup", "0", "--out", "out"]
    assert main(argv) == 0
    config = target.parent / "out" / "best_config.json"
    best = json.loads(config.read_text())
    assert best["target"] == str(target) and best.get("draft", str(draft)) == str(draft)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["generate", "--config", os.path.relpath(config), "--prompt", "x = 1", "--max-new-tokens", "4"]) == 0
    assert f"target {target}" in capsys.readouterr().err


def test_bench_needs_a_drafter(text_pair_dirs, tmp_path, capsys):
    target, _ = text_pair_dirs
    assert main(["bench", "--target", str(target), "--out", str(tmp_path)]) == 2
    assert "--draft or --ngram" in capsys.readouterr().err


def plot_row(drafter: str, policy: str, gamma: int | None, temperature: float, speedup: float) -> dict:
    """The fields the plots read, with made-up values that grow with γ."""
    step = gamma or 1
    return {
        "drafter": drafter,
        "policy": policy,
        "gamma": gamma,
        "temperature": temperature,
        "speedup_median": speedup,
        "predicted_speedup": None if policy == "target" else speedup + 0.2,
        "mean_gamma": step - 0.5 if policy not in ("target", "fixed") else None,
        "tar": None if policy == "target" else 0.9 - 0.1 * step,
        "cost_ratio": None if policy == "target" else 0.2 + 0.01 * step,
        "ttft_ms_median": 10.0 + step,
        "batch_size": 1,
        "tokens_per_second_median": 50.0 * speedup,
    }


def test_plots_tick_measured_gammas_and_carry_a_legend(tmp_path):
    rows = []
    for temperature in (0.0, 0.8):
        rows.append(plot_row("target alone", "target", None, temperature, 1.0))
        for drafter in ("models/draft-a", "ngram:3"):
            rows += [plot_row(drafter, "fixed", gamma, temperature, 1 + gamma / 10) for gamma in (1, 2, 3)]
        rows.append(plot_row("models/draft-a", "confidence", 3, temperature, 1.25))
    for name, plot in PLOTS.items():
        figure = plot(rows, tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
        panels = [axes for axes in figure.axes if axes.get_title()]
        assert [axes.get_title() for axes in panels] == ["T=0", "T=0.8"], name
        labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
        assert {"draft-a", "ngram:3"} <= set(labels), name
        if name == "speedup_vs_gamma.png":
            assert all(list(axes.get_xticks()) == [1, 2, 3] for axes in panels)
            assert "confidence threshold (adaptive γ)" in labels and "Leviathan γ (adaptive γ)" not in labels
        if name == "throughput_vs_latency.png":
            assert "target alone" in labels


def test_throughput_vs_latency_labels_never_cover_each_other(tmp_path):
    """Configurations that measure almost alike (here two drafters whose points nearly coincide) must still get
    readable labels: no label's box may overlap another's."""
    rows = [plot_row("target alone", "target", None, 0.0, 1.0)]
    for drafter, nudge in (("models/draft-a", 0.0), ("ngram:3", 0.004)):
        rows += [plot_row(drafter, "fixed", gamma, 0.0, 1.2 + nudge) for gamma in (1, 2, 3, 4)]
    figure = plot_throughput_vs_latency(rows, tmp_path / "plot.png")
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for axes in figure.axes for text in axes.texts]
    assert len(boxes) == 8
    assert not any(first.overlaps(second) for index, first in enumerate(boxes) for second in boxes[index + 1 :])


def test_bench_sweeps_batch_sizes_with_the_load_aware_policy(text_pair_dirs, prompt_file, tmp_path):
    target, _ = text_pair_dirs
    out = tmp_path / "out"
    argv = ["bench", "--target", str(target), "--ngram", "2", "--gamma", "2", "--batch-size", "1,3", "--prompts"]
    argv += [str(prompt_file), "--max-new-tokens", "6", "--dtype", "float64", "--device", "cpu", "--threads", "1"]
    assert main([*argv, "--warmup", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(row["batch_size"], row["policy"]): row for row in results["configs"]}
    assert set(rows) == {(size, policy) for size in (1, 3) for policy in ("target", "fixed", "load-aware")}
    # Batch size 3 over 2 prompts: one full batch, the first prompt twice.
    assert [row["rows"] for (size, _), row in rows.items() if size == 3] == [3, 3, 3]
    checked = [row for row in rows.values() if row["greedy_checked"] is not None]
    assert len(checked) == 4 and all(row["greedy_identical"] == row["greedy_checked"] == row["rows"] for row in checked)
    # γ as drafted: a lookup that finds nothing in these short texts is a step at γ 0.
    assert rows[3, "fixed"]["gamma_steps"].keys() <= {"0", "1", "2"} and sum(rows[3, "fixed"]["gamma_steps"].values())
    assert sum(rows[3, "load-aware"]["gamma_steps"].values()) > 0
    assert results["meta"]["batch_sizes"] == [1, 3] and "--batch-size 1,3" in results["meta"]["command"]
    assert (out / "batch_scaling.png").read_bytes().startswith(PNG_SIGNATURE)
    report = (out / "report.md").read_text()
    assert "## By batch size" in report and "![batch_scaling.png](batch_scaling.png)" in report


def test_a_batch_run_adds_its_rows_up_and_keeps_each_rows_rate():
    """Two rows of 10 tokens each in a 0.5 s batch: 40 tok/s total; each row keeps its own rate. The baseline batch
    took 1 s, so the speedup is 2; one of the two rows matches the baseline's output."""
    rows = [
        stats(drafted=4, accepted=3, draft_forwards=4, drafted_by_position=[2, 2], accepted_by_position=[2, 1]),
        stats(wall_seconds=0.5, drafted=2, accepted=2, drafted_by_position=[2], accepted_by_position=[2]),
    ]
    rows[0]["gamma_steps"], rows[1]["gamma_steps"] = {2: 2, 0: 1}, {"2": 1}
    run = batch_run(0, rows, [[1, 2], [3, 4]], wall_seconds=0.5, rejections=None)
    assert run.stats["new_tokens"] == 20 and run.stats["tokens_per_second"] == pytest.approx(40.0)
    assert run.stats["row_tokens_per_second"] == [10.0, 20.0] and run.stats["rows"] == 2
    assert run.stats["drafted_by_position"] == [4, 2] and run.stats["accepted_by_position"] == [4, 1]
    assert run.stats["gamma_steps"] == {0: 1, 2: 3}
    alone = [stats(), stats()]
    for row in alone:
        row["gamma_steps"] = {0: 10}
    baseline = ConfigResult(BenchConfig(0.0, batch_size=2), [batch_run(0, alone, [[1, 2], [3, 5]], 1.0, 0)])
    row = summarize(ConfigResult(BenchConfig(0.0, "load-aware", ngram=2, batch_size=2), [run]), baseline)
    assert row["speedup_median"] == pytest.approx(2.0) and row["row_tokens_per_second_median"] == pytest.approx(15.0)
    assert (row["greedy_identical"], row["greedy_checked"], row["rows"]) == (1, 2, 2)
    assert row["alpha"] is None and row["tar"] == pytest.approx(5 / 6)
    assert row["gamma_per_step"] == pytest.approx(1.5) and row["label"] == "ngram:2, load-aware γ, T=0, B=2"
