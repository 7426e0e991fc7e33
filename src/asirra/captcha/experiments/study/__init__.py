"""The hardening study as one command: hardening methods x epsilon x attackers x counter-moves, scored on served bytes.

What it does, in order (every stage is cached under OUT, so a rerun resumes where it stopped):

1. Split. The labelled pool is split by a seeded, stratified rule (`split_pool`, recorded in
   OUT/split.json with every source) into a hidden *scored* set (`scored` images, half of each
   class) and a *crafting* set (everything else). Surrogates, universal perturbations and any
   attacker the ladder trains see crafting images only; hidden images are never crafted or tuned on.
2. Surrogates. Registry names (effnet-lite0, seed-cnn, ...) are trained on the crafting set into
   OUT/surrogates/NAME (a linear probe for EfficientNet-Lite, from scratch for seed-cnn); an
   existing model folder is used as given (the caller vouches that it never saw the hidden set).
3. For each method x epsilon, the hidden set is hardened into OUT/pools/METHOD-eEPS (harden_pool:
   resumable; epsilon 0 is the untouched originals, one row shared by every method), served by the
   real service (create_app on a loopback port, in-process uvicorn), and every hidden image is
   fetched once over HTTP (challenges are requested until each pool image has been served once;
   the study owns the service, so it reads which pool image a token is from the store, as the
   tests do). Those served JPEGs, the service's crop, resize and re-encoding included, are what
   every attacker x counter-move classifies: per-image accuracy with its Wilson 95% interval and
   the 12-image pass rate p^12 it implies (the interval's ends raised to the 12th).
4. Headline cells (by default, at each method x epsilon, the strongest attacker with its best
   counter-move on the served bytes) are attacked live with asirra.captcha.attack.bot.attack() against
   the service with its default rate limits: pass rate among answered with its interval, refusals,
   passes per hour per IP, and what a thousand passes cost the bot in machine time.
5. OUT/report.md (every cell, and the goal check), results.csv, results.json, and plots.

In three modules: `plan` (settings, the split, names), `run` (build, serve, score, attack live)
and `report` (the goal check and what is written).

The goal check: is there a setting where the strongest attacker passes <= 10% of live challenges
while the median SSIM stays >= 0.90? The report says which setting came closest if none does.
"""

from asirra.captcha.experiments.study.plan import (
                                                   CLEAN,
                                                   GOAL_PASS_RATE,
                                                   GOAL_SSIM,
                                                   SHIPPED,
                                                   StudyConfig,
                                                   StudyError,
                                                   distortion,
                                                   eps_label,
                                                   is_adaptive,
                                                   parse_epsilons,
                                                   parse_list,
                                                   parse_moves,
                                                   pool_name,
                                                   quick_config,
                                                   split_pool,
)
from asirra.captcha.experiments.study.report import StudyResult, goal_check, report_markdown
from asirra.captcha.experiments.study.run import fetch_served, live_attack, load_attacker, run_study, score_cell

__all__ = ["CLEAN", "GOAL_PASS_RATE", "GOAL_SSIM", "SHIPPED", "StudyConfig", "StudyError", "StudyResult", "distortion",
           "eps_label", "fetch_served", "goal_check", "is_adaptive", "live_attack", "load_attacker", "parse_epsilons",
           "parse_list", "parse_moves", "pool_name", "quick_config", "report_markdown", "run_study", "score_cell",
           "split_pool"]
