"""The evaluation report: report.md (tables in the paper's style, each target MET or MISS with its value and
standard error), report.json (`Results.to_json`), and PNG figures, all from one `rlhf_fast.eval.Results`.

Figures: figure1_win_rate.png (win rate against model size per method, ±1.96 SE bars), ppo_training.png
(reward and KL per PPO iteration), metrics.png (each metric per model, the paper's bar panels),
evaluation_table.png (the evaluation table as an image).
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from rlhf_fast.eval.results import Estimate, ModelResult, PPOStep, Results

# Display order, label and direction (True: higher is better) of known metrics.
METRICS: dict[str, tuple[str, bool]] = {
    "win_rate": ("Win rate", True),
    "task_score": ("Task score", True),
    "truthfulness": ("Truthful", True),
    "truthful_informative": ("Truthful+informative", True),
    "hallucination_rate": ("Hallucination", False),
    "insult_rate_respectful": ("Insults (respectful instr.)", False),
    "insult_rate_plain": ("Insults (no instr.)", False),
    "qa_exact_match": ("QA benchmark EM", True),
    "repetition_rate": ("Repeats a word 3x", False),
    "non_answer_rate": ("Non-answers", False),
    "rm_agreement_heldout": ("Agreement, held-out labelers", True),
    "rm_agreement_train": ("Agreement, training labelers", True),
    "rm_accuracy": ("Validation accuracy", True),
}
# An SFT model's best of n samples by the reward model's score (no RL): what the reward model alone gets.
BEST_OF_N_KIND = "best_of"
# PPO against the labelers' own utility instead of the reward model: what PPO makes of a perfect reward model.
ORACLE_PPO_KIND = "ppo_oracle"
KIND_ORDER = ("base", "base_prompted", "sft", BEST_OF_N_KIND, "ppo", "ppo_ptx", ORACLE_PPO_KIND)
KIND_LABELS = {
    "base": "GPT (base)",
    "base_prompted": "GPT (prompted)",
    "sft": "SFT",
    BEST_OF_N_KIND: "SFT best-of-n (RM)",
    "ppo": "PPO",
    "ppo_ptx": "PPO-ptx",
    ORACLE_PPO_KIND: "PPO, labelers' utility (no RM)",
}
# What each reference entry (not a trained RLHF model) measures, for the reading of Figure 1.
REFERENCE_READINGS = {
    BEST_OF_N_KIND: (
        "an SFT model's best of n samples by the reward model's score, with no RL, i.e. what the reward model "
        "alone gets out of that model (at a KL of at most log n - (n - 1)/n nats), the reference for what PPO "
        "gains."
    ),
    ORACLE_PPO_KIND: (
        "PPO with the same settings against the training labelers' own utility in place of the reward model, "
        "i.e. what PPO makes of a perfect reward model in the same budget; where it wins no more than PPO, the "
        "reward model is not what limits PPO's win rate, and where its task score is higher, the reward model "
        "limits how much of the work PPO learns."
    ),
}
KIND_COLORS = {
    "base": "#8c8c8c",
    "base_prompted": "#5a5a5a",
    "sft": "#2ca02c",
    BEST_OF_N_KIND: "#9467bd",
    "ppo": "#ff7f0e",
    "ppo_ptx": "#d62728",
    ORACLE_PPO_KIND: "#17becf",
}
METRIC_DEFINITIONS = (
    (
        "Win rate: share of prompts on which held-out labelers prefer the model's response to the baseline's "
        "(Plackett-Luce judgments over their utilities; identical responses tie)."
    ),
    (
        "Truthful: true/false answers that agree with the world's fact table, on questions about myths the "
        "pretraining corpus repeats (a TruthfulQA analog)."
    ),
    "Hallucination: closed-domain responses (list, extractive QA) that name an entity absent from the input.",
    (
        "Insults: continuations of insult-baiting text that contain an insult word, given as raw text (no "
        "instruction) or with an instruction to be respectful (a RealToxicityPrompts analog)."
    ),
    (
        "QA benchmark EM: exact match on extractive QA in the public benchmark's own format; a drop after "
        "RLHF is the alignment tax."
    ),
    (
        "Repeats a word 3x / Non-answers: degenerate samples (one word three times in a row), and responses "
        "that do not attempt the task (filler, politeness or off-task words only)."
    ),
)
Z_95 = 1.96


def _metric_columns(entries) -> list[str]:
    present = {metric for entry in entries for metric in entry.metrics}
    known = [metric for metric in METRICS if metric in present]
    return known + sorted(present - set(known))


def _label(metric: str) -> str:
    label, higher_is_better = METRICS.get(metric, (metric, None))
    if higher_is_better is None:
        return label
    return f"{label} {'↑' if higher_is_better else '↓'}"


def _format(estimate: Estimate | None, digits: int = 3) -> str:
    return "–" if estimate is None else estimate.format(digits)


def _format_params(params: int | None) -> str:
    if params is None:
        return ""
    params = float(params)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= scale:
            return f"{params / scale:.3g}{unit}"
    return f"{params:.0f}"


def _sorted_models(models: list[ModelResult]) -> list[ModelResult]:
    sizes = list(dict.fromkeys(m.size for m in sorted(models, key=lambda m: m.params or 0)))

    def key(model: ModelResult):
        kind_index = KIND_ORDER.index(model.kind) if model.kind in KIND_ORDER else len(KIND_ORDER)
        return sizes.index(model.size), kind_index, model.name

    return sorted(models, key=key)


def _rows(models: list[ModelResult], columns: list[str]) -> list[list[str]]:
    return [
        [m.name, KIND_LABELS.get(m.kind, m.kind), m.size, _format_params(m.params)]
        + [_format(m.metrics.get(c)) for c in columns]
        for m in models
    ]


# ---- text --------------------------------------------------------------------------------------------------
def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_summary_table(results: Results) -> str:
    """The evaluation table as fixed-width text for a terminal (value ± standard error)."""
    models = _sorted_models(results.models)
    columns = _metric_columns(models)
    header = ["model", "method", "size", "params"] + [METRICS.get(c, (c,))[0] for c in columns]
    rows = [[cell.replace(" ± ", "±") for cell in row] for row in _rows(models, columns)]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [header, ["-" * w for w in widths]] + rows
    ]
    if results.win_rate_baseline and "win_rate" in columns:
        lines.append(f"win rate is against {results.win_rate_baseline}; ± is one standard error")
    return "\n".join(lines)


def _final_training_rows(history: dict[str, list[PPOStep]]) -> list[list[str]]:
    return [
        [run, str(len(steps)), f"{steps[0].reward:.4g}", f"{steps[-1].reward:.4g}", f"{steps[-1].kl:.4g}"]
        for run, steps in history.items()
        if steps
    ]


def _figure1_reading(results: Results) -> str:
    """What Figure 1 shows and what it does not, from the targets this run met and missed."""
    met = [t.target for t in results.targets if t.met]
    missed = [t.target for t in results.targets if not t.met]
    shows = (
        "**What this shows.** How often held-out labelers prefer each method's samples to the baseline's, "
        "on prompts of customers no training set saw, by model size; Table 1 puts the task score, "
        "truthfulness, hallucination, toxicity and degenerate samples beside it, so a gain in style alone "
        "would show."
    )
    for kind, reading in REFERENCE_READINGS.items():
        names = [m.name for m in results.models if m.kind == kind]
        if names:
            shows += f" {', '.join(names)} ({KIND_LABELS[kind]}): {reading}"
    if met:
        shows += " Findings of the paper reproduced in this run: " + "; ".join(met) + "."
    does_not = (
        "**What it does not.** The language, tasks and labelers are simulated (their preferences are a "
        "known formula, far simpler than human judgment) and the models have a few hundred thousand "
        "parameters, so no number here predicts a real model's; standard errors count prompts, not "
        "seeds or labelers."
    )
    if missed:
        does_not += " Findings this run did not reproduce: " + "; ".join(missed) + "."
    return shows + "\n\n" + does_not


def _targets_section(results: Results) -> list[str]:
    if not results.targets:
        return []
    rows = [
        [
            "MET" if t.met else "MISS",
            t.target,
            f"{t.value:.3f}",
            "–" if math.isnan(t.se) else f"{t.se:.3f}",
            t.detail,
        ]
        for t in results.targets
    ]
    met = sum(t.met for t in results.targets)
    return [
        f"## Targets: {met} of {len(results.targets)} met",
        "",
        _markdown_table(["", "Target", "Value", "SE", "Detail"], rows),
        "",
    ]


def _markdown(results: Results, models: list[ModelResult], figures: dict[str, str]) -> str:
    parts = [f"# {results.title}", ""]
    baseline = results.win_rate_baseline
    parts.append(
        "Models are evaluated on prompts from held-out customers, judged by held-out labelers. "
        "Every number is a mean over prompts (or comparisons) ± one standard error"
        + (f"; win rate is against {baseline} (ties count ½)." if baseline else ".")
    )
    parts.append("")
    if "figure1" in figures:
        parts += [
            "## Figure 1: win rate against model size",
            "",
            f"![Win rate against model size]({figures['figure1']})",
            "",
            _figure1_reading(results),
            "",
        ]
    parts += _targets_section(results)
    columns = _metric_columns(models)
    parts += ["## Table 1: evaluation", ""]
    parts.append(
        _markdown_table(
            ["Model", "Method", "Size", "Params"] + [_label(c) for c in columns], _rows(models, columns)
        )
    )
    parts.append("")
    if "metrics" in figures:
        parts += [f"![Metrics per model]({figures['metrics']})", ""]
    if results.reward_models:
        rm_columns = _metric_columns(results.reward_models)
        parts += ["## Table 2: reward models", ""]
        rows = [
            [e.name, e.size, _format_params(e.params)] + [_format(e.metrics.get(c)) for c in rm_columns]
            for e in results.reward_models
        ]
        header = ["Reward model", "Size", "Params"] + [_label(c) for c in rm_columns]
        parts.append(_markdown_table(header, rows))
        parts.append("")
    if results.labeler_agreement is not None:
        parts += [
            "Inter-labeler agreement (held-out vs training labelers, same pairs): "
            + _format(results.labeler_agreement),
            "",
        ]
    if results.ppo_history:
        parts += ["## PPO training", ""]
        if "ppo_training" in figures:
            parts += [f"![Reward and KL per PPO iteration]({figures['ppo_training']})", ""]
        parts.append(
            _markdown_table(
                ["Run", "Iterations", "Reward (first)", "Reward (last)", "KL (last)"],
                _final_training_rows(results.ppo_history),
            )
        )
        parts.append("")
    if results.timings:
        parts += [
            "## Timings",
            "",
            _markdown_table(
                ["Stage", "Seconds"], [[k, f"{float(v):.1f}"] for k, v in results.timings.items()]
            ),
            "",
            "A stage's seconds add up the wall clock of its runs; runs side by side overlap, so the stages can add",
            "up to more than the total.",
            "",
        ]
    if results.notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in results.notes] + [""]
    parts += ["## Metrics", ""] + [f"- {line}" for line in METRIC_DEFINITIONS] + [""]
    if results.config:
        parts += [
            "## Configuration",
            "",
            "```json",
            json.dumps(results.to_json()["config"], indent=1),
            "```",
            "",
        ]
    return "\n".join(parts)


# ---- figures -----------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _size_axis(models: list[ModelResult]) -> tuple[dict[str, float], bool]:
    """x position per size: parameter counts (log axis) when every model has one, else 0, 1, 2 ..."""
    if models and all(m.params for m in models):
        positions: dict[str, float] = {}
        for model in models:
            positions.setdefault(model.size, float(model.params))
        return positions, True
    sizes = list(dict.fromkeys(m.size for m in models))
    return {size: float(i) for i, size in enumerate(sizes)}, False


def _plot_figure1(models: list[ModelResult], baseline: str | None, path: Path) -> bool:
    with_win = [m for m in models if "win_rate" in m.metrics]
    if not with_win:
        return False
    positions, log_axis = _size_axis(with_win)
    figure = _figure(6.0, 4.2)
    axes = figure.add_subplot()
    kinds = list(dict.fromkeys(m.kind for m in with_win))
    kinds.sort(key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))
    for kind in kinds:
        points = sorted(
            (positions[m.size], m.metrics["win_rate"].value, m.metrics["win_rate"].se)
            for m in with_win
            if m.kind == kind
        )
        xs, ys, ses = zip(*points)
        errors = [0.0 if math.isnan(se) else Z_95 * se for se in ses]
        axes.errorbar(
            xs,
            ys,
            yerr=errors,
            marker="o",
            capsize=3,
            linewidth=2,
            color=KIND_COLORS.get(kind),
            label=KIND_LABELS.get(kind, kind),
        )
    axes.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    if log_axis:
        axes.set_xscale("log")
        axes.set_xlabel("Model size (parameters)")
    else:
        axes.set_xlabel("Model size")
    sizes = sorted(positions, key=positions.get)
    axes.set_xticks(
        [positions[s] for s in sizes],
        [f"{s}\n{_format_params(positions[s])}" if log_axis else s for s in sizes],
    )
    axes.minorticks_off()
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel(f"Win rate against {baseline}" if baseline else "Win rate")
    axes.set_title("Held-out labelers' preference (±1.96 SE)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    figure.savefig(path)
    return True


def _plot_training(history: dict[str, list[PPOStep]], path: Path) -> bool:
    runs = {run: steps for run, steps in history.items() if steps}
    if not runs:
        return False
    figure = _figure(9.0, 3.6)
    reward_axes, kl_axes = figure.subplots(1, 2)
    for run, steps in runs.items():
        xs = [step.iteration for step in steps]
        reward_axes.plot(xs, [step.reward for step in steps], marker=".", label=run)
        kl_axes.plot(xs, [step.kl for step in steps], marker=".", label=run)
    reward_axes.set_title("Reward-model score per iteration")
    reward_axes.set_ylabel("mean reward")
    kl_axes.set_title("KL(policy ‖ SFT reference) per iteration")
    kl_axes.set_ylabel("KL (nats)")
    for axes in (reward_axes, kl_axes):
        axes.set_xlabel("PPO iteration")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.savefig(path)
    return True


def _plot_metrics(models: list[ModelResult], path: Path) -> bool:
    columns = _metric_columns(models)
    if not columns:
        return False
    n_cols = min(3, len(columns))
    n_rows = math.ceil(len(columns) / n_cols)
    figure = _figure(4.0 * n_cols, 3.2 * n_rows)
    grid = figure.subplots(n_rows, n_cols, squeeze=False)
    for index, metric in enumerate(columns):
        axes = grid[index // n_cols][index % n_cols]
        entries = [m for m in models if metric in m.metrics]
        values = [m.metrics[metric].value for m in entries]
        ses = [m.metrics[metric].se for m in entries]
        errors = [0.0 if math.isnan(se) else Z_95 * se for se in ses]
        colors = [KIND_COLORS.get(m.kind, "#1f77b4") for m in entries]
        axes.bar(range(len(entries)), values, yerr=errors if any(errors) else None, color=colors, capsize=2)
        axes.set_xticks(range(len(entries)), [m.name for m in entries], rotation=45, ha="right", fontsize=7)
        axes.set_title(_label(metric), fontsize=10)
        axes.grid(axis="y", alpha=0.3)
    for index in range(len(columns), n_rows * n_cols):
        grid[index // n_cols][index % n_cols].set_axis_off()
    figure.savefig(path)
    return True


def _plot_table(models: list[ModelResult], path: Path) -> bool:
    columns = _metric_columns(models)
    if not models:
        return False
    header = ["Model", "Method", "Size", "Params"] + [_label(c) for c in columns]
    rows = _rows(models, columns)
    figure = _figure(max(6.0, 1.35 * len(header)), 0.9 + 0.32 * (len(rows) + 1))
    axes = figure.add_subplot()
    axes.set_axis_off()
    table = axes.table(
        cellText=rows, colLabels=[textwrap.fill(h, 16) for h in header], loc="center", cellLoc="center"
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.5)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_height(cell.get_height() * 1.8)
    figure.savefig(path)
    return True


# ---- entry point -------------------------------------------------------------------------------------------
def write_report(results: Results, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and the PNG figures into `out_dir`; returns {name: path} of what was
    written (a figure whose data is absent, e.g. no PPO history, is skipped)."""
    if not isinstance(results, Results):
        raise ValueError(  # noqa: TRY004 (project rule: bad input is a ValueError)
            f"results must be an rlhf_fast.eval.Results, got {type(results).__name__}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = _sorted_models(results.models)
    paths: dict[str, Path] = {}
    figures: dict[str, str] = {}
    for name, filename, plot in (
        ("figure1", "figure1_win_rate.png", lambda p: _plot_figure1(models, results.win_rate_baseline, p)),
        ("ppo_training", "ppo_training.png", lambda p: _plot_training(results.ppo_history, p)),
        ("metrics", "metrics.png", lambda p: _plot_metrics(models, p)),
        ("evaluation_table", "evaluation_table.png", lambda p: _plot_table(models, p)),
    ):
        if plot(out / filename):
            paths[name] = out / filename
            figures[name] = filename

    paths["report_md"] = out / "report.md"
    paths["report_md"].write_text(_markdown(results, models, figures), encoding="utf-8")
    paths["report_json"] = out / "report.json"
    paths["report_json"].write_text(
        json.dumps({**results.to_json(), "figures": figures}, indent=1), encoding="utf-8"
    )
    return paths
