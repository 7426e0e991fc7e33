"""Tests that need ../shared skip without it on a laptop, but fail under CI, so CI can never pass by skipping them."""

from __future__ import annotations

import pytest
from conftest import require_shared_data


@pytest.fixture(autouse=True)
def not_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("ASIRRA_REQUIRE_DATA", raising=False)


def test_missing_data_is_a_skip_that_names_the_folder(tmp_path):
    with pytest.raises(pytest.skip.Exception, match=f"no train or test1/ in {tmp_path}"):
        require_shared_data(tmp_path)


@pytest.mark.parametrize("variable, value", [("ASIRRA_REQUIRE_DATA", "1"), ("CI", "true")])
def test_missing_data_is_a_failure_when_required(tmp_path, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(pytest.fail.Exception, match="shared data not found: no train or test1/ .*required"):
        require_shared_data(tmp_path)


def test_half_the_data_is_still_missing_data(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    monkeypatch.setenv("ASIRRA_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="no test1/"):
        require_shared_data(tmp_path)


def test_present_data_is_returned_whether_required_or_not(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir(), (tmp_path / "test1").mkdir()
    assert require_shared_data(tmp_path) == tmp_path
    monkeypatch.setenv("CI", "true")
    assert require_shared_data(tmp_path) == tmp_path


def test_other_values_do_not_require_data(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_REQUIRE_DATA", "0")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_shared_data(tmp_path)
