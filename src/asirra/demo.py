"""`make demo`: the whole workflow with the model shipped in the package, in a few minutes.

1. find and check the data; 2. evaluate the default model on images it never trained on (its
validation split, recorded with it); 3. write a Kaggle submission for test1/; 4. attack simulated
12-image challenges under each safeguard; 5. plots. Every output lands under --out.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from asirra.captcha.challenge import SIMULATED_CHALLENGES
from asirra.config import DEFAULT_BACKEND
from asirra.errors import UserError

log = logging.getLogger(__name__)


class DemoError(UserError):
    """The demo cannot run on the data it was given."""


def say(message: str) -> None:
    log.info(message)


def run_demo(data: Path | None, out: Path, samples: int = 2000, challenges: int = SIMULATED_CHALLENGES,
             backend: str = DEFAULT_BACKEND) -> dict:
    """The demo's five steps; every output under `out`; returns what summary.json holds."""
    from asirra import data as datamod
    from asirra.evaluation import evaluate_model
    from asirra.fileio import write_json_atomic
    from asirra.models import DEFAULT_MODEL_DIR
    from asirra.predict import load_classifier, plot_predictions, predict_refs, write_submission
    from asirra.splits import evaluation_sample, validation_refs

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = datamod.resolve_data_root(data)
    train_dir, test_dir = datamod.labelled_split_dirs(root)
    train_dir = train_dir or root
    say(f"[1/5] data: {root}")
    refs = datamod.scan(train_dir, labelled=True)

    # The default model's validation split, so the figures are on images it never trained on.
    split_file = DEFAULT_MODEL_DIR / "split.json"
    if split_file.exists():
        held_out = validation_refs(refs, split_file)
        say(f"      {len(refs)} labelled images, {len(held_out)} of them held out from the default model's training")
    else:
        held_out = refs
        say(f"      {len(refs)} labelled images (no recorded split: the sample may include training images)")
    if not held_out:
        raise DemoError(f"none of the default model's validation images are in {train_dir}; evaluate with --model instead")
    sample = evaluation_sample(held_out, limit=samples, seed=0)
    report = datamod.check(sample + (datamod.scan(test_dir, labelled=False) if test_dir else []), progress=False)
    say(f"      checked {report.n_images} images: {len(report.unusable)} unusable")
    datamod.show_grid(sample, out / "data_sample.png", n=16)

    clf = load_classifier(None, backend=backend)
    say(f"[2/5] evaluating the default model on {len(sample)} held-out images ({clf.backend})")
    evaluation = evaluate_model(clf, sample, out / "evaluation", n_challenges=challenges)
    preds, files, metrics = evaluation.predictions, evaluation.files, evaluation.report.to_json()
    say(f"      accuracy {metrics['accuracy']:.4f}  log loss {metrics['log_loss']:.4f}  AUC {metrics['auc'] or float('nan'):.4f}")

    outputs = dict(files)
    if test_dir:
        say(f"[3/5] Kaggle submission for {test_dir}")
        test_preds = predict_refs(clf, datamod.scan(test_dir, labelled=False))
        ids = [r.id for r in test_preds.refs]
        outputs["submission"] = write_submission(ids, test_preds.p_dog, out / "submission.csv")
        outputs["submission_proba"] = write_submission(ids, test_preds.p_dog, out / "submission_proba.csv", proba=True)
        outputs["predictions"] = plot_predictions(test_preds, out / "predictions.png", title="test1 predictions")
    else:
        say("[3/5] no test1/ folder beside train/: no submission written")

    say(f"[4/5] {challenges} simulated 12-image challenges under each safeguard")
    attacks = _simulate_safeguards(preds, challenges)
    for name, result in attacks.items():
        say(f"      {name:<15} bot passes {result['solve_rate']:.4f} (95% CI {result['ci_low']:.4f}-{result['ci_high']:.4f})")
    say(f"      p^12 from per-image accuracy: {metrics['p12']:.4f}; "
        f"exact solve rate for challenges drawn from this pool: {metrics['exact_solve_rate']:.4f}")

    say("[5/5] outputs")
    summary = {"data": str(root), "evaluation": metrics, "challenges": attacks,
               "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(out / "summary.json", summary)
    outputs["summary"] = out / "summary.json"
    outputs["data_sample"] = out / "data_sample.png"
    for name, path in outputs.items():
        say(f"      {name:<17} {path}")
    say(f"done in {summary['seconds']:.0f} s")
    return summary


def _simulate_safeguards(preds, challenges: int) -> dict:
    from asirra.captcha.experiments.simulate import simulate_model
    from asirra.captcha.safeguards import make_safeguard

    results = {}
    for name in ("none", "partial-credit", "token-bucket"):
        result = simulate_model(preds.p_dog, preds.labels, challenges, make_safeguard(name), np.random.default_rng(0))
        results[name] = result.to_dict()
    return results
