"""The attacker's bill (issue 17): hardening x verdict policy x attacker x identity, live, with what a
thousand passes cost.

What it does, in order (every stage cached under OUT/cache by the content of its inputs, so a rerun
resumes and a changed input recomputes exactly what depends on it):

1. The pool (`asirra captcha pool`): only photos the model under attack never trained on; refused otherwise.
2. The defender (prepare.py): a surrogate on its own photos; the pool hardened once per setting.
3. Per setting and seed (run.py): the scored photos served over HTTP; the attacker's bought labels of
   other photos as served; every ladder rung built (asirra.captcha.experiments.rungs) and scored on the
   served bytes.
4. The strongest rung per setting attacked live under each verdict policy, from one address and from a
   fresh address per challenge; the lookup attack against the fixed pool; simulated people.
5. The bill and the goal (asirra.captcha.experiments.bill), report.md, results.json, plots (report.py).

In modules: `plan` (settings), `prepare` (the defender), `run` (the attackers, live), `report` (what is written).
"""

from asirra.captcha.experiments.study.plan import (
    GOAL_PASS_RATE,
    GOAL_SSIM,
    StudyConfig,
    StudyError,
    StudyResult,
    parse_epsilons,
    parse_list,
    parse_moves,
    quick_config,
)
from asirra.captcha.experiments.study.report import rewrite
from asirra.captcha.experiments.study.run import fetch_served, run_study

__all__ = ["GOAL_PASS_RATE", "GOAL_SSIM", "StudyConfig", "StudyError", "StudyResult", "fetch_served", "parse_epsilons",
           "parse_list", "parse_moves", "quick_config", "rewrite", "run_study"]
