"""Linear probes per layer: where in a pretrained network the features a classifier needs live.

For a run and a labelled corpus: the hidden state of each message's last kept token after the embeddings (layer 0)
and after each transformer block (layers 1..n_layer), frozen, in eval mode; per layer a logistic regression on the
standardised states (its C picked on val accuracy, ties to the smaller C), scored on train, val and test. The same
for the run's architecture at random init (drawn with the run's train.seed): the difference is what pretraining put
there. (G. Alain, Y. Bengio, "Understanding intermediate layers using linear classifier probes", 2016.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from lm import checkpoint
from lm.config import ProbeConfig, RunConfig
from lm.finetune import Encoder, encode_splits
from lm.models import build_model
from lm.models.classifier import Classifier
from lm.tokenizer import load_stats, load_tokenizer


@torch.no_grad()
def layer_features(model: Classifier, x: torch.Tensor, batch_size: int = 64) -> list[np.ndarray]:
    """Per layer, the (N, C) last-token states of the rows of `x` (float64 numpy, fp32 forward, eval mode)."""
    model.eval()
    chunks = [model.layer_states(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return [torch.cat([c[layer] for c in chunks]).double().numpy() for layer in range(len(chunks[0]))]


def fit_layer(feats: Mapping[str, np.ndarray], ys: Mapping[str, np.ndarray], cs: Sequence[float], seed: int) -> dict:
    """A standardised logistic regression per C on the train states, the best on val kept: its C and accuracies."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in sorted(cs):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
        clf.fit(feats["train"], ys["train"])
        val = float(np.mean(clf.predict(feats["val"]) == ys["val"]))
        if best is None or val > best[0]:  # strictly better: ties keep the smaller C
            best = (val, c, clf)
    _, c, clf = best
    return {"C": c} | {split: float(np.mean(clf.predict(f) == ys[split])) for split, f in feats.items()}


def probe_run(
    name: str,
    cfg: ProbeConfig,
    run: RunConfig,
    ckpt_dir: Path,
    tok_dir: Path,
    splits: Mapping[str, Sequence[tuple[str, str]]],
    labels: Sequence[str],
) -> dict:
    """Per-layer probe accuracies of the pretrained run and of its random-init twin (see the module docstring)."""
    vocab_size = int(load_stats(tok_dir)["vocab_size"])
    enc, extra_unk = Encoder.for_run(
        load_tokenizer(tok_dir), vocab_size, cfg.max_length or run.model.block_size, cfg.truncation_side
    )
    data, token_stats = encode_splits(enc, splits, labels)
    ys = {split: ex.y.numpy() for split, ex in data.items()}
    seed = run.train.seed
    torch.manual_seed(seed)
    twins = {"pretrained": checkpoint.load(ckpt_dir)[0], "random": build_model(run.model, vocab_size)}
    out = {"probe": name, "run": cfg.run, "corpus": cfg.corpus, "max_length": enc.max_length,
           "truncation_side": enc.side, "labels": list(labels), "models": {}}  # fmt: skip
    for init, lm in twins.items():
        model = Classifier(lm, len(labels), extra_unk=extra_unk)
        feats = {split: layer_features(model, ex.x) for split, ex in data.items()}
        out["models"][init] = [
            fit_layer({s: f[layer] for s, f in feats.items()}, ys, cfg.C, seed) for layer in range(len(feats["train"]))
        ]
    out["layers"] = list(range(len(out["models"]["pretrained"])))
    out["tokens"] = token_stats
    return out
