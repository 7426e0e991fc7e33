"""`asirra captcha ...`: the CAPTCHA lab. Simulated attacks and the safeguard grid, the defender's
hardened and distorted pools, the attacker ladder and the hardening study."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from asirra.captcha.challenge import SIMULATED_CHALLENGES
from asirra.captcha.defend.config import DEFAULT_STEPS, HardenConfig
from asirra.captcha.defend.distort import DEFAULT_STRENGTH
from asirra.captcha.experiments.defend_grid import DEFAULT_CHALLENGES, HUMAN_FLOOR
from asirra.captcha.experiments.simulate import HUMAN_CHALLENGE_SUCCESS
from asirra.captcha.experiments.study import StudyConfig, quick_config
from asirra.cli.common import DEFAULT_BACKEND, BackendOption, JsonFlag, ModelOption, SeedOption, emit_json, report_skips

SAFEGUARD_HELP = 'none, partial-credit, token-bucket, or a setting such as "token-bucket:capacity=5,cost_per_failure=2"'
_HARDEN = HardenConfig()
_STUDY, _QUICK = StudyConfig(), quick_config()


def _listed(values) -> str:
    return ",".join(str(v) for v in values)


def captcha_simulate(
    data: Path = typer.Option(..., "--data", help="Labelled images: the pool challenges are drawn from."),
    challenges: int = typer.Option(SIMULATED_CHALLENGES, "--challenges", "-n", min=1, help="Challenges to attempt."),
    model: ModelOption = None,
    backend: BackendOption = DEFAULT_BACKEND,
    safeguard: str = typer.Option("none", "--safeguard", help=SAFEGUARD_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=12, help="Score only this many pool images, at random."),
    seed: SeedOption = 0,
    as_json: JsonFlag = False,
) -> None:
    """Attack random 12-image challenges with the classifier, from one client, under a safeguard."""
    import numpy as np

    from asirra.captcha.experiments.simulate import score_pool, simulate_model
    from asirra.captcha.safeguards import parse_safeguard
    from asirra.predict import load_classifier

    policy = parse_safeguard(safeguard)
    classifier = load_classifier(model, backend=backend)
    scored = score_pool(data, classifier, limit, seed)
    report_skips(scored.unusable)
    result = simulate_model(scored.p_dog, scored.labels, challenges, policy, np.random.default_rng(seed),
                            agent=classifier.name)
    if as_json:
        emit_json({**result.to_dict(), "images": len(scored.refs), "skipped": scored.unusable, "seed": seed})
        return
    for line in result.summary_lines(len(scored.refs), len(scored.unusable)):
        typer.echo(line)


def captcha_defend(
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled images to measure the bot (the classifier) on."),
    accuracy: Optional[float] = typer.Option(None, "--accuracy", min=0.0, max=1.0,
                                             help="The bot's per-image accuracy, instead of --data (needs no model)."),
    model: ModelOption = None,
    backend: BackendOption = DEFAULT_BACKEND,
    limit: Optional[int] = typer.Option(None, "--limit", min=12, help="Score only this many images, at random."),
    challenges: int = typer.Option(DEFAULT_CHALLENGES, "--challenges", "-n", min=100, help="Challenges per agent and setting."),
    human: float = typer.Option(HUMAN_CHALLENGE_SUCCESS, "--human", min=0.0, max=1.0,
                                help="Human challenge success (Elson et al.)."),
    human_floor: float = typer.Option(HUMAN_FLOOR, "--human-floor", min=0.0, max=1.0,
                                      help="Recommend only settings keeping humans above this."),
    out: Path = typer.Option(Path("runs/defend"), "--out", help="Folder for defend.csv, defend.json, defend.png."),
    seed: SeedOption = 0,
    as_json: JsonFlag = False,
) -> None:
    """Bot vs human under a grid of partial-credit and token-bucket settings; recommends one."""
    from asirra.captcha.experiments.defend_grid import defend
    from asirra.captcha.experiments.simulate import SimulationError, score_pool
    from asirra.predict import load_classifier

    if (data is None) == (accuracy is None):
        raise SimulationError("give the bot as either --data PATH (measured with the model) or --accuracy P")
    bot = {"bot_accuracy": accuracy}
    if data is not None:
        classifier = load_classifier(model, backend=backend)
        scored = score_pool(data, classifier, limit, seed)
        report_skips(scored.unusable)
        bot = {"bot_proba": scored.p_dog, "bot_labels": scored.labels, "bot_name": classifier.name}
    report = defend(out, **bot, human_success=human, human_floor=human_floor, n_challenges=challenges, seed=seed)
    if as_json:
        emit_json(report.to_dict())
        return
    for line in report.summary_lines(human, human_floor):
        typer.echo(line)


def _report_pool(summary) -> None:
    """What `harden` and `distort` print about the pool they wrote."""
    report_skips(summary.unusable)
    typer.echo(f"{summary.written} images in {summary.out} ({summary.this_run} this run, {len(summary.unusable)} "
               f"unusable); manifest {summary.files['manifest']}, side by side {summary.files['compare']}")


def captcha_harden(
    data: Path = typer.Option(..., "--data", help="Labelled images to harden (any data layout)."),
    out: Path = typer.Option(..., "--out", help="Folder for the hardened pool (cat.N.png, dog.N.png) and its manifest."),
    method: str = typer.Option(_HARDEN.method, "--method", help="fgsm, pgd, random-target / balanced-target "
                               "(label-independent), feature, universal or universal-uncertain (one pattern for all)."),
    epsilon: str = typer.Option(f"{_HARDEN.epsilon_255}/255", "--epsilon",
                                help="L-infinity bound: 4 or 4/255 (255ths), or 0.0157 (a fraction)."),
    surrogates: str = typer.Option(_listed(_HARDEN.surrogates), "--surrogates",
                                   help="Comma-separated defender models: run folders, registry names (runs/surrogates/NAME) "
                                        "or `shipped` (the attacker's model: white-box rows only)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help=f"Gradient steps (default: {DEFAULT_STEPS['fgsm']} "
                                        f"for fgsm, {DEFAULT_STEPS['pgd']} for pgd; asirra.captcha.defend.harden.DEFAULT_STEPS)."),
    eot: int = typer.Option(_HARDEN.eot, "--eot", min=1, help="Random service transformations averaged per gradient."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Harden only this many images, drawn at random."),
    seed: int = typer.Option(_HARDEN.seed, "--seed", help="Seeds the sample, the transformations and random targets."),
    crafting: Optional[Path] = typer.Option(None, "--crafting", help="universal*: labelled images to craft the one "
                                                                     "pattern on (none of them in the pool)."),
    crafting_limit: int = typer.Option(_HARDEN.crafting_limit, "--crafting-limit", min=1,
                                       help="universal*: crafting images drawn from --crafting."),
) -> None:
    """Write a pool of adversarially perturbed images (lossless, within epsilon), resumably."""
    from asirra import api
    from asirra.captcha.experiments.study import parse_list

    _report_pool(api.harden(data, out, limit=limit, method=method, epsilon=epsilon, seed=seed, steps=steps, eot=eot,
                            surrogates=parse_list(surrogates), crafting=str(crafting) if crafting else None,
                            crafting_limit=crafting_limit))


def captcha_distort(
    data: Path = typer.Option(..., "--data", help="Labelled images to distort (any data layout)."),
    out: Path = typer.Option(..., "--out", help="Folder for the distorted pool (cat.N.png, dog.N.png) and its manifest."),
    kind: str = typer.Option(..., "--kind", help=f"{', '.join(DEFAULT_STRENGTH)}."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Per kind (default: a strength people still read: "
                                             + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_STRENGTH.items()) + ")."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Distort only this many images, drawn at random."),
    seed: int = typer.Option(0, "--seed", help="Seeds the sample and every random distortion."),
) -> None:
    """The classic CAPTCHA baseline: random noise, blur, warping, low contrast or clutter, resumably."""
    from asirra.captcha.defend.derived_pool import labelled_sample
    from asirra.captcha.defend.distort import DistortConfig, distort_pool

    config = DistortConfig(kind=kind, strength=strength, seed=seed)
    _report_pool(distort_pool(labelled_sample(data, limit, seed), out, config))


def captcha_build_attacker(
    name: str = typer.Argument(..., help="The rung: shipped, seed-cnn-alt, lite2-probe, adv-trained, passed-challenges, "
                               "bought-labels, bought-aug, residual, finetune, ensemble, self-trained or lookup."),
    out: Path = typer.Option(..., "--out", help="Folder for the attacker (the path it prints is what `asirra attack --model` takes)."),
    data: Optional[Path] = typer.Option(None, "--data", help="The labelled pool the attacker learns from (and the service serves)."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch images as served from this live service (else rendered locally as it would)."),
    budget: Optional[int] = typer.Option(None, "--budget", min=12, help="Training images (default per rung, a few hundred)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the images drawn and the training."),
) -> None:
    """Build one attacker of the ladder as a model folder for `asirra attack --model DIR`."""
    from asirra.captcha.experiments.ladder import build_attacker

    typer.echo(str(build_attacker(name, out, train_data=data, service_url=url, budget=budget, seed=seed)))


def captcha_pool(
    data: Path = typer.Option(..., "--data", help="Labelled photos (e.g. ../shared/datasets/dogs-vs-cats/train)."),
    out: Path = typer.Option(..., "--out", help="Folder for links to the kept photos and pool.json."),
    split: Optional[Path] = typer.Option(None, "--split", help="A split.json whose \"val\" content keys are the photos "
                                         "the model under attack never trained on (default: the shipped model's)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=2, help="Keep a stratified random LIMIT of them."),
    seed: SeedOption = 0,
) -> None:
    """Link the photos the model under attack never trained on (its validation split): the study's pool."""
    from asirra.captcha.experiments.pool import make_pool

    record = make_pool(data, out, split, limit=limit, seed=seed)
    typer.echo(f"{record['photos']:,} photos of {data} in {out} (validation split of {record['split_file']}); "
               f"{out / 'pool.json'}")


def captcha_bill(
    study: Path = typer.Option(..., "--study", help="A finished study's folder (its results.json)."),
    prices: Optional[Path] = typer.Option(None, "--prices", help="Prices to apply (default: the cited prices.toml)."),
) -> None:
    """Reprice a finished study: the bill, the goal check and report.md from results.json and the prices."""
    from asirra.captcha.experiments.study import rewrite

    result = rewrite(study, prices)
    typer.echo(f"goal {'met' if result.goal['met'] else 'not met'}; wrote {result.files['report']}")


def captcha_study(
    data: Path = typer.Option(..., "--data", help="The pool `asirra captcha pool` made (photos the model under attack "
                              "never trained on; any other photo is refused)."),
    out: Path = typer.Option(..., "--out", help="Folder for report.md, results.json, plots and the cache (rerun to resume)."),
    quick: bool = typer.Option(False, "--quick", help=f"A few minutes: seeds {_listed(_QUICK.seeds)}, {_QUICK.scored} "
                               f"scored photos, {_QUICK.method} at eps {_listed(_QUICK.epsilons)}, a "
                               f"{_QUICK.surrogate_epochs}-epoch {_QUICK.surrogate} surrogate (exploratory)."),
    split: Optional[Path] = typer.Option(None, "--split", help="The split.json of the model under attack (default: the "
                                         "shipped model's)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help=f"Comma-separated (default {_listed(_STUDY.seeds)})."),
    scored: Optional[int] = typer.Option(None, "--scored", help=f"Photos served and scored per seed (default {_STUDY.scored})."),
    hardened: Optional[int] = typer.Option(None, "--hardened", help="Photos hardened per setting; seeds draw their scored "
                                           f"set and attacker pool from them (default {_STUDY.hardened})."),
    attacker_pool: Optional[int] = typer.Option(None, "--attacker-pool", help="Each seed's attacker pool is drawn from "
                                                "the first N of those photos, less its scored ones (default "
                                                f"{_STUDY.attacker_pool})."),
    epsilons: Optional[str] = typer.Option(None, "--epsilons", help=f"Comma-separated, in 255ths (default {_listed(_STUDY.epsilons)})."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help=f"Labels bought (default {_listed(_STUDY.budgets)})."),
    attackers: Optional[str] = typer.Option(None, "--attackers", help=f"Ladder rungs (default {_listed(_STUDY.attackers)})."),
    moves: Optional[str] = typer.Option(None, "--moves", help="Counter-moves every rung is scored with, + chains steps "
                                        f"(default {_listed(_STUDY.moves).replace(',median', '+median')})."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Verdict policies served: none, recommended (what "
                                           "`captcha defend` recommends for the measured bot) or a safeguard spec "
                                           f"(default {_listed(_STUDY.policies)})."),
    live_challenges: Optional[int] = typer.Option(None, "--live-challenges", help=f"Per headline cell and seed (default {_STUDY.live_challenges})."),
    side_challenges: Optional[int] = typer.Option(None, "--side-challenges", help=f"Per side cell (default {_STUDY.side_challenges})."),
    practice_challenges: Optional[int] = typer.Option(None, "--practice-challenges", help="Self-training's practice "
                                                      f"challenges (default {_STUDY.practice_challenges})."),
    exploratory: bool = typer.Option(False, "--exploratory", help="Allow fewer than 3 seeds or 200 challenges a cell "
                                     "(marked scouting: never meets the goal)."),
    prices: Optional[Path] = typer.Option(None, "--prices", help="Prices for the bill (default: the cited prices.toml)."),
) -> None:
    """The attacker's bill: hardening x verdict policy x attacker x identity, live, with what a thousand passes cost."""
    from dataclasses import replace

    from asirra import api
    from asirra.captcha.experiments.study import parse_epsilons, parse_list, parse_moves
    from asirra.captcha.experiments.study.plan import parse_ints

    config = quick_config() if quick else StudyConfig()
    given = {"seeds": parse_ints(seeds) if seeds else None, "scored": scored, "hardened": hardened,
             "attacker_pool": attacker_pool,
             "epsilons": parse_epsilons(epsilons) if epsilons else None,
             "budgets": parse_ints(budgets) if budgets else None,
             "attackers": parse_list(attackers) if attackers else None,
             "moves": parse_moves(moves) if moves else None,
             "policies": parse_list(policies) if policies else None,
             "live_challenges": live_challenges, "side_challenges": side_challenges,
             "practice_challenges": practice_challenges, "exploratory": True if exploratory else None}
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    result = api.study(data, out, config=config, split=split, prices=prices)
    typer.echo(f"{len(result.cells)} scored cells, {len(result.live)} live cells; goal "
               f"{'met' if result.goal['met'] else 'not met'}; wrote {result.files['report']}")
