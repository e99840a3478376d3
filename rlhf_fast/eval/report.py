"""The evaluation report: report.md (tables in the paper's style), report.json, and PNG figures.

`results` is a plain dict (every key but "models" optional):

    {
      "title": "InstructGPT in miniature",
      "win_rate_baseline": "SFT (small)",          # what "win_rate" was measured against
      "models": {                                  # name -> entry (a list of entries with "name" also works)
        "ppo_ptx-small": {"kind": "ppo_ptx",       # base | base_prompted | sft | ppo | ppo_ptx | anything
                          "size": "small", "params": 812_000,
                          "metrics": {"win_rate": [0.61, 0.02], "truthfulness": [0.8, 0.03], ...}},
      },
      "reward_models": {"rm-small": {"size": "small", "params": ...,
                                     "metrics": {"rm_agreement_heldout": [v, se]}}},
      "labeler_agreement": [0.78, 0.01],           # held-out vs training labelers on the same pairs
      "ppo_history": {"ppo-small": [{"iteration": 0, "reward": 0.1, "kl": 0.0}, ...]},
      "timings": {"pretrain": 61.2, ...},          # seconds per stage
      "config": {...}, "notes": ["..."],
    }

A metric value is [value, standard error], (value, se), {"value": v, "se": se} or a bare number (no SE).
Figures: figure1_win_rate.png (win rate against model size per method, ±1.96 SE bars),
ppo_training.png (reward and KL per PPO iteration), metrics.png (each metric per model, the paper's bar
panels), evaluation_table.png (the evaluation table as an image).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    "rm_agreement_heldout": ("Agreement, held-out labelers", True),
    "rm_agreement_train": ("Agreement, training labelers", True),
    "rm_accuracy": ("Validation accuracy", True),
}
KIND_ORDER = ("base", "base_prompted", "sft", "ppo", "ppo_ptx")
KIND_LABELS = {"base": "GPT (base)", "base_prompted": "GPT (prompted)", "sft": "SFT", "ppo": "PPO",
               "ppo_ptx": "PPO-ptx"}
KIND_COLORS = {"base": "#8c8c8c", "base_prompted": "#5a5a5a", "sft": "#2ca02c", "ppo": "#ff7f0e",
               "ppo_ptx": "#d62728"}
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
)
REWARD_KEYS = ("reward", "mean_reward", "rm_score", "score", "scores")
KL_KEYS = ("kl", "kl_to_ref", "ref_kl", "mean_kl", "approx_kl_ref")
Z_95 = 1.96


# ---- normalization -----------------------------------------------------------------------------------------
def _estimate(value: Any) -> tuple[float, float]:
    if isinstance(value, Mapping):
        return float(value["value"]), float(value.get("se", math.nan))
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"a metric must be [value, se], got {value!r}")
        return float(value[0]), float(value[1]) if value[1] is not None else math.nan
    return float(value), math.nan


def _entries(section: Any, name: str) -> list[dict]:
    if section is None:
        return []
    if isinstance(section, Mapping):
        items = [dict(entry, name=key) for key, entry in section.items()]
    elif isinstance(section, (list, tuple)):
        items = [dict(entry) for entry in section]
    else:
        raise ValueError(f"results[{name!r}] must be a dict or a list of dicts, got {type(section).__name__}")
    for entry in items:
        if "name" not in entry:
            raise ValueError(f"every entry of results[{name!r}] needs a name")
        entry["metrics"] = {k: _estimate(v) for k, v in (entry.get("metrics") or {}).items()}
        entry["size"] = str(entry.get("size", ""))
    return items


def _metric_columns(entries: list[dict]) -> list[str]:
    present = {metric for entry in entries for metric in entry["metrics"]}
    known = [metric for metric in METRICS if metric in present]
    return known + sorted(present - set(known))


def _label(metric: str) -> str:
    label, higher_is_better = METRICS.get(metric, (metric, None))
    if higher_is_better is None:
        return label
    return f"{label} {'↑' if higher_is_better else '↓'}"


def _format(estimate: tuple[float, float] | None, digits: int = 3) -> str:
    if estimate is None:
        return "–"
    value, se = estimate
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}" if math.isnan(se) else f"{value:.{digits}f} ± {se:.{digits}f}"


def _format_params(params: Any) -> str:
    if params is None:
        return ""
    params = float(params)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= scale:
            return f"{params / scale:.3g}{unit}"
    return f"{params:.0f}"


def _sorted_models(models: list[dict]) -> list[dict]:
    sizes = list(dict.fromkeys(m["size"] for m in sorted(models, key=lambda m: m.get("params") or 0)))

    def key(model):
        kind = model.get("kind", "")
        kind_index = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
        return sizes.index(model["size"]), kind_index, model["name"]

    return sorted(models, key=key)


def _rows(entries: list[dict], columns: list[str]) -> list[list[str]]:
    return [[entry["name"], KIND_LABELS.get(entry.get("kind", ""), entry.get("kind", "")), entry["size"],
             _format_params(entry.get("params"))] + [_format(entry["metrics"].get(c)) for c in columns]
            for entry in entries]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


# ---- text --------------------------------------------------------------------------------------------------
def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_summary_table(results: dict) -> str:
    """The evaluation table as fixed-width text for a terminal (value ± standard error)."""
    models = _sorted_models(_entries(results.get("models"), "models"))
    columns = _metric_columns(models)
    header = ["model", "method", "size", "params"] + [METRICS.get(c, (c,))[0] for c in columns]
    rows = [[cell.replace(" ± ", "±") for cell in row] for row in _rows(models, columns)]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)] if rows else \
        [len(h) for h in header]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header, ["-" * w for w in widths]] + rows]
    baseline = results.get("win_rate_baseline")
    if baseline and "win_rate" in columns:
        lines.append(f"win rate is against {baseline}; ± is one standard error")
    return "\n".join(lines)


def _final_training_rows(history: Mapping[str, list[dict]]) -> list[list[str]]:
    rows = []
    for run, steps in history.items():
        if not steps:
            continue
        reward_key, kl_key = _history_key(steps, REWARD_KEYS), _history_key(steps, KL_KEYS)
        first, last = steps[0], steps[-1]

        def cell(step, key):
            return "–" if key is None or key not in step else f"{float(step[key]):.4g}"

        rows.append([run, str(len(steps)), cell(first, reward_key), cell(last, reward_key),
                     cell(last, kl_key)])
    return rows


def _markdown(results: dict, models: list[dict], reward_models: list[dict], figures: dict[str, str]) -> str:
    title = results.get("title", "Evaluation report")
    parts = [f"# {title}", ""]
    baseline = results.get("win_rate_baseline")
    parts.append("Models are evaluated on prompts from held-out customers, judged by held-out labelers. "
                 "Every number is a mean over prompts (or comparisons) ± one standard error"
                 + (f"; win rate is against {baseline} (ties count ½)." if baseline else "."))
    parts.append("")
    if "figure1" in figures:
        parts += ["## Figure 1: win rate against model size", "",
                  f"![Win rate against model size]({figures['figure1']})", ""]
    columns = _metric_columns(models)
    parts += ["## Table 1: evaluation", ""]
    parts.append(_markdown_table(["Model", "Method", "Size", "Params"] + [_label(c) for c in columns],
                                 _rows(models, columns)))
    parts.append("")
    if "metrics" in figures:
        parts += [f"![Metrics per model]({figures['metrics']})", ""]
    if reward_models:
        rm_columns = _metric_columns(reward_models)
        parts += ["## Table 2: reward models", ""]
        rows = [[e["name"], e["size"], _format_params(e.get("params"))]
                + [_format(e["metrics"].get(c)) for c in rm_columns] for e in reward_models]
        header = ["Reward model", "Size", "Params"] + [_label(c) for c in rm_columns]
        parts.append(_markdown_table(header, rows))
        parts.append("")
    if results.get("labeler_agreement") is not None:
        parts += ["Inter-labeler agreement (held-out vs training labelers, same pairs): "
                  + _format(_estimate(results["labeler_agreement"])), ""]
    history = results.get("ppo_history") or {}
    if history:
        parts += ["## PPO training", ""]
        if "ppo_training" in figures:
            parts += [f"![Reward and KL per PPO iteration]({figures['ppo_training']})", ""]
        parts.append(_markdown_table(["Run", "Iterations", "Reward (first)", "Reward (last)", "KL (last)"],
                                     _final_training_rows(history)))
        parts.append("")
    timings = results.get("timings") or {}
    if timings:
        parts += ["## Timings", "", _markdown_table(["Stage", "Seconds"],
                                                   [[k, f"{float(v):.1f}"] for k, v in timings.items()]), ""]
    notes = results.get("notes") or []
    if notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    parts += ["## Metrics", ""] + [f"- {line}" for line in METRIC_DEFINITIONS] + [""]
    if results.get("config"):
        config = json.dumps(_jsonable(results["config"]), indent=1)
        parts += ["## Configuration", "", "```json", config, "```", ""]
    return "\n".join(parts)


# ---- figures -----------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _size_axis(models: list[dict]) -> tuple[dict[str, float], bool]:
    """x position per size: parameter counts (log axis) when every model has one, else 0, 1, 2 ..."""
    if models and all(m.get("params") for m in models):
        positions: dict[str, float] = {}
        for model in models:
            positions.setdefault(model["size"], float(model["params"]))
        return positions, True
    sizes = list(dict.fromkeys(m["size"] for m in models))
    return {size: float(i) for i, size in enumerate(sizes)}, False


def _plot_figure1(models: list[dict], baseline: str | None, path: Path) -> bool:
    with_win = [m for m in models if "win_rate" in m["metrics"]]
    if not with_win:
        return False
    positions, log_axis = _size_axis(with_win)
    figure = _figure(6.0, 4.2)
    axes = figure.add_subplot()
    kinds = list(dict.fromkeys(m.get("kind", m["name"]) for m in with_win))
    kinds.sort(key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))
    for kind in kinds:
        points = sorted((positions[m["size"]], *m["metrics"]["win_rate"]) for m in with_win
                         if m.get("kind", m["name"]) == kind)
        xs, ys, ses = zip(*points)
        errors = [0.0 if math.isnan(se) else Z_95 * se for se in ses]
        axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, linewidth=2,
                      color=KIND_COLORS.get(kind), label=KIND_LABELS.get(kind, kind))
    axes.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    if log_axis:
        axes.set_xscale("log")
        axes.set_xlabel("Model size (parameters)")
    else:
        axes.set_xlabel("Model size")
    sizes = sorted(positions, key=positions.get)
    axes.set_xticks([positions[s] for s in sizes], [f"{s}\n{_format_params(positions[s])}" if log_axis else s
                                                   for s in sizes])
    axes.minorticks_off()
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel(f"Win rate against {baseline}" if baseline else "Win rate")
    axes.set_title("Held-out labelers' preference (±1.96 SE)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    figure.savefig(path)
    return True


def _history_key(steps: list[dict], candidates: tuple[str, ...]) -> str | None:
    keys = {key for step in steps for key in step}
    for candidate in candidates:
        if candidate in keys:
            return candidate
    # Namespaced names such as "objective/kl" or "train/reward".
    for candidate in candidates:
        for key in sorted(keys):
            if key.split("/")[-1] == candidate:
                return key
    return None


def _plot_training(history: Mapping[str, list[dict]], path: Path) -> bool:
    runs = {run: steps for run, steps in history.items() if steps}
    if not runs:
        return False
    figure = _figure(9.0, 3.6)
    reward_axes, kl_axes = figure.subplots(1, 2)
    plotted = False
    for run, steps in runs.items():
        xs = [step.get("iteration", step.get("step", index)) for index, step in enumerate(steps)]
        for axes, candidates in ((reward_axes, REWARD_KEYS), (kl_axes, KL_KEYS)):
            key = _history_key(steps, candidates)
            if key is None:
                continue
            points = [(x, float(step[key])) for x, step in zip(xs, steps) if key in step]
            axes.plot(*zip(*points), marker=".", label=run)
            plotted = True
    reward_axes.set_title("Reward-model score per iteration")
    reward_axes.set_ylabel("mean reward")
    kl_axes.set_title("KL(policy ‖ SFT reference) per iteration")
    kl_axes.set_ylabel("KL (nats)")
    for axes in (reward_axes, kl_axes):
        axes.set_xlabel("PPO iteration")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
    if plotted:
        figure.savefig(path)
    return plotted


def _plot_metrics(models: list[dict], path: Path) -> bool:
    columns = _metric_columns(models)
    if not columns:
        return False
    n_cols = min(3, len(columns))
    n_rows = math.ceil(len(columns) / n_cols)
    figure = _figure(4.0 * n_cols, 3.2 * n_rows)
    grid = figure.subplots(n_rows, n_cols, squeeze=False)
    for index, metric in enumerate(columns):
        axes = grid[index // n_cols][index % n_cols]
        entries = [m for m in models if metric in m["metrics"]]
        values = [m["metrics"][metric][0] for m in entries]
        ses = [m["metrics"][metric][1] for m in entries]
        errors = [0.0 if math.isnan(se) else Z_95 * se for se in ses]
        colors = [KIND_COLORS.get(m.get("kind", ""), "#1f77b4") for m in entries]
        axes.bar(range(len(entries)), values, yerr=errors if any(errors) else None, color=colors, capsize=2)
        axes.set_xticks(range(len(entries)), [m["name"] for m in entries], rotation=45, ha="right",
                        fontsize=7)
        axes.set_title(_label(metric), fontsize=10)
        axes.grid(axis="y", alpha=0.3)
    for index in range(len(columns), n_rows * n_cols):
        grid[index // n_cols][index % n_cols].set_axis_off()
    figure.savefig(path)
    return True


def _plot_table(models: list[dict], path: Path) -> bool:
    columns = _metric_columns(models)
    if not models:
        return False
    header = ["Model", "Method", "Size", "Params"] + [_label(c) for c in columns]
    rows = _rows(models, columns)
    figure = _figure(max(6.0, 1.35 * len(header)), 0.9 + 0.32 * (len(rows) + 1))
    axes = figure.add_subplot()
    axes.set_axis_off()
    table = axes.table(cellText=rows, colLabels=[textwrap.fill(h, 16) for h in header],
                       loc="center", cellLoc="center")
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
def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and the PNG figures into `out_dir`; returns {name: path} of what was
    written (a figure whose data is absent, e.g. no PPO history, is skipped)."""
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = _sorted_models(_entries(results.get("models"), "models"))
    reward_models = _entries(results.get("reward_models"), "reward_models")
    history = results.get("ppo_history") or {}
    if not isinstance(history, Mapping):
        raise ValueError("results['ppo_history'] must map a run name to a list of metric dicts")

    paths: dict[str, Path] = {}
    figures: dict[str, str] = {}
    for name, filename, plot in (
        ("figure1", "figure1_win_rate.png",
         lambda p: _plot_figure1(models, results.get("win_rate_baseline"), p)),
        ("ppo_training", "ppo_training.png", lambda p: _plot_training(history, p)),
        ("metrics", "metrics.png", lambda p: _plot_metrics(models, p)),
        ("evaluation_table", "evaluation_table.png", lambda p: _plot_table(models, p)),
    ):
        if plot(out / filename):
            paths[name] = out / filename
            figures[name] = filename

    paths["report_md"] = out / "report.md"
    paths["report_md"].write_text(_markdown(results, models, reward_models, figures), encoding="utf-8")
    paths["report_json"] = out / "report.json"
    normalized = dict(results)
    normalized["models"] = {m["name"]: {k: v for k, v in m.items() if k != "name"} for m in models}
    if reward_models:
        normalized["reward_models"] = {m["name"]: {k: v for k, v in m.items() if k != "name"}
                                       for m in reward_models}
    normalized["figures"] = figures
    paths["report_json"].write_text(json.dumps(_jsonable(normalized), indent=1), encoding="utf-8")
    return paths
