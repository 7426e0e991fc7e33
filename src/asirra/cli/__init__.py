"""The `asirra` command line: one Typer app, thin wrappers over the package's functions.

Each group of commands lives in its own module (data, train, models, captcha, service); this file
lists them all, in the order `asirra --help` shows them. Commands hold no domain rules: they read
options, call the library and print what it returns. A user error (asirra.errors.UserError) becomes
one line on stderr and exit code 2 (cli.common.guarded); any other exception is a bug and keeps
its traceback. Heavy imports (torch, onnxruntime, fastapi) happen inside commands, so
`asirra --help` stays quick.
"""

from __future__ import annotations

import typer

from asirra.cli import captcha, data, models, service, train
from asirra.cli.common import add_command

app = typer.Typer(
    help="Train cat-vs-dog CNNs; measure, attack and defend Asirra-style CAPTCHAs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for name, command in (("download", data.download_command), ("train", train.train_command), ("cv", train.cv_command),
                      ("ablate", train.ablate_command), ("tune", train.tune_command),
                      ("evaluate", models.evaluate_command), ("predict", models.predict_command),
                      ("explain", models.explain_command), ("export", models.export_command),
                      ("demo", models.demo_command), ("serve", service.serve_command),
                      ("attack", service.attack_command)):
    add_command(app, name, command)

data_app = typer.Typer(help="Inspect a data set: counts, unusable files, a sample grid; write the bundled digits.",
                       no_args_is_help=True)
add_command(data_app, "check", data.data_check)
add_command(data_app, "show", data.data_show)
add_command(data_app, "digits", data.data_digits)
app.add_typer(data_app, name="data")

captcha_app = typer.Typer(help="Asirra-style CAPTCHAs: simulate attacks, choose safeguards, harden pools, build "
                               "attackers, run the hardening study.", no_args_is_help=True)
add_command(captcha_app, "simulate", captcha.captcha_simulate)
add_command(captcha_app, "defend", captcha.captcha_defend)
add_command(captcha_app, "harden", captcha.captcha_harden)
add_command(captcha_app, "distort", captcha.captcha_distort)
add_command(captcha_app, "build-attacker", captcha.captcha_build_attacker)
# The old spelling: `captcha attacker` read too much like `asirra attack` (which runs a bot; this builds one).
add_command(captcha_app, "attacker", captcha.captcha_build_attacker, hidden=True)
add_command(captcha_app, "pool", captcha.captcha_pool)
add_command(captcha_app, "study", captcha.captcha_study)
add_command(captcha_app, "bill", captcha.captcha_bill)
app.add_typer(captcha_app, name="captcha")


def main(args: list[str] | None = None) -> None:
    """The console script `asirra` (and `python -m asirra`)."""
    app(args, prog_name="asirra")


__all__ = ["app", "main"]
