"""The family recipe (README, 'Add a family'): a new family is its config class, its model file, a run in
params.yaml and its tests; nothing else in the code base changes.

A toy family, 'bag' (the mean embedding of the previous k tokens → logits), is added twice: in process, where
every generic path (validation, batching, training, scoring, sampling, the parameter report) must take it as
it is; and in a copy of the project, where the real `dvc repro` trains and evaluates it after touching only
lm/families.py, lm/models/bag.py and params.yaml.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import copy_project, sh
from tiny import tiny_params

CONFIG_SOURCE = '''

class BagConfig(ModelConfig):
    """Toy family: the mean embedding of the previous block_size tokens → logits."""

    family: Literal["bag"]
    context: ClassVar = "fixed"
    block_size: int = Field(default=3, ge=1)
    """Context length."""
    n_embd: int = Field(default=16, ge=1)
    """Embedding width."""
'''

BAG_IMPORT = "from lm.families import BagConfig\n"
MODEL_SOURCE = '''"""Toy family of the recipe test: the mean embedding of the previous block_size tokens → logits."""

from __future__ import annotations

import torch
import torch.nn as nn

{BAG_IMPORT}from lm.models.base import LanguageModel, causal_windows, check_idx, lm_loss


class Bag(LanguageModel):
    Config = BagConfig
    components = {"wte": "token_embedding", "lm_head": "head"}

    def __init__(self, cfg: BagConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size)
        nn.init.normal_(self.lm_head.weight, std=0.01)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        check_idx(idx)
        x = self.wte(causal_windows(idx, self.block_size)).mean(dim=2)  # (B, T, k, C) -> (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        return logits, lm_loss(logits, targets)
'''.replace("{BAG_IMPORT}", BAG_IMPORT)


@pytest.fixture
def bag():
    """The toy family registered in this process from the same sources (and unregistered afterwards)."""
    import lm.families as C
    from lm.models import REGISTRY

    config_ns = vars(C).copy()
    exec(compile(CONFIG_SOURCE, "lm/families.py (appended)", "exec"), config_ns)  # noqa: S102
    model_ns = {"BagConfig": config_ns["BagConfig"]}
    exec(compile(MODEL_SOURCE.replace(BAG_IMPORT, ""), "lm/models/bag.py", "exec"), model_ns)  # noqa: S102
    try:
        yield config_ns["BagConfig"], model_ns["Bag"]
    finally:
        C.FAMILY_CONFIGS.pop("bag", None)
        REGISTRY.pop("bag", None)


def test_every_generic_path_takes_a_new_family(bag):
    from lm.batches import for_model
    from lm.config import RunConfig, parse_params
    from lm.generate import generate
    from lm.metrics import score
    from lm.model_size import component_counts, param_report
    from lm.models import build_model
    from lm.trainer import fit

    BagConfig, Bag = bag
    params = tiny_params({"names-bag": {"tokenizer": "names-char", "model": {"family": "bag", "block_size": 4}}})
    run = parse_params(params).runs["names-bag"]
    assert isinstance(run.model, BagConfig) and run.model.block_size == 4
    assert RunConfig.model_validate(run.model_dump(mode="json")) == run  # the checkpoint's config round trip

    torch.manual_seed(0)
    model = build_model(run.model, 11)
    assert isinstance(model, Bag) and model.block_size == 4 and not model.kv_cache
    ids = np.random.default_rng(0).integers(0, 11, 3000).astype(np.uint16)
    train, val = for_model(run.model, ids[:2500], "text", None), for_model(run.model, ids[2500:], "text", None)
    assert train.overlap == 3  # a 'fixed' context: overlapping windows, so every target has its true context
    cfg = run.train.model_copy(update={"max_steps": 30, "eval_interval": 10, "batch_size": 8, "lr": 1e-2})
    result = fit(model, train, val, cfg, device=torch.device("cpu"), progress=False)
    assert [row["step"] for row in result.curve] == [10, 20, 30]
    total, count = score(model, val.iterate(64))
    assert count == 499 and math.isfinite(total / count)
    assert generate(model, torch.zeros(1, 1, dtype=torch.long), 20).shape == (1, 21)
    assert component_counts(model) == {"token_embedding": 11 * 16, "head": 16 * 11 + 11}
    assert param_report(run.model, 11).counts.total == 11 * 16 + 16 * 11 + 11


def test_unknown_and_unmodelled_families_are_named(bag):
    from lm.config import ParamsError, parse_params
    from lm.models import REGISTRY, build_model

    params = tiny_params({"r": {"tokenizer": "names-char", "model": {"family": "bags"}}})
    with pytest.raises(ParamsError, match=r"runs\.r\.model\.family: got 'bags'; must be one of .*gpt, llama, bag"):
        parse_params(params)
    model_class = REGISTRY.pop("bag")
    try:
        with pytest.raises(ValueError, match="family 'bag' has a config but no model class"):
            build_model(bag[0](family="bag"), 11)
    finally:
        REGISTRY["bag"] = model_class


@pytest.mark.slow
def test_dvc_repro_trains_a_family_added_by_the_recipe(repo_root: Path, tmp_path: Path):
    params = tiny_params({"names-mlp": tiny_params()["runs"]["names-mlp"]}, tokenizers=["names-char"], tracking=False)
    project = copy_project(repo_root, tmp_path, params)

    # The recipe: a config class, a model file, a run. Nothing else.
    config = project / "lm" / "families.py"
    config.write_text(config.read_text() + CONFIG_SOURCE)
    (project / "lm" / "models" / "bag.py").write_text(MODEL_SOURCE)
    params["runs"]["names-bag"] = {
        "tokenizer": "names-char",
        "model": {"family": "bag", "block_size": 3, "n_embd": 8},
        "train": {"max_steps": 20, "batch_size": 32, "lr": 0.01, "eval_interval": 10, "eval_batches": 2},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = sh(project, "git", "status", "--porcelain").stdout.split("\n")
    assert sorted(line[3:] for line in changed if line) == ["lm/families.py", "lm/models/bag.py", "params.yaml"]

    sh(project, "dvc", "repro", "evaluate@names-bag")
    metrics = json.loads((project / "metrics" / "names-bag.json").read_text())
    assert metrics["family"] == "bag" and metrics["params_by_component"] == {
        "token_embedding": 27 * 8,
        "head": 8 * 27 + 27,
    }
    assert math.log(27) - 0.5 < metrics["val/loss"] < math.log(27) + 0.1  # 20 steps: it learnt a little
    for module in ("stages.train", "stages.evaluate"):  # the check stage put the new file in their code manifests
        assert "  lm/models/bag.py\n" in (project / "code" / f"{module}.txt").read_text()
    r = subprocess.run(["git", "diff", "--stat", "--", "lm", "stages", "dvc.yaml"], cwd=project, capture_output=True)
    assert r.stdout.decode().count("|") == 1  # lm/families.py only (lm/models/bag.py is new)
