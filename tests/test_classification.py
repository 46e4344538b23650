"""Classification scores and the classical baseline (lm/classification.py, stages/baseline.py)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml
from pydantic import ValidationError

from lm.classification import fit_baseline, score_splits, scores
from lm.config import BaselineConfig, StudyConfig
from lm.data import prepare_corpus

from helpers import run
from tiny import ROOT, on_fixtures


def test_scores_by_hand():
    y_true = ["ham", "ham", "ham", "spam", "spam"]
    y_pred = ["ham", "spam", "ham", "spam", "ham"]
    s = scores(y_true, y_pred, ["ham", "spam"])
    assert s["examples"] == 5 and s["accuracy"] == pytest.approx(3 / 5)
    assert s["confusion"] == [[2, 1], [1, 1]]  # rows true ham/spam, columns predicted ham/spam
    assert s["precision"] == pytest.approx(1 / 2) and s["recall"] == pytest.approx(1 / 2)  # spam: the positive class
    assert s["per_label"]["ham"]["precision"] == pytest.approx(2 / 3) and s["per_label"]["ham"]["support"] == 3
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_baseline_config_checks_its_ranges_and_its_corpus():
    with pytest.raises(ValidationError, match="ngram_min"):
        BaselineConfig(corpus="sms", ngram_min=5, ngram_max=2)
    with pytest.raises(ValidationError, match="C values must be > 0"):
        BaselineConfig(corpus="sms", C=[1.0, 0.0])
    params = on_fixtures(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["baselines"] = {"b": {"corpus": "names"}}
    with pytest.raises(ValidationError, match=r"baselines.b.corpus: got 'names'; must be a labelled corpus: \['sms'\]"):
        StudyConfig.model_validate(params)


@pytest.fixture(scope="module")
def sms(tmp_path_factory, mirror):
    from lm.data import load_labelled

    params = StudyConfig.model_validate(on_fixtures(yaml.safe_load((ROOT / "params.yaml").read_text())))
    out = tmp_path_factory.mktemp("sms") / "sms"
    prepare_corpus("sms", params.corpora["sms"], params.seed, out, mirror)
    return out, load_labelled(out), params.corpora["sms"].labels


def test_the_baseline_separates_spam_on_the_excerpt_and_is_deterministic(sms):
    _, splits, labels = sms
    cfg = BaselineConfig(corpus="sms")
    model, tried = fit_baseline(splits, cfg, 1337)
    assert set(tried) == {1.0, 10.0, 100.0} and model[-1].C == max(tried, key=lambda c: (tried[c], -c))
    result = score_splits(model.predict, splits, labels)
    assert result["test"]["accuracy"] > 0.9 and result["train"]["accuracy"] >= result["test"]["accuracy"]
    again, _ = fit_baseline(splits, cfg, 1337)
    assert (again.predict([t for _, t in splits["test"]]) == model.predict([t for _, t in splits["test"]])).all()


def test_the_stage_writes_its_metrics_and_refuses_an_unknown_name(sms, tmp_path):
    data, _, _ = sms
    params = on_fixtures(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["tracking"] = {"enabled": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    name = next(iter(params["baselines"]))
    out = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "stages.baseline", "--params", str(tmp_path / "params.yaml"), "--data", str(data)]
    r = run([*cmd, name, "--metrics", str(out)], cwd=ROOT, env=dict(os.environ), timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert set(m["splits"]) == {"train", "val", "test"} and m["C"]["chosen"] in map(float, m["C"]["tried"])
    assert m["splits"]["test"]["examples"] == sum(map(sum, m["splits"]["test"]["confusion"]))
    assert f"{name}: C=" in r.stdout and "test accuracy" in r.stdout
    r = run([*cmd, "nope", "--metrics", str(tmp_path / "x.json")], cwd=ROOT, env=dict(os.environ), timeout=120)
    assert r.returncode == 2 and f"unknown baseline 'nope'; {tmp_path / 'params.yaml'} defines: {name}" in r.stderr
    assert not (tmp_path / "x.json").exists()
