"""The one home of two shared ideas: settings-stamped output folders (asirra.runs) and random subsets and
intervals (asirra.stats)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asirra.errors import UserError
from asirra.runs import RunFolderError, check_stamp, claim, differences
from asirra.stats import random_subset, stratified_subset, t_interval, wilson_interval


def test_a_new_folder_is_stamped_and_the_same_settings_resume_it(tmp_path):
    settings = {"method": "pgd", "epsilon": 4, "sizes": (200, 240)}
    assert claim(tmp_path / "out", settings, "settings.json", "pool") is False  # new
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["sizes"] == [200, 240]
    assert claim(tmp_path / "out", settings, "settings.json", "pool") is True  # tuples and lists read back alike


def test_other_settings_are_refused_in_one_message_naming_each_difference(tmp_path):
    claim(tmp_path, {"train": {"epochs": 5, "lr": 0.1}, "folds": 5}, "s.json", "cross-validation")
    with pytest.raises(RunFolderError) as refused:
        claim(tmp_path, {"train": {"epochs": 6, "lr": 0.1}, "folds": 3}, "s.json", "cross-validation")
    message = str(refused.value)
    assert "holds a cross-validation made with other settings (folds, train.epochs)" in message
    assert "choose another --out" in message and "\n" not in message
    assert isinstance(refused.value, UserError)  # the CLI prints it in one line


def test_only_the_named_keys_must_match_and_a_restamp_records_the_rest(tmp_path):
    claim(tmp_path, {"seed": 0, "attackers": ["a"]}, "study.json", "study", keys=("seed",), restamp=True)
    assert claim(tmp_path, {"seed": 0, "attackers": ["a", "b"]}, "study.json", "study", keys=("seed",), restamp=True)
    assert json.loads((tmp_path / "study.json").read_text())["attackers"] == ["a", "b"]
    with pytest.raises(RunFolderError, match=r"\(seed\)"):
        claim(tmp_path, {"seed": 1, "attackers": ["a"]}, "study.json", "study", keys=("seed",))


def test_a_key_dropped_from_the_settings_still_counts_as_a_difference():
    assert differences({"a": 1, "b": 2}, {"a": 1}) == ["b"]


def test_fresh_only_refuses_someone_elses_files(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"not ours")
    with pytest.raises(RunFolderError, match="not empty and holds no settings.json"):
        claim(tmp_path, {"x": 1}, "settings.json", "pool", fresh_only=True)
    assert check_stamp(tmp_path, {"x": 1}, "settings.json", "pool") is None


def test_a_random_subset_is_seeded_sorted_and_whole_when_asked_for_more():
    picks = random_subset(100, 20, seed=0)
    assert len(set(picks)) == 20 and list(picks) == sorted(picks)
    assert np.array_equal(picks, random_subset(100, 20, seed=0))
    assert not np.array_equal(picks, random_subset(100, 20, seed=1))
    assert list(random_subset(10, None, 0)) == list(random_subset(10, 50, 0)) == list(range(10))


def test_a_stratified_subset_keeps_the_class_shares():
    labels = np.array([0] * 80 + [1] * 20)
    keep = stratified_subset(labels, 50, seed=0)
    assert len(keep) == 50 and np.bincount(labels[keep]).tolist() == [40, 10]


def test_intervals_hold_their_estimates():
    low, high = wilson_interval(12, 60)
    assert low < 12 / 60 < high and (low, high) == pytest.approx((0.1183, 0.3178), abs=1e-4)  # 20% [11.8, 31.8]
    assert wilson_interval(0, 60)[0] == 0.0 and wilson_interval(60, 60)[1] == pytest.approx(1.0)
    plain, corrected = t_interval([0.9, 0.92, 0.91]), t_interval([0.9, 0.92, 0.91], test_train_ratio=0.25)
    assert plain["ci95"][0] < 0.91 < plain["ci95"][1]
    assert corrected["ci95"][1] - corrected["ci95"][0] > plain["ci95"][1] - plain["ci95"][0]
