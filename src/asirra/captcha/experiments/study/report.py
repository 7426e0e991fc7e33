"""What the study found: the goal check, report.md, results.csv / results.json and the plots."""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from asirra.captcha.experiments.study.plan import (
    CLEAN,
    FARM_PRICE_PER_THOUSAND,
    GOAL_PASS_RATE,
    GOAL_SSIM,
    SPLIT_RULE,
    StudyConfig,
    eps_label,
    is_adaptive,
)
from asirra.fileio import write_json_atomic, write_text_atomic
from asirra.stats import wilson_interval


@dataclass
class StudyResult:
    """What `asirra.captcha.study` found: every scored cell, the live attacks and the goal check."""

    out: Path
    """The study's folder."""
    cells: list[dict]
    """One record per setting x attacker x counter-move: per-image accuracy and p^12 with 95% intervals, SSIM, PSNR."""
    live: list[dict]
    """One record per live attack: pass rate among answered with its interval, passes per hour, the bot's cost per
    thousand passes."""
    goal: dict
    """The goal check: is there a setting where the strongest attacker passes <= 10% of live challenges at a median
    SSIM >= 0.90 ("met"), and which came closest."""
    unbuilt: list = field(default_factory=list)
    """Adaptive attackers that could not be built, and why."""
    attacker_pool: int = 0
    """Images each adaptive attacker could learn from."""
    files: dict = field(default_factory=dict)
    """The files written, by name: "report" (report.md), "csv", "json", the plots."""


def goal_check(cells: list[dict], live: list[dict]) -> dict:
    """Per setting: the strongest attacker's pass rate (live when attacked live, else p^12) and the SSIM."""
    rows = []
    for cell in (c for c in cells if c["strongest"]):
        attacked = next((r for r in live if (r["method"], r["epsilon"], r["attacker"], r["preprocess"])
                         == (cell["method"], cell["epsilon"], cell["attacker"], cell["preprocess"])), None)
        if attacked is not None and attacked["solve_rate"] is not None:
            rate, (low, high), source = attacked["solve_rate"], attacked["solve_rate_ci"], "live"
        else:
            rate, low, high, source = cell["p12"], cell["p12_low"], cell["p12_high"], "p^12"
        rows.append({"method": cell["method"], "epsilon": cell["epsilon"], "attacker": cell["attacker"],
                     "preprocess": cell["preprocess"], "pass_rate": rate, "pass_low": low, "pass_high": high,
                     "source": source, "ssim_median": cell["ssim_median"],
                     # Unhardened originals are the baseline, never a setting that meets the goal.
                     "meets": cell["epsilon"] != 0 and rate <= GOAL_PASS_RATE and cell["ssim_median"] >= GOAL_SSIM})
    met = [r for r in rows if r["meets"]]
    # How close: the lowest pass rate among settings people can still see (SSIM ok), else overall.
    hardened = [r for r in rows if r["epsilon"] != 0]
    seeable = [r for r in hardened if r["ssim_median"] >= GOAL_SSIM]
    candidates = seeable or hardened
    closest = min(candidates, key=lambda r: r["pass_rate"]) if candidates else None
    return {"pass_rate_at_most": GOAL_PASS_RATE, "ssim_median_at_least": GOAL_SSIM, "met": bool(met),
            "settings": rows, "closest": closest, "closest_keeps_ssim": bool(seeable)}


# ---- outputs ------------------------------------------------------------------------------


def _setting(row: dict) -> str:
    if row["epsilon"] is None:
        return f"distortion {row['method']}"
    return f"{row['method']} eps {row['epsilon']}/255"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _ci(row: dict, key: str) -> str:
    return f"{_pct(row[key])} [{_pct(row[key + '_low'])}, {_pct(row[key + '_high'])}]"


def write_outputs(result: StudyResult, config: StudyConfig, hidden: list, craft: list, timings: dict) -> dict:
    out = result.out
    columns = ["method", "epsilon", "attacker", "preprocess", "n", "correct", "accuracy", "accuracy_low",
               "accuracy_high", "p12", "p12_low", "p12_high", "strongest", "ssim_median", "ssim_p10", "psnr_median",
               "linf_max", "seconds_per_image"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(result.cells)
    files = {"csv": str(write_text_atomic(out / "results.csv", buffer.getvalue()))}
    files["json"] = str(write_json_atomic(out / "results.json", {
        "config": asdict(config), "hidden": len(hidden), "craft": len(craft), "cells": result.cells,
        "live": result.live, "goal": result.goal, "unbuilt": result.unbuilt,
        "attacker_pool": result.attacker_pool, "timings_seconds": timings}))
    # Every run's stage times, so the first (uncached) run's cost stays on record after reruns.
    with open(out / "timings.jsonl", "a", encoding="utf-8") as history:
        history.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **timings}) + "\n")
    files.update(write_plots(result, out))
    files["report"] = str(write_text_atomic(out / "report.md", report_markdown(result, config, hidden, craft, timings)))
    return files


def report_markdown(result: StudyResult, config: StudyConfig, hidden: list, craft: list, timings: dict) -> str:
    n = config.scored
    half = {p: (wilson_interval(round(p * n), n)[1] - wilson_interval(round(p * n), n)[0]) / 2 for p in (0.5, 0.9, 0.99)}
    lines = [
        "# Hardening study", "",
        f"Hidden scored set: **{len(hidden)} images** ({len(hidden) // 2} per class), never crafted or tuned on; "
        f"{len(craft)} crafting images ({config.craft_limit or 'all'} of them train the surrogates). "
        f"With {n} images a per-image accuracy's 95% Wilson interval is about "
        f"+/-{half[0.5]:.1%} at 50%, +/-{half[0.9]:.1%} at 90%, +/-{half[0.99]:.1%} at 99%.",
        f"Split rule (split.json): {SPLIT_RULE}; seed {config.seed}.",
        f"Surrogates (the defender's; trained on crafting images): {', '.join(config.surrogates)}. "
        f"Attackers: {', '.join(config.attackers)}. Counter-moves: {', '.join(config.preprocess)}."
        + (f" Distortion baselines (random, not bounded in L-inf; eps shown as -): {', '.join(config.baselines)}."
           if config.baselines else ""),
        "Every figure is on the JPEG bytes the live service served over HTTP (its crop, resize and re-encoding).",
        "",
        "## Goal: strongest attacker <= 10% of challenges passed, median SSIM >= 0.90", "",
    ]
    goal = result.goal
    if goal["met"]:
        winners = [r for r in goal["settings"] if r["meets"]]
        lines.append("**Met** by: " + "; ".join(f"{_setting(r)} ({_pct(r['pass_rate'])} "
                                                 f"{r['source']}, SSIM {r['ssim_median']:.3f})" for r in winners))
    else:
        closest = goal["closest"]
        among = f"with median SSIM >= {GOAL_SSIM}" if goal["closest_keeps_ssim"] else \
            f"(no setting kept median SSIM >= {GOAL_SSIM})"
        lines.append("**Not met** by any setting studied." + (
            f" Closest {among}: {_setting(closest)}, "
            f"{closest['attacker']} + {closest['preprocess']} passes {_pct(closest['pass_rate'])} "
            f"[{_pct(closest['pass_low'])}, {_pct(closest['pass_high'])}] ({closest['source']}), SSIM "
            f"{closest['ssim_median']:.3f}." if closest else ""))
    adaptive = [a for a in config.attackers if is_adaptive(a)]
    lines.append(f"\n\"Strongest\" means the strongest of this run's attackers ({', '.join(config.attackers)}) with its "
                 "best counter-move on the served bytes; the verdict holds for those attackers only. " + (
                     f"Adaptive attackers ({', '.join(adaptive)}) are rebuilt at every setting from "
                     f"{result.attacker_pool} crafting images (never the hidden set) hardened exactly as the served pool is, "
                     "rendered with the service's crop, resize and JPEG re-encoding." if adaptive else
                     "No adaptive attacker (one that learns from labelled hardened images) is in this run."))
    for r in result.unbuilt:
        lines.append(f"- not built: {r['attacker']} at {_setting(r)}: {r['reason']}")
    lines += ["", "| method | eps/255 | strongest attacker | counter-move | pass rate [95% CI] | from | median SSIM | goal |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in goal["settings"]:
        lines.append(f"| {r['method']} | {eps_label(r['epsilon'])} | {r['attacker']} | {r['preprocess']} | {_pct(r['pass_rate'])} "
                     f"[{_pct(r['pass_low'])}, {_pct(r['pass_high'])}] | {r['source']} | {r['ssim_median']:.3f} | "
                     f"{'met' if r['meets'] else 'no'} |")
    lines += ["", "## Every cell (served bytes; p^12 assumes independent mistakes)", "",
              "| method | eps/255 | attacker | counter-move | accuracy [95% CI] | p^12 [95% CI] | SSIM median / p10 | "
              "PSNR median | defender s/img |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result.cells:
        psnr = "inf" if c["psnr_median"] is None else f"{c['psnr_median']:.1f} dB"
        mark = " **(strongest)**" if c["strongest"] else ""
        lines.append(f"| {c['method']} | {eps_label(c['epsilon'])} | {c['attacker']} | {c['preprocess']}{mark} | {_ci(c, 'accuracy')} "
                     f"({c['correct']}/{c['n']}) | {_ci(c, 'p12')} | {c['ssim_median']:.3f} / {c['ssim_p10']:.3f} | {psnr} | "
                     f"{c['seconds_per_image']:.2f} |")
    lines += ["", f"## Live attacks ({config.live_challenges} challenges each, the service's default rate limits)", "",
              f"Cost per thousand passes = machine time at ${config.machine_cost:.2f}/hour (an assumed 2-vCPU cloud "
              f"price) / passes per hour, against ${FARM_PRICE_PER_THOUSAND[0]}-{FARM_PRICE_PER_THOUSAND[1]} per "
              "thousand at human solving farms. Passes per hour are per IP: the limits are per IP.", "",
              "| method | eps/255 | attacker | counter-move | answered | passed | pass rate [95% CI] | refused | waited s | "
              "passes/h/IP | $ per 1000 passes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result.live:
        ci = r["solve_rate_ci"] or [None, None]
        cost = "n/a (no pass)" if r["cost_per_thousand"] is None else f"{r['cost_per_thousand']:.3f}"
        per_hour = "0" if not r["passes_per_hour"] else f"{r['passes_per_hour']:,.0f}"
        lines.append(f"| {r['method']} | {eps_label(r['epsilon'])} | {r['attacker']} | {r['preprocess']} | {r['answered']} | "
                     f"{r['passed']} | {_pct(r['solve_rate'])} [{_pct(ci[0])}, {_pct(ci[1])}] | {r['refused_total']} | "
                     f"{r['waited_seconds']:.0f} | {per_hour} | {cost} |")
    lines += ["", "## Time (seconds per run, from timings.jsonl; cached stages cost ~0 on a rerun)", ""]
    for run in _timing_history(result.out):
        stages = {k: v for k, v in run.items() if k != "finished"}
        lines.append(f"- {run.get('finished', '?')}: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
                     + f"; total {sum(stages.values()):.0f}")
    lines += ["", "Plots: accuracy.png, pass_rate.png, ssim.png.", ""]
    return "\n".join(lines)


def _timing_history(out: Path) -> list[dict]:
    path = out / "timings.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_plots(result: StudyResult, out: Path) -> dict:
    from matplotlib.figure import Figure  # needs no backend: nothing is shown, only saved

    from asirra.plots import save_figure

    cells = result.cells
    # Distortion baselines have no epsilon axis: they are in the report's tables, not on these curves.
    methods = sorted({c["method"] for c in cells if c["method"] != CLEAN and c["epsilon"] is not None}) or [CLEAN]
    series = sorted({(c["attacker"], c["preprocess"]) for c in cells})
    attackers = sorted({a for a, _ in series})
    moves = sorted({m for _, m in series})
    styles = ("-", "--", ":", "-.")

    def line(method, attacker, spec, key):
        rows = sorted((c for c in cells if c["attacker"] == attacker and c["preprocess"] == spec
                       and c["method"] in (method, CLEAN)), key=lambda c: c["epsilon"])
        return ([r["epsilon"] for r in rows], [r[key] for r in rows], [r[key + "_low"] for r in rows],
                [r[key + "_high"] for r in rows])

    files = {}
    for key, title, name in (("accuracy", "per-image accuracy", "accuracy.png"),
                             ("p12", "12-image pass rate", "pass_rate.png")):
        fig = Figure(figsize=(5 * len(methods), 4))
        for i, method in enumerate(methods):
            ax = fig.add_subplot(1, len(methods), i + 1)
            for attacker, spec in series:
                x, y, low, high = line(method, attacker, spec, key)
                # One colour per attacker, one line style per counter-move: 15 series stay readable.
                colour = f"C{attackers.index(attacker) % 10}"
                ax.plot(x, y, marker="o", color=colour, linestyle=styles[moves.index(spec) % len(styles)],
                        label=f"{Path(attacker).name} + {spec}")
                ax.fill_between(x, low, high, color=colour, alpha=0.08)
            if key == "p12":
                for r in (r for r in result.live if r["method"] in (method, CLEAN) and r["solve_rate"] is not None):
                    lo, hi = r["solve_rate_ci"]
                    ax.errorbar([r["epsilon"]], [r["solve_rate"]], yerr=[[r["solve_rate"] - lo], [hi - r["solve_rate"]]],
                                fmt="k*", markersize=10, capsize=3)
                ax.axhline(GOAL_PASS_RATE, color="red", linestyle="--", linewidth=1)
            ax.set(xlabel="epsilon (/255)", ylabel=title, title=f"{method}: {title}" +
                   (" (stars: live attack)" if key == "p12" else ""), ylim=(0, 1.02))
            ax.legend(fontsize=7)
        files[key] = str(save_figure(fig, out / name))
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for method in methods:
        rows = sorted({(c["epsilon"], c["ssim_median"], c["ssim_p10"]) for c in cells if c["method"] in (method, CLEAN)})
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=f"{method} median")
        ax.plot([r[0] for r in rows], [r[2] for r in rows], linestyle=":", label=f"{method} 10th percentile")
    ax.axhline(GOAL_SSIM, color="red", linestyle="--", linewidth=1)
    ax.set(xlabel="epsilon (/255)", ylabel="SSIM vs original", title="what hardening costs the picture")
    ax.legend(fontsize=7)
    files["ssim"] = str(save_figure(fig, out / "ssim.png"))
    return files
