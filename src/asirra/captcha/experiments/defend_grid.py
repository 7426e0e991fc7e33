"""Which safeguard to deploy: a bot and a human under a grid of settings, and the one to recommend.

`defend` compares a bot and a human under every setting of a `DefendGrid` and recommends the one
that holds the bot lowest while humans still pass more than 99% of the time (the lower end of their
interval above the floor). Every setting judges the same simulated responses (common random numbers).
"""

from __future__ import annotations

import csv
import io
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from asirra.captcha.challenge import CHALLENGE_SIZE
from asirra.captcha.experiments.simulate import (
    HUMAN_CHALLENGE_SUCCESS,
    SimulationError,
    SimulationResult,
    accuracy_for_challenge_success,
    agent_mistakes,
    judge_responses,
    model_mistakes,
)
from asirra.captcha.safeguards import NoSafeguard, PartialCredit, Safeguard, TokenBucket, describe
from asirra.fileio import write_text_atomic

HUMAN_FLOOR = 0.99  # a safeguard must keep humans above this to be recommended
SWEEP_ACCURACIES = tuple(np.round(np.linspace(0.5, 1.0, 11), 2).tolist())
DEFAULT_CHALLENGES = 20_000  # per agent and setting


@dataclass(frozen=True)
class DefendGrid:
    """The safeguard settings `defend` tries; every token bucket is tried bare and over partial credit."""

    needed: tuple[int, ...] = (2, 3)
    capacity: tuple[int, ...] = (1, 2, 3, 5, 10)
    cost_per_failure: tuple[int, ...] = (1, 2)
    refill_per_pass: tuple[int, ...] = (1,)
    refill_when_empty: tuple[int, ...] = (1, 2)

    def safeguards(self) -> list[Safeguard]:
        grid: list[Safeguard] = [NoSafeguard()]
        grid += [PartialCredit(needed=n) for n in self.needed]
        buckets = list(
            itertools.product(self.capacity, self.cost_per_failure, self.refill_per_pass, self.refill_when_empty)
        )
        for inner in (NoSafeguard(), PartialCredit()):
            grid += [TokenBucket(*params, inner=inner) for params in buckets]
        return grid


def family(safeguard: Safeguard) -> str:
    """The kind of safeguard, for grouping settings: "token-bucket + partial-credit" etc."""
    inner = getattr(safeguard, "inner", None)
    return safeguard.name + (f" + {inner.name}" if inner is not None and inner.name != "none" else "")


@dataclass(frozen=True)
class DefendReport:
    bot_accuracy: float
    human_accuracy: float
    settings: list[dict]  # one row per safeguard: bot and human solve rates with intervals
    sweep: list[dict]  # bot solve rate per (safeguard, per-image accuracy)
    recommended: dict | None  # the chosen row of `settings`, or None if no setting keeps humans in
    files: dict[str, str]

    def summary_lines(self, human_success: float, human_floor: float = HUMAN_FLOOR) -> list[str]:
        """The grid in text: every setting, then the recommendation and the files (`asirra captcha defend`)."""
        lines = [f"bot per-image accuracy {self.bot_accuracy:.4f}; human challenge success {human_success:.1%}"]
        lines += ["  " + format_setting(row) for row in self.settings]
        lines.append(f"no setting keeps humans above {human_floor:.1%}" if self.recommended is None
                     else "recommended: " + format_setting(self.recommended))
        return lines + [f"wrote {', '.join(self.files.values())}"]

    def to_dict(self) -> dict:
        return {
            "bot_accuracy": self.bot_accuracy,
            "human_accuracy": self.human_accuracy,
            "recommended": self.recommended,
            "settings": self.settings,
            "sweep": self.sweep,
            "files": self.files,
        }


def defend(out_dir: Path, **options) -> DefendReport:
    """`compare_safeguards(**options)`, written to out_dir as defend.csv, defend.json and defend.png."""
    human_floor = options.get("human_floor", HUMAN_FLOOR)
    return write_defend(compare_safeguards(**options), Path(out_dir), human_floor)


def compare_safeguards(
    *,
    bot_accuracy: float | None = None,
    bot_proba=None,
    bot_labels=None,
    bot_name: str = "bot",
    human_success: float = HUMAN_CHALLENGE_SUCCESS,
    human_floor: float = HUMAN_FLOOR,
    n_challenges: int = DEFAULT_CHALLENGES,
    sweep_accuracies: Sequence[float] = SWEEP_ACCURACIES,
    sweep_challenges: int = 5_000,
    grid: DefendGrid = DefendGrid(),
    seed: int = 0,
) -> DefendReport:
    """Bot and human solve rates under every setting of `grid`, the recommended setting, and a
    sweep of bot solve rate against per-image accuracy for each kind of safeguard.

    The bot is either a scored pool (`bot_proba`, `bot_labels`: its real mistakes) or a synthetic
    agent with `bot_accuracy`. Every setting judges the *same* bot and human responses (common
    random numbers), so differences between settings are the safeguards', not sampling noise.
    """
    if (bot_accuracy is None) == (bot_proba is None):
        raise SimulationError("give the bot either as an accuracy or as scored images (proba and labels)")
    rng = np.random.default_rng(seed)
    if bot_proba is not None:
        bot_mistakes, bot_accuracy = model_mistakes(bot_proba, bot_labels, n_challenges, rng)
    else:
        bot_mistakes = agent_mistakes(bot_accuracy, n_challenges, rng)
    human_accuracy = accuracy_for_challenge_success(human_success)
    human_mistakes = agent_mistakes(human_accuracy, n_challenges, rng)

    safeguards = grid.safeguards()
    settings = [
        _setting_row(sg, judge_responses(bot_mistakes, sg, bot_name, bot_accuracy),
                     judge_responses(human_mistakes, sg, "human", human_accuracy))
        for sg in safeguards
    ]
    recommended = recommend(settings, human_floor)
    curves = _sweep_safeguards(safeguards, recommended)
    sweep = []
    for p in sweep_accuracies:
        mistakes = agent_mistakes(p, sweep_challenges, rng)  # one draw per accuracy, judged by every curve
        sweep += [{**judge_responses(mistakes, sg, "agent", p).to_dict(), "family": family(sg)} for sg in curves]
    return DefendReport(bot_accuracy, human_accuracy, settings, sweep, recommended, files={})


def _setting_row(safeguard: Safeguard, bot: SimulationResult, human: SimulationResult) -> dict:
    (bot_low, bot_high), (human_low, human_high) = bot.ci, human.ci
    return {
        "safeguard": bot.safeguard,
        "family": family(safeguard),
        "bot_solve_rate": bot.solve_rate,
        "bot_ci_low": bot_low,
        "bot_ci_high": bot_high,
        "human_solve_rate": human.solve_rate,
        "human_ci_low": human_low,
        "human_ci_high": human_high,
        "bot_per_image_accuracy": bot.per_image_accuracy,
        "bot_p12": bot.p12,
        "challenges": bot.attempted,
    }


def recommend(settings: Sequence[dict], human_floor: float = HUMAN_FLOOR) -> dict | None:
    """The setting that holds the bot lowest among those whose human interval lies above the floor.

    Requiring the interval's lower end (not just the estimate) above the floor means a setting is
    only recommended when the simulation is sure it keeps humans in. Ties go to the higher human
    rate, then to the earlier (simpler) setting in the grid.
    """
    eligible = [row for row in settings if row["human_ci_low"] > human_floor]
    if not eligible:
        return None
    return min(eligible, key=lambda row: (row["bot_solve_rate"], -row["human_solve_rate"]))


def _sweep_safeguards(grid: Sequence[Safeguard], recommended: dict | None) -> list[Safeguard]:
    """One curve per family at its default parameters, plus the recommended setting."""
    curves = [NoSafeguard(), PartialCredit(), TokenBucket(), TokenBucket(inner=PartialCredit())]
    if recommended is not None:
        chosen = next(sg for sg in grid if describe(sg) == recommended["safeguard"])
        if chosen not in curves:
            curves.append(chosen)
    return curves


# ---- output ---------------------------------------------------------------------------------------


def write_defend(report: DefendReport, out_dir: Path, human_floor: float = HUMAN_FLOOR) -> DefendReport:
    """defend.csv (one row per setting), defend.json (everything) and defend.png, each atomically."""
    from asirra.fileio import write_json_atomic
    from asirra.plots import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: str(out_dir / f"defend.{name}") for name in ("csv", "json", "png")}
    _write_csv(report.settings, Path(files["csv"]))
    save_figure(plot_defend(report, human_floor), Path(files["png"]))
    report = DefendReport(**{**report.__dict__, "files": files})
    write_json_atomic(Path(files["json"]), report.to_dict())
    return report


def _write_csv(rows: Sequence[dict], out: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out, text.getvalue())


FAMILY_COLOURS = {
    "none": "tab:gray",
    "partial-credit": "tab:blue",
    "token-bucket": "tab:orange",
    "token-bucket + partial-credit": "tab:green",
}
# the bare baseline is drawn last and large so settings with equal rates cannot hide it
FAMILY_MARKERS = {"none": ("X", 90, 3), "partial-credit": ("s", 30, 2)}


def plot_defend(report: DefendReport, human_floor: float = HUMAN_FLOOR):
    """Left: bot vs human solve rate per setting. Right: bot solve rate vs per-image accuracy."""
    from matplotlib.figure import Figure  # needs no backend: nothing is shown, only saved

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    left, right = fig.subplots(1, 2)

    for name, colour in FAMILY_COLOURS.items():
        rows = [r for r in report.settings if r["family"] == name]
        if rows:
            marker, size, zorder = FAMILY_MARKERS.get(name, ("o", 30, 1))
            left.scatter([r["human_solve_rate"] for r in rows], [r["bot_solve_rate"] for r in rows],
                         color=colour, label=name, marker=marker, s=size, zorder=zorder, alpha=0.8)
    left.axvline(human_floor, color="red", linestyle="--", linewidth=1, label=f"human floor {human_floor:.0%}")
    if report.recommended:
        best = report.recommended
        left.scatter([best["human_solve_rate"]], [best["bot_solve_rate"]], s=180, facecolors="none",
                     edgecolors="black", linewidths=1.5, label="recommended")
        left.annotate(best["safeguard"], (best["human_solve_rate"], best["bot_solve_rate"]),
                      xytext=(-10, 12), textcoords="offset points", ha="right", fontsize=8)
    left.set_xlabel("human challenge success")
    left.set_ylabel(f"bot challenge success (per-image accuracy {report.bot_accuracy:.3f})")
    left.set_title("Each safeguard setting: bot vs human")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper left")

    accuracies = sorted({row["per_image_accuracy"] for row in report.sweep})
    curves = {row["safeguard"]: row["family"] for row in report.sweep}
    for spec, kind in curves.items():
        rates = [row["solve_rate"] for row in report.sweep if row["safeguard"] == spec]
        is_best = report.recommended is not None and spec == report.recommended["safeguard"]
        right.plot(accuracies, rates, marker="o", markersize=3, label=spec + (" (recommended)" if is_best else ""),
                   color="black" if is_best else FAMILY_COLOURS[kind], linewidth=2 if is_best else 1.2)
    grid = np.linspace(min(accuracies), max(accuracies), 200)
    right.plot(grid, grid**CHALLENGE_SIZE, linestyle=":", color="gray", label="p^12")
    right.axvline(report.bot_accuracy, color="red", linestyle="--", linewidth=1, label="this bot")
    right.set_xlabel("per-image accuracy p")
    right.set_ylabel("challenge success")
    right.set_title("Bot success vs classifier accuracy")
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    return fig


def format_setting(row: dict) -> str:
    """One line for a setting: the spec, then bot and human rates with their intervals."""
    return (
        f"{row['safeguard']}: bot {row['bot_solve_rate']:.2%} [{row['bot_ci_low']:.2%}, {row['bot_ci_high']:.2%}], "
        f"human {row['human_solve_rate']:.2%} [{row['human_ci_low']:.2%}, {row['human_ci_high']:.2%}]"
    )
