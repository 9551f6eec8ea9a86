"""What `speculor bench` makes of its measurements: per-configuration summaries, the recommendation, and the files.

Everything here works on plain records (no models), so it can be tested on made-up numbers. `speculor.bench`
produces the records; this module turns them into `results.json`, `results.csv`, the PNG plots, `report.md`,
`best_config.json`, `vllm_speculative_config.json` and the terminal table.

Definitions (per configuration, over the same prompts as the target-alone baseline at the same temperature):
- TAR = Σ accepted / Σ drafted; mean accepted length = Σ new tokens / Σ target forwards (bonus token included);
  acceptance by position i = accepted at i / drafted at i.
- α = Σ accepted / (Σ accepted + steps that ended at a rejection): per-token acceptance, free of γ's bias.
- tokens/s, time to first token and ms per token are taken per prompt, then the median (p10, p90) is reported;
  speedup is the ratio of tokens/s to the baseline's on the same prompt, then the median over prompts.
- c = draft time per draft step / target time per step of the baseline (one-token forwards, as in Leviathan et al.);
  a draft step is a draft-model forward, or one lookup (one per target step) for prompt lookup.
- predicted speedup = E(α, γ̄) / (γ̄·c + 1) with γ̄ the mean number of tokens drafted per drafting step; draft
  models only, since the model assumes a cost per drafted token and a proposal at every step.
- batch size B > 1: each run is one batch of B rows generated together, so its tokens/s is the batch's total (all
  rows' tokens over the batch's wall time) and its speedup is against the target alone on the same batch; per-row
  tokens/s is each row's own rate; γ per step is what the steps drafted (the load-aware policy's choices), averaged
  over row-steps. The recommendation (best_config.json) is made at the smallest batch size swept.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from speculor.analysis import alpha_from_counts, cost_ratio, predicted_speedup
from speculor.wording import counted

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ADAPTIVE_POLICY_NAMES = {"confidence": "confidence threshold", "leviathan": "Leviathan γ", "load-aware": "load-aware γ"}


@dataclass(frozen=True)
class BenchConfig:
    """One way of decoding: the target alone, or a drafter (draft model or n-gram lookup) with a γ policy."""

    temperature: float
    policy: str = "target"
    draft: str | None = None
    ngram: int | None = None
    gamma: int | None = None
    batch_size: int = 1

    @property
    def drafter(self) -> str:
        if self.draft is not None:
            return self.draft
        if self.ngram is not None:
            return f"ngram:{self.ngram}"
        return "target alone"

    @property
    def label(self) -> str:
        batch = f", B={self.batch_size}" if self.batch_size != 1 else ""
        if self.policy == "target":
            return f"target alone, T={self.temperature:g}{batch}"
        if self.policy == "fixed":
            how = f"γ={self.gamma}"
        elif self.gamma is None:
            how = ADAPTIVE_POLICY_NAMES[self.policy]
        else:
            how = f"{ADAPTIVE_POLICY_NAMES[self.policy]} (γ≤{self.gamma})"
        return f"{self.drafter}, {how}, T={self.temperature:g}{batch}"


@dataclass
class PromptRun:
    """One timed generation: the engine's statistics (`GenerationStats.to_dict()`), the generated ids, and how
    many of its steps ended at a rejected draft (None where the engine chose γ and nothing counted them). At a batch
    size above 1 it is one batch (`batch_run`):
    `prompt_index` numbers the batch, `token_ids` holds one list per row, and `stats` the batch's totals."""

    prompt_index: int
    stats: dict
    token_ids: list[int] | list[list[int]]
    rejections: int | None = 0


SUMMED_STATS = (
    "drafted", "accepted", "new_tokens", "target_forwards", "draft_forwards", "draft_seconds", "verify_seconds",
    "prefill_seconds",
)  # fmt: skip


def batch_run(
    index: int, rows: Sequence[dict], token_ids: list[list[int]], wall_seconds: float, rejections: int | None
) -> PromptRun:
    """One batch's record from its rows' statistics (`GenerationStats.to_dict()` each) and the batch's wall time.
    Counters and per-step times add up over rows, so ratios of them (TAR, mean accepted length, c) keep their
    meaning; tokens/s is the batch's total; each row's own rate is kept in `row_tokens_per_second`."""
    stats: dict = {key: sum(row[key] for row in rows) for key in SUMMED_STATS}
    for key in ("drafted_by_position", "accepted_by_position"):
        width = max(len(row[key]) for row in rows)
        stats[key] = [sum(row[key][i] for row in rows if i < len(row[key])) for i in range(width)]
    gamma_steps: dict[int, int] = {}
    for row in rows:
        for gamma, steps in row["gamma_steps"].items():
            gamma_steps[int(gamma)] = gamma_steps.get(int(gamma), 0) + steps
    stats.update(
        gamma_steps=dict(sorted(gamma_steps.items())),
        wall_seconds=wall_seconds,
        tokens_per_second=stats["new_tokens"] / wall_seconds if wall_seconds > 0 else 0.0,
        time_to_first_token=float(np.median([row["time_to_first_token"] for row in rows])),
        row_tokens_per_second=[row["tokens_per_second"] for row in rows],
        rows=len(rows),
    )
    return PromptRun(index, stats, token_ids, rejections)


@dataclass
class ConfigResult:
    config: BenchConfig
    runs: list[PromptRun] = field(default_factory=list)


def _total(runs: Sequence[PromptRun], key: str) -> float:
    return float(sum(run.stats[key] for run in runs))


def _by_position(runs: Sequence[PromptRun]) -> list[float]:
    width = max((len(run.stats["drafted_by_position"]) for run in runs), default=0)
    accepted, drafted = np.zeros(width), np.zeros(width)
    for run in runs:
        accepted[: len(run.stats["accepted_by_position"])] += run.stats["accepted_by_position"]
        drafted[: len(run.stats["drafted_by_position"])] += run.stats["drafted_by_position"]
    return [round(float(a / d), 4) if d else 0.0 for a, d in zip(accepted, drafted, strict=True)]


def _percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    p10, p50, p90 = np.percentile(np.asarray(values, dtype=float), [10, 50, 90])
    return float(p50), float(p10), float(p90)


def measured_cost_ratio(result: ConfigResult, baseline: ConfigResult) -> float | None:
    """c for a configuration (None for the target alone). A draft step is one draft-model forward; a proposer
    without a model (prompt lookup) takes one step per target forward."""
    draft_steps = _total(result.runs, "draft_forwards") or _total(result.runs, "target_forwards")
    target_steps, target_seconds = _total(baseline.runs, "target_forwards"), _total(baseline.runs, "verify_seconds")
    if result.config.policy == "target" or not draft_steps or not target_steps or target_seconds <= 0:
        return None
    return cost_ratio(_total(result.runs, "draft_seconds"), int(draft_steps), target_seconds, int(target_steps))


def _row_token_ids(run: PromptRun, batch_size: int) -> list[list[int]]:
    return [run.token_ids] if batch_size == 1 else list(run.token_ids)


def _gamma_steps(runs: Sequence[PromptRun]) -> dict[int, int]:
    """How many (row) steps drafted each γ, over every run; 0 counts steps that drafted nothing."""
    total: dict[int, int] = {}
    for run in runs:
        for gamma, steps in run.stats.get("gamma_steps", {}).items():
            total[int(gamma)] = total.get(int(gamma), 0) + steps
    return dict(sorted(total.items()))


def summarize(result: ConfigResult, baseline: ConfigResult) -> dict:
    """The summary row of one configuration against the target-alone baseline at its temperature and batch size."""
    config, runs = result.config, result.runs
    baseline_by_prompt = {run.prompt_index: run for run in baseline.runs}
    tokens_per_second = [run.stats["tokens_per_second"] for run in runs]
    speedups = [
        run.stats["tokens_per_second"] / baseline_by_prompt[run.prompt_index].stats["tokens_per_second"]
        for run in runs
        if baseline_by_prompt[run.prompt_index].stats["tokens_per_second"] > 0
    ]
    median_tps, p10_tps, p90_tps = _percentiles(tokens_per_second)
    drafted, accepted = _total(runs, "drafted"), _total(runs, "accepted")
    counted = drafted and all(run.rejections is not None for run in runs)
    alpha = alpha_from_counts(int(accepted), sum(run.rejections or 0 for run in runs)) if counted else None
    # Every step that drafted anything drafted position 0.
    drafting_steps = sum(run.stats["drafted_by_position"][0] for run in runs if run.stats["drafted_by_position"])
    mean_gamma = drafted / drafting_steps if drafting_steps else None
    c = measured_cost_ratio(result, baseline)
    # Leviathan's model charges c per drafted token and assumes every step drafts; it does not describe prompt
    # lookup (a cheap step that often proposes nothing), so lookup gets no prediction.
    modelled = config.draft is not None and None not in (alpha, mean_gamma, c)
    predicted = predicted_speedup(alpha, mean_gamma, c) if modelled else None
    gamma_steps = _gamma_steps(runs)
    row = {
        "label": config.label,
        "drafter": config.drafter,
        "draft": config.draft,
        "ngram": config.ngram,
        "policy": config.policy,
        "gamma": config.gamma,
        "temperature": config.temperature,
        "prompts": len(runs),
        "new_tokens": int(_total(runs, "new_tokens")),
        "tar": accepted / drafted if drafted else None,
        "mean_accepted_length": _total(runs, "new_tokens") / max(_total(runs, "target_forwards"), 1),
        "acceptance_by_position": _by_position(runs),
        "alpha": alpha,
        "mean_gamma": mean_gamma,
        "tokens_per_second_median": median_tps,
        "tokens_per_second_p10": p10_tps,
        "tokens_per_second_p90": p90_tps,
        "ttft_ms_median": 1000 * _percentiles([run.stats["time_to_first_token"] for run in runs])[0],
        "ms_per_token_median": 1000
        * _percentiles([run.stats["wall_seconds"] / max(run.stats["new_tokens"], 1) for run in runs])[0],
        "speedup_median": _percentiles(speedups)[0] if speedups else None,
        "speedup_by_prompt": speedups,
        "batch_size": config.batch_size,
        "rows": sum(run.stats.get("rows", 1) for run in runs),
        "row_tokens_per_second_median": float(
            np.median(
                [
                    rate
                    for run in runs
                    for rate in run.stats.get("row_tokens_per_second", [run.stats["tokens_per_second"]])
                ]
            )
        ),
        "gamma_steps": gamma_steps,
        "gamma_per_step": sum(g * n for g, n in gamma_steps.items()) / sum(gamma_steps.values())
        if gamma_steps
        else None,
        "draft_ms_per_forward": _milliseconds_per(runs, "draft_seconds", "draft_forwards"),
        "verify_ms_per_forward": _milliseconds_per(runs, "verify_seconds", "target_forwards"),
        "cost_ratio": c,
        "predicted_speedup": predicted,
        "greedy_identical": None,
        "greedy_checked": None,
    }
    if config.temperature == 0 and config.policy != "target":
        pairs = [
            pair
            for run in runs
            for pair in zip(
                _row_token_ids(run, config.batch_size),
                _row_token_ids(baseline_by_prompt[run.prompt_index], config.batch_size),
                strict=True,
            )
        ]
        row.update(greedy_identical=sum(mine == theirs for mine, theirs in pairs), greedy_checked=len(pairs))
    return row


def _milliseconds_per(runs: Sequence[PromptRun], seconds_key: str, count_key: str) -> float | None:
    count = _total(runs, count_key)
    return 1000 * _total(runs, seconds_key) / count if count else None


def best_fixed(
    rows: Sequence[dict], temperature: float, drafter: str | None = None, batch_size: int | None = None
) -> dict | None:
    """The fixed-γ row with the highest median speedup at `temperature` and `batch_size` (default: the smallest
    batch size among the rows), optionally for one drafter."""
    batch_size = smallest_batch_size(rows) if batch_size is None else batch_size
    candidates = [
        row
        for row in rows
        if row["policy"] == "fixed"
        and row["temperature"] == temperature
        and row["batch_size"] == batch_size
        and (drafter is None or row["drafter"] == drafter)
        and row["speedup_median"] is not None
    ]
    return max(candidates, key=lambda row: row["speedup_median"], default=None)


def smallest_batch_size(rows: Sequence[dict]) -> int:
    return min((row["batch_size"] for row in rows), default=1)


def recommendation(rows: Sequence[dict], temperature: float) -> dict | None:
    """The best fixed (drafter, γ) at `temperature` and the smallest batch size, or None when no configuration
    beats the target alone there."""
    best = best_fixed(rows, temperature)
    return best if best is not None and best["speedup_median"] > 1 else None


def adaptive_comparisons(rows: Sequence[dict]) -> list[dict]:
    """Each adaptive row against the best fixed γ of the same drafter at the same temperature and batch size."""
    comparisons = []
    for row in rows:
        if row["policy"] in ("target", "fixed") or row["speedup_median"] is None:
            continue
        fixed = best_fixed(rows, row["temperature"], row["drafter"], row["batch_size"])
        if fixed is None:
            continue
        paired = zip(row["speedup_by_prompt"], fixed["speedup_by_prompt"], strict=True)
        comparisons.append(
            {
                "label": row["label"],
                "speedup_median": row["speedup_median"],
                "best_fixed_label": fixed["label"],
                "best_fixed_speedup_median": fixed["speedup_median"],
                "beats_best_fixed": row["speedup_median"] > fixed["speedup_median"],
                "prompts_won": sum(mine > theirs for mine, theirs in paired),
                "prompts": len(row["speedup_by_prompt"]),
                "batch_size": row["batch_size"],
            }
        )
    return comparisons


def model_reference(name: str) -> str:
    """How a written config names a model: a local directory as an absolute path, so that the file works from any
    working directory (bench is given paths relative to where it runs); anything else (a hub id) as given."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def vllm_speculative_config(row: dict | None) -> dict | None:
    """The `speculative_config` that asks vLLM for the same drafting (None: no speculation)."""
    if row is None:
        return None
    if row["ngram"] is not None:
        return {
            "method": "ngram",
            "num_speculative_tokens": row["gamma"],
            "prompt_lookup_max": row["ngram"],
            "prompt_lookup_min": 1,
        }
    return {"model": model_reference(row["draft"]), "num_speculative_tokens": row["gamma"]}


def best_config(rows: Sequence[dict], target: str, temperatures: Sequence[float]) -> dict:
    """What `speculor generate --config` reads: `draft` or `ngram` and `gamma` of the best choice at the first
    temperature (no drafter when the target alone was fastest), plus the choice at every temperature. Local model
    directories are written as absolute paths (`model_reference`)."""
    choices = []
    for temperature in temperatures:
        row = recommendation(rows, temperature)
        choice: dict = {"temperature": temperature}
        if row is not None:
            choice.update({key: row[key] for key in ("draft", "ngram", "gamma") if row[key] is not None})
            if "draft" in choice:
                choice["draft"] = model_reference(choice["draft"])
            choice["speedup_median"] = row["speedup_median"]
            choice["tokens_per_second_median"] = row["tokens_per_second_median"]
        else:
            choice["speedup_median"] = 1.0
        choice["vllm_speculative_config"] = vllm_speculative_config(row)
        choices.append(choice)
    return {"target": model_reference(target), **choices[0], "by_temperature": choices}


def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _throughput(row: dict) -> str:
    low, median, high = (row[f"tokens_per_second_{key}"] for key in ("p10", "median", "p90"))
    return f"{median:.1f} [{low:.1f}–{high:.1f}]"


def _identity(row: dict) -> str:
    return "–" if row["greedy_checked"] is None else f"{row['greedy_identical']}/{row['greedy_checked']}"


def _gamma_text(row: dict) -> str:
    if row["policy"] in ("target", "fixed"):
        return "–" if row["gamma"] is None else str(row["gamma"])
    if row["policy"] == "load-aware":
        return "auto"
    return f"{'conf' if row['policy'] == 'confidence' else 'Lev'} ≤{row['gamma']}"


def _gamma_steps_text(gamma_steps: dict) -> str:
    """ "γ:steps" pairs, e.g. "0:3 2:10 4:40" (0 = a step without speculation)."""
    return " ".join(f"{gamma}:{steps}" for gamma, steps in gamma_steps.items())


TABLE_COLUMNS = (
    ("drafter", lambda row: Path(row["drafter"]).name),
    ("γ", _gamma_text),
    ("T", lambda row: f"{row['temperature']:g}"),
    ("B", lambda row: str(row["batch_size"])),
    ("γ/step", lambda row: _number(row["gamma_per_step"])),
    ("TAR", lambda row: _number(row["tar"], 3)),
    ("α", lambda row: _number(row["alpha"], 3)),
    ("E", lambda row: _number(row["mean_accepted_length"])),
    ("tok/s p50 [p10–p90]", _throughput),
    ("row tok/s", lambda row: _number(row["row_tokens_per_second_median"], 1)),
    ("TTFT ms", lambda row: _number(row["ttft_ms_median"], 1)),
    ("ms/tok", lambda row: _number(row["ms_per_token_median"])),
    ("draft ms", lambda row: _number(row["draft_ms_per_forward"])),
    ("verify ms", lambda row: _number(row["verify_ms_per_forward"])),
    ("c", lambda row: _number(row["cost_ratio"], 3)),
    ("speedup", lambda row: _number(row["speedup_median"]) + "x"),
    ("pred.", lambda row: _number(row["predicted_speedup"]) + ("x" if row["predicted_speedup"] else "")),
    ("greedy ≡", _identity),
)


# The terminal's table: the columns a choice is made on, narrow enough for an 80-column terminal (all 18 of
# TABLE_COLUMNS need about 190). report.md and results.csv keep every column.
TERMINAL_COLUMNS = (
    ("drafter", lambda row: Path(row["drafter"]).name),
    ("γ", _gamma_text),
    ("T", lambda row: f"{row['temperature']:g}"),
    ("TAR", lambda row: _number(row["tar"], 3)),
    ("E", lambda row: _number(row["mean_accepted_length"])),
    ("tok/s", lambda row: _number(row["tokens_per_second_median"], 1)),
    ("speedup", lambda row: _speedup(row)),
    ("greedy ≡", _identity),
)
# With several batch sizes, these follow tok/s, and each batch size's rows sit under a heading of their own.
BATCH_TERMINAL_COLUMNS = (
    ("row tok/s", lambda row: _number(row["row_tokens_per_second_median"], 1)),
    ("γ/step", lambda row: _number(row["gamma_per_step"])),
)


def print_table(rows: Sequence[dict], console: Console) -> None:
    """The summary table, fitted to the console's width: two-word headers take two lines and a long drafter name
    folds, while every number is printed whole."""
    sizes = list(dict.fromkeys(row["batch_size"] for row in rows))
    # Two spaces between columns, one when a batch sweep's extra columns need the room.
    table = Table(title="speculor bench", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, int(len(sizes) == 1), 0, 0))
    columns = TERMINAL_COLUMNS
    if len(sizes) > 1:
        columns = (*TERMINAL_COLUMNS[:6], *BATCH_TERMINAL_COLUMNS, *TERMINAL_COLUMNS[6:])
    for name, _ in columns:
        if name == "drafter":
            table.add_column(name, overflow="fold")
        else:
            # Two-word headers on two lines; numbers never wrap (an adaptive policy's "conf ≤8" may).
            table.add_column(name.replace(" ", "\n"), justify="right", no_wrap=name != "γ")
    for size in sizes:
        if len(sizes) > 1:
            if size != sizes[0]:
                table.add_section()
            table.add_row(Text(f"batch size {size}", style="bold"))
        for row in rows:
            if row["batch_size"] == size:
                table.add_row(*(cell(row) for _, cell in columns))
    console.print(table)
    console.print(
        "E = tokens per target forward; speedup = median over prompts against the target alone. Every other column "
        "(α, tok/s p10–p90, time to first token, ms per token, draft and verify ms, c, predicted speedup) is in "
        "report.md and results.csv."
    )


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(row) for _, cell in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


CSV_FIELDS = (
    "label", "drafter", "draft", "ngram", "policy", "gamma", "temperature", "prompts", "new_tokens", "tar",
    "mean_accepted_length", "acceptance_by_position", "alpha", "mean_gamma", "tokens_per_second_median",
    "tokens_per_second_p10", "tokens_per_second_p90", "ttft_ms_median", "ms_per_token_median", "speedup_median",
    "draft_ms_per_forward", "verify_ms_per_forward", "cost_ratio", "predicted_speedup", "greedy_identical",
    "greedy_checked", "batch_size", "rows", "row_tokens_per_second_median", "gamma_per_step", "gamma_steps",
)  # fmt: skip


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            flat = dict(
                row,
                acceptance_by_position=";".join(f"{v:g}" for v in row["acceptance_by_position"]),
                gamma_steps=_gamma_steps_text(row["gamma_steps"]),
            )
            writer.writerow({key: "" if flat[key] is None else flat[key] for key in CSV_FIELDS})


POLICY_MARKERS = {"target": "*", "fixed": "o", "confidence": "^", "leviathan": "s", "load-aware": "D"}
POLICY_LEGEND = {
    "target": "target alone",
    "fixed": "fixed γ",
    "confidence": "confidence threshold (adaptive γ)",
    "leviathan": "Leviathan γ (adaptive γ)",
    "load-aware": "load-aware γ (adaptive γ)",
}
TARGET_COLOR = "black"


def _figure(width: float, height: float) -> Figure:
    """A matplotlib figure drawn by the Agg backend without pyplot's global state (each plot function saves it and
    returns it for inspection). matplotlib is imported here because it takes about a second to import and only the
    plots need it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # attached, so labels can be measured before saving (`_label_apart`)
    return figure


def _by_temperature(rows: Sequence[dict]) -> dict[float, list[dict]]:
    groups: dict[float, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["temperature"], []).append(row)
    return dict(sorted(groups.items()))


def _panels(rows: Sequence[dict], width: float, height: float):
    """A figure with one panel per temperature (sharing the y axis), since acceptance and speed differ by
    temperature; returns the figure and (temperature, rows, axes) per panel."""
    groups = _by_temperature(rows) or {0.0: []}
    figure = _figure(width * len(groups) + 2.6, height)
    axes = figure.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    return figure, [(temperature, group, axis) for (temperature, group), axis in zip(groups.items(), axes, strict=True)]


# Where a point's label may go, tried in order: (dx, dy) in points from the point, and the text's alignment.
LABEL_PLACES = (
    (6, 0, "left"),
    (-6, 0, "right"),
    (0, 9, "center"),
    (0, -9, "center"),
    (6, 9, "left"),
    (6, -9, "left"),
    (-6, 9, "right"),
    (-6, -9, "right"),
    (6, 18, "left"),
    (6, -18, "left"),
    (-6, 18, "right"),
    (-6, -18, "right"),
)


Point = tuple[float, float]


def _label_apart(axes, markers: Sequence[tuple[Point, float]], labels: Sequence[tuple[Point, str, str]]) -> None:
    """Label points (point, text, colour) so that no label covers another label or a marker (point, size in
    points): each takes the first place in LABEL_PLACES that is free, judged in display coordinates once the layout
    is done. Several configurations often measure almost the same, and a fixed offset then prints their labels on
    top of each other. A label with no free place keeps the first one. Call it after the figure's DPI is final."""
    from matplotlib.transforms import Bbox

    figure = axes.figure
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    pixels_per_point = figure.dpi / 72
    taken = []
    for point, size in markers:
        x, y = axes.transData.transform(point)
        radius = size / 2 * pixels_per_point
        taken.append(Bbox.from_extents(x - radius, y - radius, x + radius, y + radius))
    for point, text, color in labels:
        dx, dy, align = LABEL_PLACES[0]
        label = axes.annotate(
            text, point, xytext=(dx, dy), textcoords="offset points", fontsize=8, color=color, va="center", ha=align
        )
        for dx, dy, align in LABEL_PLACES:
            label.xyann = (dx, dy)
            label.set_horizontalalignment(align)
            extent = label.get_window_extent(renderer)
            if not any(extent.overlaps(box) for box in taken):
                break
        else:
            dx, dy, align = LABEL_PLACES[0]
            label.xyann = (dx, dy)
            label.set_horizontalalignment(align)
            extent = label.get_window_extent(renderer)
        taken.append(extent)


def _drafter_colors(rows: Sequence[dict]) -> dict[str, str]:
    """One colour per drafter, the same in every plot, in the order the rows first name them."""
    drafters = dict.fromkeys(row["drafter"] for row in rows if row["policy"] != "target")
    return {drafter: f"C{index % 10}" for index, drafter in enumerate(drafters)}


def _legend(figure, colors: dict[str, str], styles: Sequence) -> None:
    """One legend right of the panels, so it never covers a point: a colour per drafter, then the marker and line
    styles the plot uses."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color, linewidth=3, label=Path(drafter).name) for drafter, color in colors.items()]
    figure.legend(handles=[*handles, *styles], loc="outside right upper", fontsize="small", frameon=False)


def _policy_handles(rows: Sequence[dict]) -> list:
    from matplotlib.lines import Line2D

    policies = [policy for policy in POLICY_MARKERS if any(row["policy"] == policy for row in rows)]
    return [
        Line2D(
            [],
            [],
            color=TARGET_COLOR if policy == "target" else "grey",
            linestyle="",
            marker=POLICY_MARKERS[policy],
            markersize=8,
            label=POLICY_LEGEND[policy],
        )
        for policy in policies
    ]


def plot_speedup_vs_gamma(rows: Sequence[dict], path: Path) -> Figure:
    """Measured (solid) and predicted (dotted) median speedup against γ, a colour per drafter and a panel per
    temperature; adaptive policies as single markers at the mean γ they drafted."""
    from matplotlib.lines import Line2D

    drawn = [row for row in rows if row["policy"] != "target" and row["speedup_median"] is not None]
    colors = _drafter_colors(drawn)
    figure, panels = _panels(drawn, 5.5, 4.5)
    for temperature, group, axes in panels:
        for drafter, color in colors.items():
            mine = [row for row in group if row["drafter"] == drafter]
            fixed = sorted((row for row in mine if row["policy"] == "fixed"), key=lambda row: row["gamma"])
            axes.plot([r["gamma"] for r in fixed], [r["speedup_median"] for r in fixed], "o-", color=color)
            predicted = [(r["gamma"], r["predicted_speedup"]) for r in fixed if r["predicted_speedup"] is not None]
            if predicted:
                axes.plot(*zip(*predicted, strict=True), ":", color=color)
            for row in mine:
                if row["policy"] != "fixed":
                    gamma = row["mean_gamma"] or row["gamma"]
                    if gamma is not None:
                        marker = POLICY_MARKERS[row["policy"]]
                        axes.plot(gamma, row["speedup_median"], marker, color=color, markersize=9)
        axes.axhline(1.0, color=TARGET_COLOR, linewidth=0.8)
        axes.set_xticks(sorted({row["gamma"] for row in group if row["policy"] == "fixed"}))
        adaptive = any(row["policy"] not in ("target", "fixed") for row in group)
        axes.set_xlabel("γ (drafted tokens per step; adaptive: mean)" if adaptive else "γ (drafted tokens per step)")
        axes.set_title(f"T={temperature:g}")
    panels[0][2].set_ylabel("median speedup over target alone")
    figure.suptitle("Speedup vs γ")
    styles = [
        Line2D([], [], color=TARGET_COLOR, linewidth=0.8, label="target alone (1x)"),
        Line2D([], [], color="grey", marker="o", label="measured, fixed γ"),
    ]
    if any(row["predicted_speedup"] is not None for row in drawn):
        styles.append(Line2D([], [], color="grey", linestyle=":", label="predicted (Leviathan et al.)"))
    styles += [handle for handle in _policy_handles(drawn) if handle.get_marker() not in ("o", "*")]
    _legend(figure, colors, styles)
    figure.savefig(path, dpi=120)
    return figure


def plot_tar_vs_cost(rows: Sequence[dict], path: Path) -> Figure:
    """TAR of every fixed-γ configuration against its measured cost ratio c, a colour per drafter (its γ values
    joined in order and labelled) and a panel per temperature."""
    points = [
        row for row in rows if row["policy"] == "fixed" and row["cost_ratio"] is not None and row["tar"] is not None
    ]
    colors = _drafter_colors(points)
    figure, panels = _panels(points, 5.5, 4.5)
    for temperature, group, axes in panels:
        for drafter, color in colors.items():
            mine = sorted((row for row in group if row["drafter"] == drafter), key=lambda row: row["gamma"])
            axes.plot([r["cost_ratio"] for r in mine], [r["tar"] for r in mine], "o-", color=color, linewidth=0.8)
            for row in mine:
                point = (row["cost_ratio"], row["tar"])
                axes.annotate(
                    str(row["gamma"]), point, xytext=(5, 3), textcoords="offset points", fontsize=8, color=color
                )
        # Room on the right and at the top for the last point's label.
        axes.margins(x=0.15, y=0.08)
        axes.set_xlim(left=0)
        axes.set_xlabel("cost ratio c (draft step / target step); points labelled with γ")
        axes.set_title(f"T={temperature:g}")
    panels[0][2].set_ylabel("TAR (accepted / drafted)")
    figure.suptitle("Acceptance vs draft cost (fixed γ)")
    _legend(figure, colors, [])
    figure.savefig(path, dpi=120)
    return figure


def plot_throughput_vs_latency(rows: Sequence[dict], path: Path) -> Figure:
    """Median tokens/s against median time to first token for every configuration: a colour per drafter, a marker
    per γ policy (the target alone a black star), a panel per temperature."""
    colors = _drafter_colors(rows)
    figure, panels = _panels(rows, 5.5, 4.5)
    placing = []
    for temperature, group, axes in panels:
        markers, labels = [], []
        for row in group:
            color = colors.get(row["drafter"], TARGET_COLOR)
            point = (row["ttft_ms_median"], row["tokens_per_second_median"])
            marker = POLICY_MARKERS[row["policy"]]
            size = 12 if marker == "*" else 7
            axes.plot(*point, marker, color=color, markersize=size)
            markers.append((point, size))
            if row["policy"] != "target":
                text = f"γ={row['gamma']}" if row["policy"] == "fixed" else _gamma_text(row)
                labels.append((point, text, color))
        placing.append((axes, markers, labels))
        axes.margins(x=0.15, y=0.08)
        axes.set_xlabel("median time to first token (ms)")
        axes.set_title(f"T={temperature:g}")
    panels[0][2].set_ylabel("median tokens/s")
    figure.suptitle("Throughput vs latency")
    _legend(figure, colors, _policy_handles(rows))
    figure.set_dpi(120)
    for axes, markers, labels in placing:
        _label_apart(axes, markers, labels)
    figure.savefig(path, dpi=120)
    return figure


def plot_batch_scaling(rows: Sequence[dict], path: Path) -> Figure:
    """How decoding scales with the batch size, a row of panels per temperature: total tokens/s, tokens/s per row,
    and the γ per step the load-aware policy drafted. The target alone is black; each drafter has its colour, solid
    for the load-aware policy and dashed for its best fixed γ at each batch size (labelled with that γ)."""
    from matplotlib.lines import Line2D

    colors = _drafter_colors(rows)
    sizes = sorted({row["batch_size"] for row in rows})
    groups = _by_temperature(rows) or {0.0: []}
    figure = _figure(3 * 4.2 + 2.6, 3.6 * len(groups))
    grid = figure.subplots(len(groups), 3, squeeze=False)
    metrics = (
        ("tokens_per_second_median", "total tokens/s"),
        ("row_tokens_per_second_median", "tokens/s per row"),
        ("gamma_per_step", "γ per step (load-aware)"),
    )
    for (temperature, group), panels in zip(groups.items(), grid, strict=True):
        lines: list[tuple[str, str, str, list[dict]]] = [
            ("target", TARGET_COLOR, "*-", [row for row in group if row["policy"] == "target"])
        ]
        for drafter, color in colors.items():
            mine = [row for row in group if row["drafter"] == drafter]
            lines.append(("load-aware", color, "D-", [row for row in mine if row["policy"] == "load-aware"]))
            best = [best_fixed(group, temperature, drafter, size) for size in sizes]
            lines.append(("fixed", color, "o--", [row for row in best if row is not None]))
        for axes, (key, name) in zip(panels, metrics, strict=True):
            for number, (policy, color, style, series) in enumerate(lines):
                series = sorted((row for row in series if row[key] is not None), key=lambda row: row["batch_size"])
                if not series or (key == "gamma_per_step" and policy != "load-aware"):
                    continue
                points = [(row["batch_size"], row[key]) for row in series]
                axes.plot(*zip(*points, strict=True), style, color=color, markersize=10 if policy == "target" else 6)
                if policy == "fixed" and key == "tokens_per_second_median":
                    # Alternate labels above and below the line, so two drafters' labels at one size do not collide.
                    offset = (4, 4) if number % 4 == 2 else (4, -11)
                    for row, point in zip(series, points, strict=True):
                        label = f"γ={row['gamma']}"
                        axes.annotate(label, point, xytext=offset, textcoords="offset points", fontsize=8, color=color)
            axes.set_xscale("log", base=2)
            axes.set_xticks(sizes, [str(size) for size in sizes])
            axes.minorticks_off()
            axes.margins(x=0.2, y=0.1)
            axes.set_ylim(bottom=0)
            axes.set_xlabel("batch size")
            axes.set_title(f"{name}, T={temperature:g}")
    figure.suptitle("Scaling with the batch size")
    styles = [
        Line2D([], [], color=TARGET_COLOR, marker="*", markersize=10, label="target alone"),
        Line2D([], [], color="grey", marker="D", label="load-aware γ"),
        Line2D([], [], color="grey", marker="o", linestyle="--", label="best fixed γ at that size"),
    ]
    _legend(figure, colors, styles)
    figure.savefig(path, dpi=120)
    return figure


BATCH_PLOT = "batch_scaling.png"


PLOTS = {
    "speedup_vs_gamma.png": plot_speedup_vs_gamma,
    "tar_vs_cost.png": plot_tar_vs_cost,
    "throughput_vs_latency.png": plot_throughput_vs_latency,
}


def plot_names(rows: Sequence[dict]) -> list[str]:
    """The plots a run gets: the batch-size plot only when it swept more than one batch size."""
    return [*PLOTS, *([BATCH_PLOT] if len({row["batch_size"] for row in rows}) > 1 else [])]


def _rate(row: dict, prefix: str = "") -> str:
    return f"{row[f'{prefix}tokens_per_second_median']:.1f}"


def _speedup(row: dict) -> str:
    return f"{_number(row['speedup_median'])}x"


def batch_table(rows: Sequence[dict]) -> list[str]:
    """Markdown lines: per temperature, batch size and drafter, the target alone, the best fixed γ and the load-aware
    policy side by side, in total tokens/s (speedup) and tokens/s per row, with the γ the load-aware steps drafted."""
    lines = [
        "| T | B | drafter | target alone tok/s (per row) | best fixed γ: tok/s (speedup) | load-aware: tok/s (speedup)"
        " | load-aware per row | γ per step | γ:steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for temperature, group in _by_temperature(rows).items():
        for size in sorted({row["batch_size"] for row in group}):
            here = [row for row in group if row["batch_size"] == size]
            alone = next((row for row in here if row["policy"] == "target"), None)
            alone_text = "–" if alone is None else f"{_rate(alone)} ({_rate(alone, 'row_')})"
            for drafter in dict.fromkeys(row["drafter"] for row in here if row["policy"] != "target"):
                fixed = best_fixed(here, temperature, drafter, size)
                fixed_text = "–" if fixed is None else f"γ={fixed['gamma']}: {_rate(fixed)} ({_speedup(fixed)})"
                auto = next((r for r in here if r["drafter"] == drafter and r["policy"] == "load-aware"), None)
                auto_cells = ["–"] * 4
                if auto is not None:
                    auto_cells = [
                        f"{_rate(auto)} ({_speedup(auto)})",
                        _rate(auto, "row_"),
                        _number(auto["gamma_per_step"]),
                        _gamma_steps_text(auto["gamma_steps"]),
                    ]
                cells = [f"{temperature:g}", str(size), Path(drafter).name, alone_text, fixed_text, *auto_cells]
                lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each run at batch size B generates B prompts together (the prompt list repeats when it is shorter than B);"
        " tokens/s is the batch total, per row each row's own rate (medians over runs and rows); γ:steps counts"
        " row-steps by the γ they drafted (0: no speculation).",
    ]
    return lines


def report_markdown(meta: dict, rows: Sequence[dict], best: dict) -> str:
    """The human-readable summary: recommendation per temperature, adaptive vs fixed, losslessness, table."""
    lines = [
        "# speculor bench report",
        "",
        f"- date: {meta['date']}; device: {meta['device_name']}; runner: {meta['runner']}; dtype: {meta['dtype']}",
        *([f"- CPU threads: {meta['cpu_threads_chosen']}"] if meta.get("cpu_threads_chosen") else []),
        f"- target: `{meta['target']}`; prompts: {meta['prompts']} ({counted(meta['num_prompts'], 'prompt')}, "
        f"{counted(meta['max_new_tokens'], 'new token')} each, ignore EOS: {meta['ignore_eos']}); seed {meta['seed']}",
        f"- command: `{meta['command']}`",
        *(
            [
                "- **interrupted (Ctrl-C)**: only the prompts (or batches) that every configuration finished are "
                "included; `prompts` in results.csv counts them"
            ]
            if meta.get("interrupted")
            else []
        ),
        "",
        "## Recommendation",
        "",
    ]
    for choice in best["by_temperature"]:
        temperature = choice["temperature"]
        if choice["vllm_speculative_config"] is None:
            lines.append(f"- T={temperature:g}: no configuration beat the target alone; decode without speculation.")
            continue
        drafter = choice.get("draft") or f"n-gram lookup (n ≤ {choice['ngram']})"
        lines.append(
            f"- T={temperature:g}: **{drafter}, γ={choice['gamma']}**: median speedup "
            f"{choice['speedup_median']:.2f}x, {choice['tokens_per_second_median']:.1f} tok/s. vLLM: "
            f"`{json.dumps(choice['vllm_speculative_config'])}`"
        )
    comparisons = adaptive_comparisons(rows)
    if comparisons:
        lines += ["", "## Adaptive draft length against the best fixed γ", ""]
        for item in comparisons:
            verdict = "beats" if item["beats_best_fixed"] else "does not beat"
            lines.append(
                f"- {item['label']}: {item['speedup_median']:.2f}x {verdict} {item['best_fixed_label']} "
                f"({item['best_fixed_speedup_median']:.2f}x); faster on {item['prompts_won']} of "
                + (
                    counted(item["prompts"], "prompt")
                    if item["batch_size"] == 1
                    else counted(item["prompts"], "batch", "batches")
                )
            )
    if len({row["batch_size"] for row in rows}) > 1:
        lines += ["", "## By batch size", "", *batch_table(rows)]
    checked = [row for row in rows if row["greedy_checked"] is not None]
    if checked:
        passed = sum(row["greedy_identical"] for row in checked)
        total = sum(row["greedy_checked"] for row in checked)
        lines += [
            "",
            "## Greedy outputs against the target alone",
            "",
            f"{passed}/{total} generations identical over {counted(len(checked), 'greedy configuration')}.",
        ]
        lines += [
            f"- {row['label']}: {_identity(row)}" for row in checked if row["greedy_identical"] != row["greedy_checked"]
        ]
    lines += [
        "",
        "## All configurations",
        "",
        markdown_table(rows),
        "",
        "E = mean accepted length (tokens per target forward); draft ms / verify ms = time per draft forward / per"
        " target forward (a verify forward scores γ + 1 tokens, the baseline's one); TAR = accepted / drafted;"
        " α = per-token acceptance, accepted / (accepted + rejections); c = draft step time / target step time of"
        " the baseline; pred. = E(α, γ̄) / (γ̄·c + 1) with γ̄ the mean drafted per drafting step (Leviathan et al.;"
        " draft models only; it assumes a verify forward costs what one baseline step does); speedup = median over"
        " prompts of tokens/s against the target alone on the same prompt; greedy ≡ = generations identical to the"
        " target alone.",
        "",
        "## Plots",
        "",
        *(f"![{name}]({name})" for name in plot_names(rows)),
        "",
    ]
    return "\n".join(lines)


def write_outputs(out_dir: Path, meta: dict, results: Sequence[ConfigResult], rows: Sequence[dict]) -> dict:
    """Write every output file into `out_dir`; returns the best-config object."""
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_config(rows, meta["target"], meta["temperatures"])
    per_prompt = [{"label": result.config.label, "runs": [vars(run) for run in result.runs]} for result in results]
    payload = {
        "meta": meta,
        "configs": list(rows),
        "adaptive": adaptive_comparisons(rows),
        "best": best,
        "per_prompt": per_prompt,
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_csv(rows, out_dir / "results.csv")
    # The per-γ plots compare configurations at one batch size: the smallest, where the recommendation is made.
    smallest = smallest_batch_size(rows)
    for name, plot in PLOTS.items():
        plot([row for row in rows if row["batch_size"] == smallest], out_dir / name)
    if BATCH_PLOT in plot_names(rows):
        plot_batch_scaling(rows, out_dir / BATCH_PLOT)
    (out_dir / "best_config.json").write_text(json.dumps(best, indent=2) + "\n")
    (out_dir / "vllm_speculative_config.json").write_text(json.dumps(best["vllm_speculative_config"]) + "\n")
    (out_dir / "report.md").write_text(report_markdown(meta, rows, best))
    return best
