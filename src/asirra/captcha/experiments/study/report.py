"""What the study found: report.md (the goal, the label-budget curve, the stacked defences, the bill, the
lookup attack, every cell), results.json, and the plots (bill.png, budget.png). Everything here is a
function of the results and the prices: `asirra captcha bill` rewrites it from results.json alone."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from asirra.captcha.experiments import bill as billing
from asirra.captcha.experiments.study.plan import GOAL_PASS_RATE, ONE_ADDRESS, StudyResult, pooled
from asirra.fileio import write_json_atomic, write_text_atomic
from asirra.runs import file_key

COMMAND = ("asirra captcha pool --data ../shared/datasets/dogs-vs-cats/train --out runs/study-pool\n"
           "nice -n 10 asirra captcha study --data runs/study-pool --out runs/bill")


def pct(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def dollars(x) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf (no pass)"
    if x == 0:
        return "$0"
    return f"${x:,.2f}" if x >= 0.1 else f"${x:.4f}" if x >= 1e-4 else f"${x:.1e}"


def spread(values: list) -> str:
    """Seeds' point estimates: min-max (SD)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"one seed {pct(values[0])}"
    return f"seeds {pct(min(values))}-{pct(max(values))} (SD {100 * statistics.stdev(values):.1f} pts)"


def write_outputs(result: StudyResult, prices: dict, prices_file=None) -> dict:
    out = result.out
    files = {"json": str(write_json_atomic(out / "results.json", results_json(result, prices_file)))}
    files.update(write_plots(result, prices))
    files["report"] = str(write_text_atomic(out / "report.md", report_markdown(result, prices)))
    with open(out / "timings.jsonl", "a", encoding="utf-8") as history:
        history.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result.timings,
                                  "cache": result.cache_stats}) + "\n")
    return files


def results_json(result: StudyResult, prices_file=None) -> dict:
    return {"config": asdict(result.config), "cells": result.cells, "live": result.live, "builds": result.builds,
            "people": result.people, "lookup": result.lookup, "policies": result.policies, "bill": result.bill,
            "goal": result.goal, "prices_key": file_key(prices_file or billing.PRICES_FILE),
            "timings": result.timings, "cache_stats": result.cache_stats, "machine": result.machine}


# ---- the report ----------------------------------------------------------------------------------------------


def machine_line(machine: dict) -> str:
    """The CPU the attacker's CPU-seconds (and so the bill) were measured on."""
    if not machine:
        return "Machine: not recorded (a study written before the CPU was recorded)."
    flags = ", ".join(machine["flags"]) if machine.get("flags") is not None else "flags unknown"
    return (f"Machine: CPU {machine['model']} ({machine['cores']} cores; {flags}); int8 kernels "
            f"{machine['int8_kernels']['path']}.")


def report_markdown(result: StudyResult, prices: dict) -> str:
    config = result.config
    lines = ["# The attacker's bill: stacked defences, the strongest attacker, what a thousand passes cost", ""]
    if config.exploratory:
        lines += ["**Exploratory run** (fewer seeds or challenges than a headline needs): every row is scouting and "
                  "no setting can meet the goal.", ""]
    lines += [f"Pool: photos the shipped model never trained on (its validation split), checked by content on every "
              f"run. Seeds {', '.join(map(str, config.seeds))}: each draws its own {config.scored} scored photos from "
              f"the service's {config.hardened} photos and its attacker pool from the first {config.attacker_pool} of "
              f"them; the photos served or bought are hardened by {config.method} against the defender's "
              f"{config.surrogate} surrogate ({config.surrogate_images} other photos, surrogate seed "
              f"{config.surrogate_seed}); label budgets {', '.join(map(str, config.budgets))} are nested prefixes of the "
              "attacker pool; no scored photo is ever bought, hardened for training, or practised on.", "",
              machine_line(result.machine), ""]
    lines += goal_section(result)
    lines += budget_section(result, prices)
    lines += stacked_section(result, prices)
    lines += bill_section(result, prices)
    lines += lookup_section(result, prices)
    lines += people_section(result)
    lines += cells_section(result)
    lines += ["## Time and cache", "", "Stage wall seconds this run: " + ", ".join(
        f"{k} {v:.0f}" for k, v in result.timings.items()) + ".",
        "Cached results computed / reused this run: " + ", ".join(
        f"{k} {v['computed']}/{v['reused']}" for k, v in sorted(result.cache_stats.items())) + ".", "",
        "Plots: bill.png (the bill against the people's cost), budget.png (the label-budget curve).", "",
        "Reproduce: `" + COMMAND.replace("\n", "` then `") + "`.", ""]
    return "\n".join(lines)


def goal_section(result: StudyResult) -> list[str]:
    goal = result.goal
    lines = ["## Goal", "",
             f"(a) from one address the strongest rung passes at most {pct(goal['pass_rate_at_most'], 0)} of live "
             "challenges (upper end of the pooled 95% Wilson interval, and no seed above it); (b) an attacker free to "
             f"rotate addresses and buy labels pays at least ${goal['dollars_at_least']:.2f} per 1,000 passes (the cheaper "
             "of one address and a fresh address per challenge, at the low prices and the upper pass rate); simulated "
             f"people pass at least {pct(goal['people_at_least'], 0)} (lower 95% end); median SSIM at least "
             f"{goal['ssim_at_least']:.2f}.", ""]
    if goal["met"]:
        winners = [r for r in goal["settings"] if r["meets"]]
        lines.append("**Met** by: " + "; ".join(f"{r['setting']} + {r['safeguard']}" for r in winners) + ".")
    else:
        closest = goal["closest"]
        lines.append("**Not met** by any setting studied." + (
            f" Closest: {closest['setting']} + {closest['safeguard']}, where {closest['attacker']} passes "
            f"{pct(closest['one_address_rate'])} (upper {pct(closest['one_address_upper'])}) from one address and the "
            f"cheapest bill is {dollars(closest['cheapest_bill'])} per 1,000 passes." if closest else ""))
    lines += ["", "| setting | policy | strongest rung (move) | (a) one address: passed/answered, upper 95% | (b) cheapest "
              "$/1,000 passes | people pass (lower 95%) | median SSIM | goal |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in goal["settings"]:
        a = f"{r['one_address_passed']}/{r['one_address_answered']} = {pct(r['one_address_rate'])}, upper " \
            f"{pct(r['one_address_upper'])} {'ok' if r['a'] else 'no'}"
        b = ", ".join(f"{k} {dollars(v)}" for k, v in r["bill_by_identity"].items()) + (" ok" if r["b"] else " no")
        lines.append(f"| {r['setting']} | {r['safeguard']} | {r['attacker']} ({r['move']}) | {a} | {b} | "
                     f"{pct(r['people_pass'], 2)} ({pct(r['people_ci_low'], 2)}) | {r['ssim_median']:.3f} | "
                     f"{'**met**' if r['meets'] else 'not met'} |")
    return lines + [""]


def best_move(result: StudyResult, setting: str, attacker: str) -> tuple[str, dict] | None:
    moves = sorted({c["move"] for c in result.cells if c["setting"] == setting and c["attacker"] == attacker})
    scored = [(m, pooled(result.cells, setting, attacker, m)) for m in moves]
    return max(scored, key=lambda pair: pair[1]["accuracy"]) if scored else None


def budget_section(result: StudyResult, prices: dict) -> list[str]:
    config = result.config
    lines = ["## The label-budget curve", "",
             "Per-image accuracy on the scored photos as served (pooled over seeds, 95% Wilson interval, the seeds' "
             "spread), each rung with its best counter-move; p^12 beside it (the pass rate of independent mistakes). "
             "Build cost: labels at the cited farm prices plus the build's CPU-seconds at the cited core-hour prices.", ""]
    for setting in sorted({c["setting"] for c in result.cells if c["epsilon"]}):
        rungs = sorted({c["rung"] for c in result.cells if c["setting"] == setting and c["budget"] is not None})
        lines += [f"### {setting}", "", "| rung | " + " | ".join(f"{b:,} labels" for b in config.budgets) + " |",
                  "| --- |" + " --- |" * len(config.budgets)]
        strongest = {}
        for rung in rungs:
            row = [rung]
            for budget in config.budgets:
                found = best_move(result, setting, f"{rung}@{budget}")
                if found is None:
                    row.append("-")
                    continue
                move, s = found
                builds = [b for b in result.builds if b["setting"] == setting and b["attacker"] == f"{rung}@{budget}"]
                cpu = np.mean([b.get("build_cpu_seconds", 0) for b in builds]) if builds else 0.0
                cost = {end: budget * prices["labels"][end] / 1000 + cpu * prices["compute"][end] / 3600 for end in billing.ENDS}
                row.append(f"{pct(s['accuracy'])} [{pct(s['low'])}, {pct(s['high'])}] ({move}); {spread(s['per_seed'])}; "
                           f"p^12 {pct(s['p12'])}; build {cpu:.0f} CPU-s, {dollars(cost['low'])}-{dollars(cost['high'])}")
                if s["accuracy"] > strongest.get(budget, ("", -1))[1]:
                    strongest[budget] = (f"{rung} ({move})", s["accuracy"])
            lines.append("| " + " | ".join(row) + " |")
        shipped = best_move(result, setting, "shipped")
        if shipped:
            move, s = shipped
            lines.append(f"\nThe shipped model (no labels bought), best move {move}: {pct(s['accuracy'])} "
                         f"[{pct(s['low'])}, {pct(s['high'])}], p^12 {pct(s['p12'])}.")
        lines.append("\nStrongest per budget: " + "; ".join(f"{b:,}: {name} {pct(acc)}" for b, (name, acc) in
                                                          sorted(strongest.items())) + ".")
        lines.append("")
    self_trained = [b for b in result.builds if b["rung"] == "self-trained"]
    if self_trained:
        lines.append("Self-training's practice: " + "; ".join(
            f"seed {b['seed']}: {b.get('practice_passed', 0)} of {b.get('practice_challenges', 0)} practice challenges "
            f"passed, {b.get('self_labelled_images', 0)} images labelled free" for b in self_trained) + ".")
        lines.append("")
    return lines


def stacked_section(result: StudyResult, prices: dict) -> list[str]:
    people = {r["safeguard"]: r for r in result.people if "shared_with" not in r}
    lines = ["## Stacked defences, live", "",
             "Each cell is a fresh service (the real app over HTTP on loopback, default rate limits, the study's "
             "address as a trusted proxy) attacked by the strongest rung with its best counter-move. One address: one "
             "cookie jar and one X-Forwarded-For address for the whole run. Rotating: a fresh address, cookie jar and "
             "connection for every challenge; the service's own counters (states created per cookie and per address, "
             "rate-limit keys) show it got fresh state every time. Sustained passes/hour exclude the burst allowance "
             "(counted after the first 429), beside the ceiling the limits allow one address (3,600 challenges an hour "
             "x the pass rate).", "",
             "| setting | policy | identity | rung (move) | passed/answered [95% CI] | seeds | sustained passes/h "
             "(limit x p) | counters: cookie / address states, challenge-limit keys | bytes/challenge | $ per 1,000 "
             "passes (low-high) | one-off | people pass, extra failures/1,000 | SSIM median (p10) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in sorted(result.bill["pooled"], key=lambda r: (r["setting"], r["policy"], r["role"], r["identity"])):
        cells = [c for c in result.live if (c["setting"], c["policy"], c["identity"], c["attacker"], c["move"], c["role"])
                 == (row["setting"], row["policy"], row["identity"], row["attacker"], row["move"], row["role"])]
        sustained = [c["sustained_passes_per_hour"] for c in cells if c.get("sustained_passes_per_hour") is not None]
        ceiling = cells[0]["limit_challenges_per_hour"] * row["p"]
        counters = "; ".join(f"{c['counters']['client_states_created']['cookie']} / "
                             f"{c['counters']['client_states_created']['ip']}, "
                             f"{c['counters']['limit_keys_created']['challenge']}" for c in cells)
        spec = cells[0]["safeguard"]
        person = people.get(spec, {})
        ssim = next((c for c in result.cells if c["setting"] == row["setting"]), {})
        role = "" if row["role"] == "headline" else " (side)"
        rate = np.mean(sustained) if sustained else 0.0
        lines.append(
            f"| {row['setting']} | {spec}{role} | {row['identity']} | {row['attacker']} ({row['move']}) | "
            f"{row['passed']}/{row['answered']} = {pct(row['p'])} [{pct(row['p_lo'])}, {pct(row['p_hi'])}] | "
            f"{spread(row['per_seed'])} | {rate:,.0f} ({ceiling:,.0f}) | {counters} | {row['bytes_c'] / 1024:,.1f} KiB | "
            f"{dollars(row['per_thousand_low'])}-{dollars(row['per_thousand_high'])} | "
            f"{dollars(row['one_off_low'])}-{dollars(row['one_off_high'])} | {pct(person.get('pass_rate'), 2)}, "
            f"{person.get('extra_failures_per_thousand', 0):.1f} | {ssim.get('ssim_median', 1):.3f} "
            f"({ssim.get('ssim_p10', 1):.3f}) |")
    lines.append("")
    lines.append("Every live cell, seed by seed:")
    lines += ["", "| setting | seed | policy | identity | rung (move) | role | attempted | answered | passed | refused | "
              "sustained passes/h | wall s | attacker CPU-s/challenge |", "| --- |" + " --- |" * 12]
    for c in result.live:
        lines.append(f"| {c['setting']} | {c['seed']} | {c['safeguard']} | {c['identity']} | {c['attacker']} ({c['move']}) | "
                     f"{c['role']} | {c['attempted']} | {c['answered']} | {c['passed']} | {c['refused_total']} | "
                     f"{(c.get('sustained_passes_per_hour') or 0):,.0f} | {c['wall_seconds']:.0f} | "
                     f"{c['cpu_seconds_per_challenge']:.2f} |")
    return lines + [""]


def bill_section(result: StudyResult, prices: dict) -> list[str]:
    c = prices["constants"]
    lines = ["## The bill: prices and their sources", "",
             "| input | low | high | unit | sources |", "| --- | --- | --- | --- | --- |"]
    for name in (*billing.INPUTS, "solve_elsewhere"):
        entry = prices.get(name)
        if not entry:
            continue
        sources = entry["low_url"] if entry["low_url"] == entry["high_url"] else f"{entry['low_url']} ; {entry['high_url']}"
        lines.append(f"| {name} | {entry['low']:g} | {entry['high']:g} | {entry['unit']} | {sources} (read {entry['retrieved']}) |")
    lines += ["", f"Constants: USD/EUR {c.get('usd_per_eur')}; wire overhead x{c['wire_overhead']} on the HTTP bytes "
              f"counted; a rung's one-off cost spread over {c['amortise_thousand_passes']} thousand passes. Formula: "
              "$ per 1,000 passes = 1000 / p x (CPU-s/challenge x compute/3600 + [rotating] bytes/challenge x overhead x "
              "proxy/2^30 + [one address] address-hour/3600 + labels/challenge x label price/1000) + one-off / amortisation; "
              "low = low prices at the upper pass rate, high = high prices at the lower pass rate "
              "(asirra/captcha/experiments/bill.py).", ""]
    return lines


def lookup_section(result: StudyResult, prices: dict) -> list[str]:
    lookup = result.lookup or {}
    if not lookup:
        return []
    lines = ["## The lookup attack: pool size and turnover", ""]
    precision = lookup.get("precision") or []
    if precision:
        lines += ["Matcher (12x12 thumbnail of the centre, nearest vs second-nearest ratio 0.7), one served rendering "
                  "per photo in the table, a fresh rendering asked; strangers are photos outside the table:", "",
                  "| table size | asked | found (recall) | right photo | right label | strangers wrongly found |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in precision:
            lines.append(f"| {r['table']:,} | {r['queries']} | {r['accepted']} ({pct(r['recall'])}) | "
                         f"{pct(r['precision'])} | {pct(r['label_precision'])} | {r['strangers_accepted']}/{r['strangers']} |")
        worst = min((r["label_precision"] for r in precision if r["label_precision"] is not None), default=None)
        if worst is not None:
            even = billing.lookup_break_even(worst, prices)
            lines += ["", f"Break-even: with every label right at rate {pct(worst)}, a known challenge passes "
                      f"{pct(even['pass_rate_if_known'])}; each photo new to the table is bought once, so the table stops "
                      "paying ($1 per 1,000 passes) only when the defender adds "
                      f"{even['new_photos_per_challenge']['high']:.2f}-{even['new_photos_per_challenge']['low']:.2f} new "
                      "photos per challenge the attacker runs (high-low label price): at one address's 3,600 challenges "
                      f"an hour, {3600 * even['new_photos_per_challenge']['high']:,.0f}-"
                      f"{3600 * even['new_photos_per_challenge']['low']:,.0f} new photos an hour per attacking address. "
                      "The pool's size only sets the one-off (N labels); it does not make the table stop paying."]
    for setting, data in sorted((k, v) for k, v in lookup.items() if k != "precision"):
        for r in data.get("live", []):
            lines.append(f"- {setting}, {r['safeguard']}: a relay with an empty table against the fixed pool of "
                         f"{r['pool']} photos passed {r['passed']}/{r['answered']} ({pct(r['passed'] / r['answered'] if r['answered'] else None)}), "
                         f"buying {r['labels_bought']} labels ({r['labels_bought'] / max(1, r['attempted']):.1f} per "
                         f"challenge; {r['looked_up']} images answered from the table).")
    return lines + [""]


def people_section(result: StudyResult) -> list[str]:
    lines = ["## People", "", "Simulated people at the published 99.6% per challenge (per image 0.99967), one person "
             "answering challenge after challenge (a bucket's long-run cost). The hardening's cost to people is measured "
             "only as SSIM: at 99.6% a person makes one mistake in ~3,000 photos; people stay at 99% only if hardening "
             "adds less than 0.050 points of per-image error with no safeguard (0.0085 under a capacity-1 bucket). No "
             "human study was possible here; perturbations transferred from ensembles of networks have biased "
             "time-limited human observers (Elsayed et al., NeurIPS 2018).", "",
             "| policy | challenges | pass [95% CI] | extra failures per 1,000 |", "| --- | --- | --- | --- |"]
    for r in (r for r in result.people if "shared_with" not in r):
        lines.append(f"| {r['safeguard']} | {r['challenges']:,} | {pct(r['pass_rate'], 2)} [{pct(r['ci_low'], 2)}, "
                     f"{pct(r['ci_high'], 2)}] | {r['extra_failures_per_thousand']:.1f} |")
    shared = [r for r in result.people if "shared_with" in r]
    if shared:
        lines += ["", f"Behind one address with a bot ({shared[0]['people']} people and {shared[0]['shared_with']} at "
                  f"{pct(shared[0]['bot_accuracy'])} per image at {shared[0]['setting']}, one challenge each per round; "
                  "every answer judged by its cookie's history and the address's, the stricter winning):", "",
                  "| policy | people's challenges | people pass [95% CI] | extra failures per 1,000 |",
                  "| --- | --- | --- | --- |"]
        for r in shared:
            lines.append(f"| {r['safeguard']} | {r['challenges']:,} | {pct(r['pass_rate'], 2)} [{pct(r['ci_low'], 2)}, "
                         f"{pct(r['ci_high'], 2)}] | {r['extra_failures_per_thousand']:.1f} |")
    return lines + [""]


def cells_section(result: StudyResult) -> list[str]:
    lines = ["## Every scored cell (served bytes; seed by seed)", "",
             "| setting | seed | attacker | move | correct/n | accuracy [95% CI] | p^12 | SSIM median |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result.cells:
        lines.append(f"| {c['setting']} | {c['seed']} | {c['attacker']} | {c['move']} | {c['correct']}/{c['n']} | "
                     f"{pct(c['accuracy'])} [{pct(c['accuracy_low'])}, {pct(c['accuracy_high'])}] | {pct(c['p12'])} | "
                     f"{c['ssim_median']:.3f} |")
    return lines + [""]


# ---- plots ------------------------------------------------------------------------------------------------------


def write_plots(result: StudyResult, prices: dict) -> dict:
    from matplotlib.figure import Figure  # needs no backend: nothing is shown, only saved

    from asirra.plots import save_figure

    files = {}
    people = {r["safeguard"]: r for r in result.people if "shared_with" not in r}
    fig = Figure(figsize=(12, 4.8))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    settings = sorted({r["setting"] for r in result.bill["pooled"]})
    policies = sorted({r["policy"] for r in result.bill["pooled"]})
    shapes = "os^Dv"
    for row in result.bill["pooled"]:
        spec = next(c["safeguard"] for c in result.live if c["setting"] == row["setting"] and c["policy"] == row["policy"])
        x = people[spec]["extra_failures_per_thousand"]
        low, high = row["per_thousand_low"], row["per_thousand_high"]
        if math.isinf(low):
            continue
        y = math.sqrt(low * (high if not math.isinf(high) else low))
        colour = f"C{settings.index(row['setting'])}"
        marker = shapes[policies.index(row["policy"]) % len(shapes)]
        face = colour if row["identity"] == ONE_ADDRESS else "none"
        ax.errorbar([x], [y], yerr=[[max(0.0, y - low)], [max(0.0, (high if not math.isinf(high) else y) - y)]], fmt=marker, color=colour,
                    mfc=face, capsize=3, alpha=0.9 if row["role"] == "headline" else 0.4,
                    label=f"{row['setting']}, {spec}, {row['identity']}" + ("" if row["role"] == "headline" else " (side)"))
        if row["identity"] == ONE_ADDRESS:
            ax2.errorbar([people[spec]["pass_rate"]], [row["p"]], yerr=[[max(0.0, row["p"] - row["p_lo"])], [max(0.0, row["p_hi"] - row["p"])]],
                         fmt=marker, color=colour, mfc=face, capsize=3, label=f"{row['setting']}, {spec}")
    ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="goal (b): $1")
    ax.axhline(prices["solve_elsewhere"]["low"], color="grey", linestyle=":", linewidth=1, label="AI solver $0.80")
    ax.axhspan(0.5, 3.0, color="orange", alpha=0.12, label="human farms $0.5-3")
    ax.axvline(1000 * (billing.HUMAN_CHALLENGE - billing.PEOPLE_FLOOR), color="black", linestyle="--", linewidth=1,
               label="people at 99%")
    ax.set(yscale="log", xlabel="extra failures per 1,000 challenges for people (vs 99.6%)",
           ylabel="attacker $ per 1,000 passes (low-high)", title="the attacker's bill against the people's cost")
    ax.legend(fontsize=6)
    ax2.axhline(GOAL_PASS_RATE, color="red", linestyle="--", linewidth=1, label="goal (a): 10%")
    ax2.axvline(billing.PEOPLE_FLOOR, color="black", linestyle="--", linewidth=1)
    ax2.set(xlabel="simulated people's pass rate", ylabel="one-address live pass rate [95% CI]",
            title="one address: bot vs people")
    ax2.legend(fontsize=6)
    files["bill_plot"] = str(save_figure(fig, result.out / "bill.png"))

    hardened = sorted({c["setting"] for c in result.cells if c["epsilon"]})
    if hardened:
        fig = Figure(figsize=(6 * len(hardened), 4.5))
        for i, setting in enumerate(hardened):
            ax = fig.add_subplot(1, len(hardened), i + 1)
            rungs = sorted({c["rung"] for c in result.cells if c["setting"] == setting and c["budget"] is not None})
            for j, rung in enumerate(rungs):
                points = []
                for budget in result.config.budgets:
                    found = best_move(result, setting, f"{rung}@{budget}")
                    if found:
                        points.append((budget, found[1]))
                if not points:
                    continue
                x = [b for b, _ in points]
                ax.errorbar(x, [s["accuracy"] for _, s in points],
                            yerr=[[max(0.0, s["accuracy"] - s["low"]) for _, s in points],
                                  [max(0.0, s["high"] - s["accuracy"]) for _, s in points]],
                            marker="o", capsize=3, color=f"C{j}", label=rung)
            shipped = best_move(result, setting, "shipped")
            if shipped:
                ax.axhline(shipped[1]["accuracy"], color="black", linestyle=":", label=f"shipped ({shipped[0]})")
            ax.set(xscale="log", xlabel="labels bought", ylabel="per-image accuracy on served scored photos",
                   title=f"{setting}: the label-budget curve")
            ax.legend(fontsize=7)
        files["budget_plot"] = str(save_figure(fig, result.out / "budget.png"))
    return files


def rewrite(study_dir, prices_file=None) -> StudyResult:
    """`asirra captcha bill`: the bill, the goal and the report again from results.json and (new) prices."""
    result = StudyResult.from_json(Path(study_dir) / "results.json")
    prices = billing.load_prices(prices_file)
    result.bill = billing.bill(result, prices)
    result.goal = billing.goal_check(result, prices)
    result.files = write_outputs(result, prices, prices_file)
    return result
