"""The attacker's bill and the people's side: what a thousand passes cost, and what each setting costs people.

The study records quantities only (CPU-seconds, HTTP bytes, labels bought, passes and challenges);
prices come from prices.toml (each with its source) and are applied here, when the report is
written, so `asirra captcha bill` reprices a finished study without rerunning it.

Per live cell, with pass rate p (passed / answered, Wilson interval [p_lo, p_hi]):

  marginal per challenge = cpu_c x compute/3600
                         + bytes_c x wire_overhead x proxy_gb / 2^30     (rotating: a proxy bills every byte)
                         + address_hour / 3600                           (one address: its rent over the at most
                                                                          3,600 challenges an hour the limits let it carry)
                         + labels_c x labels/1000                        (the lookup relay buys unknown photos)
  $ per 1,000 passes     = 1000 / p x marginal + one-off / amortise_thousand_passes
  one-off                = labels bought x labels/1000 + build CPU-seconds x compute/3600

A range pairs low prices with p_hi ("low": what the cheapest shopper with the luckiest interval pays)
and high prices with p_lo. Goal (b) is checked on the low end.

People: simulated at the published 99.6% per challenge (per image 0.996^(1/12)), each person one
client answering challenge after challenge, so a token bucket's long-run cost shows (q^2 for capacity 1).
The hardening's cost to people is measured only as SSIM; no human study was possible here.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np

from asirra.captcha.challenge import CHALLENGE_SIZE
from asirra.errors import ConfigError
from asirra.stats import wilson_interval

PRICES_FILE = Path(__file__).with_name("prices.toml")
INPUTS = ("compute", "labels", "proxy_gb", "address_hour")
ENDS = ("low", "high")
HUMAN_CHALLENGE = 0.996  # Elson et al. 2007
PEOPLE_FLOOR = 0.99


class PriceError(ConfigError):
    """A prices file the bill cannot use (a price without a source, or missing)."""


def load_prices(path: str | Path | None = None) -> dict:
    """prices.toml, checked: every input has a low and a high price, each with an https source."""
    path = Path(path or PRICES_FILE)
    try:
        prices = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PriceError(f"cannot read prices {path}: {exc}") from None
    for name in INPUTS:
        entry = prices.get(name)
        if not isinstance(entry, dict):
            raise PriceError(f"{path}: no [{name}] price")
        for end in ENDS:
            if not isinstance(entry.get(end), (int, float)) or entry[end] < 0:
                raise PriceError(f"{path}: [{name}] needs a non-negative {end} price")
            if not str(entry.get(f"{end}_url", "")).startswith("https://"):
                raise PriceError(f"{path}: [{name}] {end} price has no source (an https {end}_url)")
    constants = prices.get("constants", {})
    for name in ("wire_overhead", "amortise_thousand_passes"):
        if not isinstance(constants.get(name), (int, float)) or constants[name] <= 0:
            raise PriceError(f"{path}: [constants] needs a positive {name}")
    return prices


# ---- quantities ---------------------------------------------------------------------------------------


def quantities(cell: dict) -> dict:
    """What a live cell measured, as the bill needs it."""
    answered, passed = cell["answered"], cell["passed"]
    low, high = wilson_interval(passed, answered) if answered else (0.0, 1.0)
    attempted = max(1, cell["attempted"])
    return {"p": passed / answered if answered else 0.0, "p_lo": low, "p_hi": high, "passed": passed,
            "answered": answered, "cpu_c": cell.get("cpu_seconds_per_challenge", 0.0),
            "bytes_c": cell.get("bytes_per_challenge") or 0.0,
            "labels_c": cell.get("labels_bought", 0) / attempted, "rotating": cell["identity"] == "rotating"}


def marginal(q: dict, prices: dict, end: str) -> float:
    """Dollars per challenge attempted."""
    c = prices["constants"]
    dollars = q["cpu_c"] * prices["compute"][end] / 3600 + q["labels_c"] * prices["labels"][end] / 1000
    if q["rotating"]:
        dollars += q["bytes_c"] * c["wire_overhead"] * prices["proxy_gb"][end] / 2**30
    else:
        dollars += prices["address_hour"][end] / 3600
    return dollars


def one_off(build: dict | None, prices: dict, end: str) -> float:
    """A rung's build: its labels and CPU (members' builds included in `build`)."""
    if not build:
        return 0.0
    return build.get("labels_bought", 0) * prices["labels"][end] / 1000 + \
        build.get("build_cpu_seconds", 0.0) * prices["compute"][end] / 3600


def per_thousand(q: dict, prices: dict, end: str, build: dict | None = None) -> float:
    """Dollars per 1,000 passes: low end = low prices at p_hi, high end = high prices at p_lo."""
    p = q["p_hi"] if end == "low" else q["p_lo"]
    amortised = one_off(build, prices, end) / prices["constants"]["amortise_thousand_passes"]
    return math.inf if p <= 0 else 1000 / p * marginal(q, prices, end) + amortised


def pooled_cells(cells: list) -> dict:
    """Several seeds' cells of one kind as one: passes and answers summed, per-challenge quantities averaged
    by challenges."""
    answered = sum(c["answered"] for c in cells)
    attempted = sum(c["attempted"] for c in cells)
    weight = lambda key: sum(c.get(key, 0.0) * c["attempted"] for c in cells) / max(1, attempted)  # noqa: E731
    return {"answered": answered, "passed": sum(c["passed"] for c in cells), "attempted": attempted,
            "cpu_seconds_per_challenge": weight("cpu_seconds_per_challenge"),
            "bytes_per_challenge": weight("bytes_per_challenge"), "identity": cells[0]["identity"],
            "labels_bought": sum(c.get("labels_bought", 0) for c in cells)}


def build_of(builds: list, setting: str, seed: int, attacker: str) -> dict | None:
    """A rung's one-off build at a seed, its members' builds added (the ensemble needs bought-aug and residual)."""
    from asirra.captcha.experiments.rungs import NEEDS

    def find(label):
        return next((b for b in builds if b["setting"] == setting and b["seed"] == seed and b["attacker"] == label), None)

    own = find(attacker)
    if own is None:
        return None
    total = {"labels_bought": own.get("labels_bought", 0), "build_cpu_seconds": own.get("build_cpu_seconds", 0.0)}
    budget = attacker.split("@")[1] if "@" in attacker else None
    for member in NEEDS.get(own["rung"], ()):
        sub = find(f"{member}@{budget}")
        if sub:
            total["build_cpu_seconds"] += sub.get("build_cpu_seconds", 0.0)
    return total


def bill(result, prices: dict) -> dict:
    """Every live cell's bill, and per (setting, policy, identity, attacker) the seeds pooled."""
    rows, groups = [], {}
    for cell in result.live:
        q = quantities(cell)
        build = build_of(result.builds, cell["setting"], cell["seed"], cell["attacker"])
        row = {k: cell[k] for k in ("setting", "epsilon", "seed", "attacker", "move", "policy", "safeguard", "identity",
                                    "role")}
        row.update(q)
        for end in ENDS:
            row[f"marginal_{end}"] = marginal(q, prices, end)
            row[f"one_off_{end}"] = one_off(build, prices, end)
            row[f"per_thousand_{end}"] = per_thousand(q, prices, end, build)
        rows.append(row)
        groups.setdefault((cell["setting"], cell["policy"], cell["identity"], cell["attacker"], cell["move"],
                           cell["role"]), []).append(cell)
    pooled = []
    for (setting, policy, identity, attacker, move, role), cells in groups.items():
        q = quantities(pooled_cells(cells))
        builds = [build_of(result.builds, setting, c["seed"], attacker) for c in cells]
        build = {"labels_bought": float(np.mean([b["labels_bought"] for b in builds if b] or [0])),
                 "build_cpu_seconds": float(np.mean([b["build_cpu_seconds"] for b in builds if b] or [0]))}
        row = {"setting": setting, "policy": policy, "identity": identity, "attacker": attacker, "move": move,
               "role": role, "seeds": len(cells), "per_seed": [c["passed"] / c["answered"] if c["answered"] else None
                                                                for c in cells], **q}
        for end in ENDS:
            row[f"marginal_{end}"] = marginal(q, prices, end)
            row[f"one_off_{end}"] = one_off(build, prices, end)
            row[f"per_thousand_{end}"] = per_thousand(q, prices, end, build)
        pooled.append(row)
    return {"cells": rows, "pooled": pooled}


# ---- people --------------------------------------------------------------------------------------------


def people_rows(specs: list[str], n: int, seed: int) -> list[dict]:
    """Simulated people (99.6% a challenge) under each verdict policy, one client answering n challenges in a row."""
    from asirra.captcha.experiments.simulate import accuracy_for_challenge_success, agent_mistakes, judge_responses
    from asirra.captcha.safeguards import parse_safeguard

    accuracy = accuracy_for_challenge_success(HUMAN_CHALLENGE)
    mistakes = agent_mistakes(accuracy, n, np.random.default_rng(seed))  # the same people under every policy
    rows = []
    for spec in specs:
        result = judge_responses(mistakes, parse_safeguard(spec), "people", accuracy)
        low, high = result.ci
        rows.append({"safeguard": spec, "challenges": n, "passed": result.solved, "pass_rate": result.solve_rate,
                     "ci_low": low, "ci_high": high, "extra_failures_per_thousand": 1000 * (HUMAN_CHALLENGE - result.solve_rate)})
    return rows


def shared_address_people(spec: str, bot_accuracy: float, people: int = 10, rounds: int = 2000, seed: int = 0) -> dict:
    """People behind one address (an office, a carrier's NAT) with a bot among them: each round every person
    answers one challenge on their own cookie and the bot one on its own; the service judges each answer against
    the cookie's history and the address's, the stricter wins (asirra.captcha.service.clients.SafeguardStates)."""
    from asirra.captcha.experiments.simulate import accuracy_for_challenge_success, agent_mistakes
    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service.clients import SafeguardStates

    rng = np.random.default_rng(seed)
    states = SafeguardStates(parse_safeguard(spec))
    human = agent_mistakes(accuracy_for_challenge_success(HUMAN_CHALLENGE), rounds * people, rng).reshape(rounds, people)
    bot = agent_mistakes(bot_accuracy, rounds, rng)
    passed = 0
    for r in range(rounds):
        for person in range(people):
            passed += states.judge(f"person-{person}", "shared", int(human[r, person])) == "pass"
        states.judge("bot", "shared", int(bot[r]))
    n = rounds * people
    low, high = wilson_interval(passed, n)
    return {"safeguard": spec, "people": people, "bot_accuracy": bot_accuracy, "challenges": n, "pass_rate": passed / n,
            "ci_low": low, "ci_high": high, "extra_failures_per_thousand": 1000 * (HUMAN_CHALLENGE - passed / n)}


# ---- lookup ---------------------------------------------------------------------------------------------


def matcher_precision(photos: list, seed: int, progress: bool = False, sizes=(300, 1000, 3000), queries: int = 300) -> list:
    """How well a served rendering is found in a table of N other renderings (one per photo), and how often a
    photo outside the table is wrongly "found": model-free, on the pool's clean photos."""
    import random

    from asirra.captcha.attack.solvers import LookupSolver, thumbnail
    from asirra.captcha.rendering import RenderSettings, render_jpeg
    from asirra.images import load_image

    settings = RenderSettings()
    order = [photos[i] for i in np.random.default_rng([seed, 5]).permutation(len(photos))]
    rows = []
    cache: dict = {}

    def thumb(photo, copy):
        if (photo.key, copy) not in cache:
            image = load_image(photo.ref.read_bytes(), draft_size=settings.image_side[1])
            cache[(photo.key, copy)] = thumbnail(render_jpeg(image, random.Random(f"{photo.key}:{copy}"), settings))
        return cache[(photo.key, copy)]

    for n in sizes:
        if n + queries > len(order):
            continue
        table, strangers = order[:n], order[n:n + queries]
        solver = LookupSolver(np.stack([thumb(p, 0) for p in table]), np.array([p.label for p in table]))
        asked = table[:queries]
        found = [solver.match(thumb(p, 1)) for p in asked]
        accepted = [(row, p) for row, p in zip(found, asked) if row is not None]
        right = sum(table[row].key == p.key for row, p in accepted)
        label_right = sum(table[row].label == p.label for row, p in accepted)
        false = sum(solver.match(thumb(p, 1)) is not None for p in strangers)
        rows.append({"table": n, "queries": len(asked), "accepted": len(accepted), "right_photo": right,
                     "right_label": label_right, "precision": right / len(accepted) if accepted else None,
                     "label_precision": label_right / len(accepted) if accepted else None,
                     "recall": len(accepted) / len(asked), "strangers": len(strangers), "strangers_accepted": false})
    return rows


def lookup_break_even(label_precision: float, prices: dict, cpu_c: float = 0.0) -> dict:
    """New photos the defender must add per challenge the attacker runs before a lookup table stops paying
    ($1 per 1,000 passes), at each end of the label price: each new photo is bought once."""
    out = {}
    q = label_precision ** CHALLENGE_SIZE  # a challenge passes when all 12 are right
    for end in ENDS:
        per_label = prices["labels"][end] / 1000
        compute = cpu_c * prices["compute"][end] / 3600
        # $ per 1,000 passes = 1000 / q x (new photos per challenge x per_label + compute) = $1
        out[end] = max(0.0, (q / 1000 - compute) / per_label)
    return {"pass_rate_if_known": q, "new_photos_per_challenge": out}


# ---- the goal -----------------------------------------------------------------------------------------------


def goal_check(result, prices: dict) -> dict:
    """Per setting and policy: (a) the strongest one-address rung's pooled live pass rate, upper 95% end <= 10%
    (and no seed's point estimate above it); (b) the cheapest bill an attacker free to rotate pays (one address
    or a fresh one per challenge, low prices, p_hi) >= $1 per 1,000 passes; people >= 99% (lower 95% end);
    median SSIM >= 0.90. A setting meets the goal only in a headline run and with hardening (eps > 0)."""
    from asirra.captcha.experiments.study.plan import GOAL_DOLLARS_PER_THOUSAND, GOAL_PASS_RATE, GOAL_SSIM

    config = result.config
    people = {row["safeguard"]: row for row in result.people if "shared_with" not in row}
    pooled = [r for r in result.bill["pooled"] if r["role"] == "headline"]
    rows = []
    for (setting, policy) in sorted({(r["setting"], r["policy"]) for r in pooled}):
        spec = result.policies[setting][policy]
        mine = [r for r in pooled if r["setting"] == setting and r["policy"] == policy]
        one = next((r for r in mine if r["identity"] == "one-address"), None)
        rotating = next((r for r in mine if r["identity"] == "rotating"), None)
        eps = next(c["epsilon"] for c in result.live if c["setting"] == setting)
        ssim = next((c["ssim_median"] for c in result.cells if c["setting"] == setting), 1.0)
        upper = one["p_hi"] if one else None
        seed_max = max((p for p in one["per_seed"] if p is not None), default=None) if one else None
        a = one is not None and upper <= GOAL_PASS_RATE and (seed_max or 0) <= GOAL_PASS_RATE
        strategies = {r["identity"]: r["per_thousand_low"] for r in (one, rotating) if r is not None}
        cheapest = min(strategies.values()) if strategies else None
        b = cheapest is not None and cheapest >= GOAL_DOLLARS_PER_THOUSAND
        person = people[spec]
        people_ok = person["ci_low"] >= PEOPLE_FLOOR
        rows.append({"setting": setting, "epsilon": eps, "policy": policy, "safeguard": spec,
                     "attacker": one["attacker"] if one else None, "move": one["move"] if one else None,
                     "one_address_passed": one["passed"] if one else None,
                     "one_address_answered": one["answered"] if one else None,
                     "one_address_rate": one["p"] if one else None, "one_address_upper": upper,
                     "seed_max": seed_max, "a": a, "bill_by_identity": strategies, "cheapest_bill": cheapest, "b": b,
                     "people_pass": person["pass_rate"], "people_ci_low": person["ci_low"], "people_ok": people_ok,
                     "ssim_median": ssim, "ssim_ok": ssim >= GOAL_SSIM,
                     "meets": bool(config.headline and eps > 0 and a and b and people_ok and ssim >= GOAL_SSIM)})
    met = [r for r in rows if r["meets"]]
    candidates = [r for r in rows if r["epsilon"] > 0] or rows
    closest = min(candidates, key=lambda r: (not r["ssim_ok"], r["one_address_upper"] if r["one_address_upper"]
                                             is not None else 1.0)) if candidates else None
    return {"met": bool(met), "headline": config.headline, "settings": rows, "closest": closest,
            "pass_rate_at_most": GOAL_PASS_RATE, "dollars_at_least": GOAL_DOLLARS_PER_THOUSAND,
            "ssim_at_least": GOAL_SSIM, "people_at_least": PEOPLE_FLOOR}
