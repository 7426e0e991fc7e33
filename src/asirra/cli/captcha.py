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
from asirra.config import default

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
    name: str = typer.Argument(..., help="The rung: shipped, seed-cnn-alt, lite2-probe, bought-labels, adv-trained or passed-challenges."),
    out: Path = typer.Option(..., "--out", help="Folder for the attacker (its model/ is what `asirra attack --model` takes)."),
    data: Optional[Path] = typer.Option(None, "--data", help="The labelled pool the attacker learns from (and the service serves)."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch images as served from this live service (else rendered locally as it would)."),
    budget: Optional[int] = typer.Option(None, "--budget", min=12, help="Training images (default per rung, a few hundred)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the images drawn and the training."),
) -> None:
    """Build one attacker of the ladder as a model folder for `asirra attack --model DIR`."""
    from asirra.captcha.experiments.ladder import build_attacker

    typer.echo(str(build_attacker(name, out, train_data=data, service_url=url, budget=budget, seed=seed)))


def captcha_study(
    data: Path = typer.Option(..., "--data", help="Labelled pool: split into a hidden scored set and crafting images."),
    out: Path = typer.Option(..., "--out", help="Folder for report.md, results.csv/json, plots and the cache (rerun to resume)."),
    quick: bool = typer.Option(False, "--quick", help=f"A few minutes: {_QUICK.scored} hidden images, eps "
                               f"{_listed(_QUICK.epsilons)}, {_listed(_QUICK.methods)}, a {_QUICK.surrogate_epochs}-epoch "
                               f"{_listed(_QUICK.surrogates)} surrogate."),
    scored: Optional[int] = typer.Option(None, "--scored", help=f"Hidden images scored in every cell "
                                         f"(default {_STUDY.scored}; --quick {_QUICK.scored})."),
    craft_limit: Optional[int] = typer.Option(None, "--craft-limit", help=f"Crafting images the surrogates train on "
                                              f"(default {_STUDY.craft_limit})."),
    methods: Optional[str] = typer.Option(None, "--methods", help=f"Comma-separated harden methods (default {_listed(_STUDY.methods)})."),
    epsilons: Optional[str] = typer.Option(None, "--epsilons", help=f"Comma-separated, in 255ths "
                                           f"(default {_listed(_STUDY.epsilons)})."),
    attackers: Optional[str] = typer.Option(None, "--attackers", help="Comma-separated: shipped, model folders, or ladder "
                                            f"names (default {_listed(_STUDY.attackers)})."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess",
                                             help="Comma-separated counter-moves, + chains steps: none,jpeg:75,median:3,jpeg:75+median:3 "
                                                  f"(default {_listed(_STUDY.preprocess)})."),
    surrogates: Optional[str] = typer.Option(None, "--surrogates", help="Comma-separated defender models (default "
                                             f"{_listed(_STUDY.surrogates)}, trained on the crafting images)."),
    headline: Optional[str] = typer.Option(None, "--headline", help=f"Live attacks: strongest, all or none (default {_STUDY.headline})."),
    live_challenges: Optional[int] = typer.Option(None, "--live-challenges", help=f"Challenges per live attack "
                                                  f"(default {_STUDY.live_challenges})."),
    attacker_pool: Optional[int] = typer.Option(None, "--attacker-pool", min=12,
                                                help=f"Crafting images adaptive attackers learn from, hardened per setting "
                                                     f"(default {_STUDY.attacker_pool})."),
    baselines: Optional[str] = typer.Option(None, "--baselines", help="Comma-separated distortion baselines served and attacked "
                                            "the same way: noise, blur, warp, contrast, clutter, or KIND:STRENGTH "
                                            f"(default none; --quick {_listed(_QUICK.baselines)})."),
    seed: SeedOption = default("seed", of=StudyConfig),
) -> None:
    """The hardening study: methods x epsilon x attackers x counter-moves on served bytes, with live attacks."""
    from asirra import api
    from asirra.captcha.experiments.study import parse_epsilons, parse_list, parse_moves

    given = {"scored": scored, "craft_limit": craft_limit, "headline": headline, "live_challenges": live_challenges,
             "attacker_pool": attacker_pool, "baselines": parse_list(baselines) if baselines else None,
             "methods": parse_list(methods) if methods else None,
             "epsilons": parse_epsilons(epsilons) if epsilons else None,
             "attackers": parse_list(attackers) if attackers else None,
             "preprocess": parse_moves(preprocess) if preprocess else None,
             "surrogates": parse_list(surrogates) if surrogates else None}
    result = api.study(data, out, quick=quick, seed=seed, **{k: v for k, v in given.items() if v is not None})
    typer.echo(f"{len(result.cells)} cells, {len(result.live)} live attacks; goal "
               f"{'met' if result.goal['met'] else 'not met'}; wrote {result.files['report']}")
