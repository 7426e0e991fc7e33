"""`asirra serve`'s settings: every one from flags, ASIRRA_* variables or a TOML file; a bad value stops the start
in one line naming where it came from; secrets never in a config file or a worker's config; the secure default."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from captcha_service_support import ColourClassifier, make_pool, serving
from typer.testing import CliRunner

from asirra.captcha.service.run import worker_config
from asirra.captcha.service.settings import (
    DEFAULT_SAFEGUARD,
    Given,
    ServiceError,
    ServiceSettings,
    env_name,
    load_serve_settings,
    setting_types,
)
from asirra.cli import app as cli

SECRET = "a shared secret of at least thirty-two bytes"
SITES = json.dumps({"sites": [{"key": "settings-site", "secret": "s" * 40, "hostnames": ["shop.example"]}]})


@pytest.fixture
def files(tmp_path):
    """A pool, a secret file and a sites file, for settings that name files."""
    make_pool(tmp_path / "pool", cats=6, dogs=6)
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "sites.json").write_text(SITES)
    return tmp_path


def examples(files) -> dict[str, tuple[str, object]]:
    """A value other than the default for every setting: (as text, as read)."""
    return {
        "data": (str(files / "pool"), str(files / "pool")),
        "host": ("0.0.0.0", "0.0.0.0"),
        "port": ("8123", 8123),
        "workers": ("2", 2),
        "safeguard": ("none", "none"),
        "secret_file": (str(files / "secret"), str(files / "secret")),
        "sites_file": (str(files / "sites.json"), str(files / "sites.json")),
        "log_format": ("json", "json"),
        "ttl_seconds": ("7", 7.0),
        "max_challenges": ("500", 500),
        "max_per_client": ("3", 3),
        "challenge_rate": ("0.5", 0.5),
        "challenge_burst": ("4", 4),
        "request_rate": ("12.5", 12.5),
        "request_burst": ("30", 30),
        "max_body_bytes": ("512", 512),
        "max_clients": ("1000", 1000),
        "image_side": ("180,200", (180, 200)),
        "image_quality": ("60,70", (60, 70)),
        "max_crop": ("0.1", 0.1),
        "image_cache_mb": ("64", 64.0),
        "renderer": ("pillow", "pillow"),
        "seed": ("3", 3),
        "redis_url": ("redis://127.0.0.1:6390/2", "redis://127.0.0.1:6390/2"),
        "pass_ttl_seconds": ("30", 30.0),
        "verify_rate": ("5", 5.0),
        "verify_burst": ("9", 9),
        "max_verify_bytes": ("1000", 1000),
        "trusted_proxies": ("10.0.0.5, 10.1.0.0/16", ("10.0.0.5", "10.1.0.0/16")),
        "metrics_allow": ("none", ()),
        "access_log": ("off", False),
    }


# A value that must stop the start, for every setting.
BAD = {
    "data": "/no/such/folder", "host": "local host", "port": "70000", "workers": "0", "safeguard": "moat",
    "secret_file": "/no/such/secret", "sites_file": "/no/such/sites.json", "log_format": "xml", "ttl_seconds": "0",
    "max_challenges": "1.5", "max_per_client": "-1", "challenge_rate": "fast", "challenge_burst": "0",
    "request_rate": "nan", "request_burst": "0", "max_body_bytes": "0", "max_clients": "many", "image_side": "240",
    "image_quality": "50,101", "max_crop": "0.3", "image_cache_mb": "-1", "renderer": "gpu", "seed": "abc", "redis_url": "http://127.0.0.1/0",
    "pass_ttl_seconds": "-5", "verify_rate": "0", "verify_burst": "0", "max_verify_bytes": "0",
    "trusted_proxies": "nginx", "metrics_allow": "everyone", "access_log": "maybe",
}


def value_of(loaded, name):
    settings = loaded.settings
    return getattr(settings, name) if hasattr(settings, name) and name != "service" else getattr(settings.service, name)


def test_every_setting_can_be_given_by_environment_variable(files):
    table = examples(files)
    assert set(table) == set(setting_types()) == set(BAD)  # a new setting needs its example and its bad value
    environ = {env_name(name): text for name, (text, _) in table.items()}
    loaded = load_serve_settings(environ=environ)
    for name, (_, expected) in table.items():
        assert value_of(loaded, name) == expected, name
    assert loaded.secret == SECRET.encode() and loaded.sites.get("settings-site").hostnames == ("shop.example",)


def test_every_setting_with_a_bad_value_stops_the_start_in_one_line(files):
    runner = CliRunner()
    base = {"ASIRRA_DATA": str(files / "pool")}
    for name, bad in BAD.items():
        result = runner.invoke(cli, ["serve"], env={**base, env_name(name): bad})
        assert result.exit_code == 2, (name, result.output)
        assert result.output.count("\n") == 1 and "Traceback" not in result.output, (name, result.output)
        assert result.output.startswith(f"error: {env_name(name)}={bad!r}: "), (name, result.output)


def test_a_bad_flag_or_file_value_names_its_flag_or_file_line(files):
    result = CliRunner().invoke(cli, ["serve", "--data", str(files / "pool"), "--ttl", "0"])
    assert result.exit_code == 2 and result.output == "error: --ttl 0.0: ttl_seconds must be positive, got 0.0\n"
    (files / "asirra.toml").write_text('port = "x"\n')
    result = CliRunner().invoke(cli, ["serve", "--data", str(files / "pool"), "--config", str(files / "asirra.toml")])
    expected = f"error: {files / 'asirra.toml'}: port = 'x': port must be a whole number\n"
    assert result.exit_code == 2 and result.output == expected


def test_flags_beat_the_environment_which_beats_the_config_file(files):
    config = files / "asirra.toml"
    config.write_text(f'data = "{files / "pool"}"\nttl_seconds = 30\nport = 8001\nimage_side = [150, 160]\nseed = 5\n')
    environ = {"ASIRRA_CONFIG": str(config), "ASIRRA_TTL_SECONDS": "40", "ASIRRA_PORT": "8002"}
    loaded = load_serve_settings({"port": Given("8003", "--port 8003")}, environ=environ)
    assert (loaded.settings.port, loaded.settings.service.ttl_seconds) == (8003, 40.0)
    assert loaded.settings.service.image_side == (150, 160) and loaded.settings.service.seed == 5
    no_file = load_serve_settings(environ={"ASIRRA_CONFIG": ""}, flags={"data": Given(str(files), "--data")})
    assert no_file.settings.service.ttl_seconds == ServiceSettings().ttl_seconds  # nothing given: the defaults


def test_secrets_come_from_a_file_or_a_variable_and_never_reach_a_config_or_a_log(files, tmp_path):
    base = {"ASIRRA_DATA": str(files / "pool")}
    from_env = load_serve_settings(environ={**base, "ASIRRA_SECRET": SECRET, "ASIRRA_SITES": SITES})
    from_file = load_serve_settings(environ={**base, "ASIRRA_SECRET_FILE": str(files / "secret"),
                                             "ASIRRA_SITES_FILE": str(files / "sites.json")})
    assert from_env.secret == from_file.secret == SECRET.encode() and from_env.secret_from == "env"
    assert SECRET not in repr(from_env) and SECRET not in repr(from_env.settings) and "s" * 40 not in repr(from_env)
    with pytest.raises(ServiceError, match="give the secret once"):
        load_serve_settings(environ={**base, "ASIRRA_SECRET": SECRET, "ASIRRA_SECRET_FILE": str(files / "secret")})
    with pytest.raises(ServiceError, match="ASIRRA_SECRET holds 5 bytes"):
        load_serve_settings(environ={**base, "ASIRRA_SECRET": "short"})
    (tmp_path / "secret.toml").write_text(f'secret = "{SECRET}"\n')
    with pytest.raises(ServiceError, match="secret is a secret, never a config file value"):
        load_serve_settings(environ=base, config_file=tmp_path / "secret.toml")
    # What the workers of --workers N are given: where the secrets are, never the secrets.
    for loaded in (from_env, from_file):
        config = worker_config([], _policy(), loaded.settings.service, loaded.settings.secret_file,
                               loaded.settings.sites_file, secret_from_env=loaded.secret_from == "env",
                               sites_from_env=loaded.sites_from_env)
        text = json.dumps(config)
        assert SECRET not in text and "s" * 40 not in text
    assert json.loads(text)["secret_file"] == str(files / "secret")


def _policy():
    from asirra.captcha.safeguards import parse_safeguard

    return parse_safeguard(DEFAULT_SAFEGUARD)


def test_an_unknown_setting_is_refused_in_a_file_and_warned_about_in_the_environment(files):
    (files / "asirra.toml").write_text("tll_seconds = 5\n")
    with pytest.raises(ServiceError, match="unknown setting 'tll_seconds'; did you mean ttl_seconds"):
        load_serve_settings(environ={"ASIRRA_DATA": str(files)}, config_file=files / "asirra.toml")
    loaded = load_serve_settings(environ={"ASIRRA_DATA": str(files), "ASIRRA_TTL": "5", "ASIRRA_CACHE": "/tmp"})
    assert loaded.warnings == ["ASIRRA_TTL is not a setting of asirra serve and is ignored; did you mean "
                               "ASIRRA_TTL_SECONDS?"]  # ASIRRA_CACHE means something elsewhere: no warning


def test_the_default_safeguard_is_the_one_the_defend_grid_recommends():
    """`asirra captcha defend --accuracy 0.99` picks the setting holding a 99% bot lowest while people stay
    above 99%; the service starts with exactly that one."""
    from asirra.captcha.experiments.defend_grid import compare_safeguards

    assert compare_safeguards(bot_accuracy=0.99).recommended["safeguard"] == DEFAULT_SAFEGUARD


def _answer(client: httpx.Client, right: bool) -> str:
    challenge = client.post("/api/challenge").json()
    cats = ColourClassifier(flip=not right).solve([client.get(url).content for url in challenge["images"]])
    selected = [i for i, cat in enumerate(cats) if cat]
    return client.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": selected}).json()["result"]


@pytest.mark.slow
def test_serve_starts_with_the_token_bucket_from_the_environment_and_none_is_still_possible(files):
    env = {"ASIRRA_TTL_SECONDS": "7", "ASIRRA_LOG_FORMAT": "json"}
    with serving(["--data", str(files / "pool")], files / "default.log", env=env) as (url, _):
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.post("/api/challenge").json()["expires_in"] == 7  # from ASIRRA_TTL_SECONDS
            # One failure empties the bucket of capacity 1: the next right answer still fails.
            assert [_answer(client, right=False), _answer(client, right=True)] == ["fail", "fail"]
    lines = [json.loads(line) for line in (files / "default.log").read_text().splitlines() if line.startswith("{")]
    start = next(line for line in lines if line["message"].startswith("serving"))
    assert f"safeguard {DEFAULT_SAFEGUARD} (the default)" in start["message"]
    access = [line for line in lines if line["logger"] == "asirra.access"]
    assert access and all({"route", "status", "ms", "client"} <= set(line) for line in access)
    with serving(["--data", str(files / "pool"), "--safeguard", "none"], files / "none.log") as (url, _):
        with httpx.Client(base_url=url, timeout=10) as client:
            assert [_answer(client, right=False), _answer(client, right=True)] == ["fail", "pass"]
    assert re.search(r"safeguard none, ", (files / "none.log").read_text())


def test_the_deploying_guide_lists_every_setting_with_its_variable():
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "deploying.md").read_text()
    missing = [env_name(name) for name in setting_types() if f"`{env_name(name)}`" not in guide]
    assert missing == []


def test_a_redis_password_never_reaches_the_log():
    from asirra.captcha.service.run import redact

    assert redact("redis://:hunter2@db.internal:6379/0") == "redis://:***@db.internal:6379/0"
    assert redact("rediss://app:hunter2@db.internal/1") == "rediss://app:***@db.internal/1"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
