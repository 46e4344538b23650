"""The finetune stage as a library call: turn a trained run into a classifier of a labelled corpus, fit it with the
one training loop, score it on every split and write its outputs atomically.

finetune/models/<name>/       model.safetensors, classifier.json (what `load_classifier` rebuilds it from),
                              tokenizer.json (the run's), finetune.json (summary)
finetune/curves/<name>.csv    step, examples, train_loss, val_loss, val_accuracy, lr (one row per evaluation)
finetune/metrics/<name>.json  accuracy, precision, recall, F1 and the confusion matrix of train/val/test, the
                              unknown-character and truncation counts, and the test accuracy of every seed (the spread)

(dvc.yaml names these paths; the stage passes them in.)

Messages are encoded with the run's tokenizer, cut to ``max_length`` tokens on ``truncation_side`` and right-padded
(:data:`lm.models.classifier.PAD`). A byte-level BPE encodes any text. A char tokenizer knows only its corpus's
characters (Tiny Shakespeare has one digit and no '£'): every other character becomes one unknown id, the
tokenizer's own [UNK] where it has one (oov 'unk'), else a row added to the embedding (the mean of the pretrained
rows; trained with the embeddings under trainable 'all', fixed otherwise). The metrics count the messages that hold
such characters, per split.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import shutil
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from lm import checkpoint, precision
from lm.atomic import atomic_dir, atomic_write_text, exclusive, write_json
from lm.classification import scores
from lm.config import FinetuneConfig, RunConfig
from lm.metrics import autocast
from lm.models import build_model
from lm.models.classifier import PAD, Classifier
from lm.tokenizer import is_char, load_stats, load_tokenizer, unk_id
from lm.trainer import fit

CURVE_FIELDS = ["step", "tokens", "train_loss", "val_loss", "val_accuracy", "lr"]
CONFIG, TOKENIZER, SUMMARY = "classifier.json", "tokenizer.json", "finetune.json"


class FinetuneError(ValueError):
    """A fine-tune or a classifier cannot be built or loaded as asked (the message names the fix)."""


# ----------------------------------------------------------------------------------------------
# messages → ids


@dataclass
class Encoder:
    """Messages → token ids with the run's tokenizer, at most `max_length` each (cut on `side`: 'left' keeps the
    last ones); `unk` is the id of characters a char vocabulary lacks (None for a byte-level BPE, which has none)."""

    tok: Tokenizer
    max_length: int
    unk: int | None
    side: str = "left"
    vocab: dict[str, int] | None = field(init=False, repr=False)
    """A char tokenizer's character → id (read once: every message is mapped through it); None for a BPE."""

    def __post_init__(self) -> None:
        self.vocab = self.tok.get_vocab() if self.unk is not None else None

    @classmethod
    def for_run(cls, tok: Tokenizer, vocab_size: int, max_length: int, side: str) -> tuple[Encoder, bool]:
        """The encoder, and whether the classifier needs an extra embedding row for the unknown id (a char
        tokenizer without [UNK]: the id is `vocab_size`)."""
        if is_char(tok):
            own = unk_id(tok)
            return cls(tok, max_length, vocab_size if own is None else own, side), own is None
        return cls(tok, max_length, None, side), False

    def unknown(self, text: str) -> Counter[str]:
        """The characters of `text` the vocabulary lacks, with their counts (empty for a BPE)."""
        return Counter(c for c in text if c not in self.vocab) if self.vocab is not None else Counter()

    def encode(self, text: str) -> list[int]:
        """All of `text`'s ids (not truncated)."""
        if self.vocab is not None:
            return [self.vocab.get(c, self.unk) for c in text]
        return self.tok.encode(text).ids

    def cut(self, ids: list[int]) -> list[int]:
        """At most `max_length` of `ids`: the last ones (side 'left') or the first ('right')."""
        return ids[-self.max_length :] if self.side == "left" else ids[: self.max_length]

    def batch(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, T) ids of `texts`, each row its kept ids then PAD; T is the longest row's length."""
        return self.pad([self.encode(t) for t in texts])

    def pad(self, encoded: Sequence[list[int]]) -> torch.Tensor:
        """`batch` of messages already encoded (whole)."""
        rows = [self.cut(ids) for ids in encoded]
        if not all(rows):
            raise FinetuneError("a message encodes to no tokens; remove empty messages from the input")
        x = np.full((len(rows), max(map(len, rows))), PAD, dtype=np.int64)
        for i, r in enumerate(rows):
            x[i, : len(r)] = r
        return torch.from_numpy(x)


class Examples:
    """One labelled split encoded for a classifier: x (N, T) padded ids, y (N,) label indices. The training loop's
    `Batches` contract: `sample` draws rows with replacement, `iterate` and `eval_subset` give the whole split in
    order (a classifier is selected on all of val)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(rng.integers(0, len(self.y), size=batch_size))
        return self.x[rows], self.y[rows, None]  # (B, T), (B, 1)

    def iterate(self, batch_size: int):
        for i in range(0, len(self.y), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size, None]

    def eval_subset(self, rng: np.random.Generator, batch_size: int, n_batches: int) -> list:
        return list(self.iterate(batch_size))


def encode_splits(
    enc: Encoder, splits: Mapping[str, Sequence[tuple[str, str]]], labels: Sequence[str]
) -> tuple[dict[str, Examples], dict[str, dict]]:
    """Every split as `Examples`, and per split: messages, those holding unknown characters (with the characters
    and their counts) and those truncated."""
    index = {label: i for i, label in enumerate(labels)}
    out, stats = {}, {}
    for name, examples in splits.items():
        texts = [text for _, text in examples]
        encoded = [enc.encode(t) for t in texts]
        out[name] = Examples(enc.pad(encoded), torch.tensor([index[label] for label, _ in examples]))
        unknown = [enc.unknown(t) for t in texts]
        stats[name] = {
            "messages": len(texts),
            "with_unknown": sum(bool(u) for u in unknown),
            "unknown_chars": dict(sum(unknown, Counter()).most_common()),
            "truncated": sum(len(ids) > enc.max_length for ids in encoded),
        }
    return out, stats


# ----------------------------------------------------------------------------------------------
# building, training, scoring


def build_classifier(
    run: RunConfig, pretrained: torch.nn.Module | None, vocab_size: int, n_labels: int, cfg: FinetuneConfig,
    seed: int, *, extra_unk: bool,
) -> Classifier:  # fmt: skip
    """A copy of the run's trained model (`pretrained`, loaded once for every seed), or, init 'random', a fresh init
    drawn with `seed`, wrapped as a classifier whose head is drawn with `seed`, with `cfg.trainable` unfrozen."""
    torch.manual_seed(seed)
    lm = copy.deepcopy(pretrained) if cfg.init == "pretrained" else build_model(run.model, vocab_size)
    torch.manual_seed(seed)  # the head's init does not depend on how many draws the body took
    try:
        model = Classifier(lm, n_labels, extra_unk=extra_unk)
    except ValueError as e:
        raise FinetuneError(f"run {cfg.run!r} ({run.model.family}): {e}") from None
    model.train_only(cfg.trainable)
    return model


@torch.no_grad()
def predict(model: Classifier, x: torch.Tensor, dtype: str = "float32", batch_size: int = 64) -> torch.Tensor:
    """Class probabilities (N, L) of the rows of `x`, in eval mode, in order."""
    model.eval()
    probs = []
    for i in range(0, len(x), batch_size):
        with autocast("cpu", dtype):
            logits, _ = model(x[i : i + batch_size])
        probs.append(torch.softmax(logits[:, 0].float(), -1))  # (B, 1, L) -> (B, L)
    return torch.cat(probs)


def score_examples(model: Classifier, data: Mapping[str, Examples], labels: Sequence[str], dtype: str) -> dict:
    """`lm.classification.scores` of the model's argmax label on every split."""
    out = {}
    for split, ex in data.items():
        pred = predict(model, ex.x, dtype).argmax(-1)
        out[split] = scores([labels[i] for i in ex.y.tolist()], [labels[i] for i in pred.tolist()], labels)
    return out


def fingerprint(cfg: FinetuneConfig, seed: int, ckpt_sha: str, data: Mapping[str, Examples], code) -> dict:
    """What a saved fine-tuning state must match to be resumed: the entry's config and seed, the pretrained weights,
    the encoded messages and the code."""
    blob = json.dumps(cfg.model_dump(mode="json") | {"seed": seed}, sort_keys=True).encode()
    tokens = hashlib.sha256()
    for split in sorted(data):
        tokens.update(data[split].x.numpy().tobytes() + data[split].y.numpy().tobytes())
    return {
        "config": hashlib.sha256(blob + ckpt_sha.encode()).hexdigest(),
        "tokens": tokens.hexdigest(),
        "code": dict(code or {}),
    }


def finetune_run(
    name: str,
    cfg: FinetuneConfig,
    run: RunConfig,
    ckpt_dir: Path,
    tok_dir: Path,
    splits: Mapping[str, Sequence[tuple[str, str]]],
    labels: Sequence[str],
    out: Path,
    curve: Path,
    metrics: Path,
    *,
    logger=None,
    progress: bool = True,
    code: Mapping[str, str] | None = None,
) -> dict:
    """Fine-tune `cfg.run` on `splits` with train.seed (kept: `out`, `curve`) and every spread seed (scored only),
    resumable per seed beside `out`; write the outputs atomically and return the metrics."""
    meta = json.loads((Path(ckpt_dir) / checkpoint.CONFIG).read_text()) if cfg.init == "pretrained" else {}
    pretrained = checkpoint.load(ckpt_dir)[0] if cfg.init == "pretrained" else None
    vocab_size = int(load_stats(tok_dir)["vocab_size"])
    max_length = cfg.max_length or run.model.block_size
    enc, extra_unk = Encoder.for_run(load_tokenizer(tok_dir), vocab_size, max_length, cfg.truncation_side)
    data, token_stats = encode_splits(enc, splits, labels)
    dtype = precision.resolve(cfg.train.dtype, "cpu").dtype
    train_cfg = cfg.train.model_copy(update={"dtype": dtype, "device": "cpu"})
    state_root = checkpoint.state_dir_for(out)
    with exclusive(checkpoint.lock_path_for(out), f"finetune@{name}"):
        kept, spread = None, {}
        for seed in [cfg.train.seed, *cfg.spread_seeds]:
            done = state_root / f"seed-{seed}.json"
            if seed != cfg.train.seed and done.is_file():
                spread[seed] = json.loads(done.read_text())["test_accuracy"]
                continue
            model = build_classifier(run, pretrained, vocab_size, len(labels), cfg, seed, extra_unk=extra_unk)
            fp = fingerprint(cfg, seed, meta.get("sha256", "random"), data, code)
            tc = train_cfg.model_copy(update={"seed": seed})
            result = fit(model, data["train"], data["val"], tc, device=torch.device("cpu"), progress=progress,
                         logger=logger if seed == cfg.train.seed else None, state_dir=state_root / f"seed-{seed}",
                         fingerprint=fp, select="val_accuracy")  # fmt: skip
            result_scores = score_examples(model, data, labels, dtype)
            test = result_scores.get("test", result_scores["val"])
            spread[seed] = test["accuracy"]
            if seed == cfg.train.seed:
                kept = (model, result, result_scores)
            else:
                write_json(done, {"seed": seed, "test_accuracy": test["accuracy"]})
        model, result, result_scores = kept
        summary = _summary(name, cfg, model, result, enc, extra_unk, token_stats, result_scores, spread)
        summary["dtype"] = dtype
        _write_outputs(model, run, vocab_size, labels, summary, result.curve, enc, tok_dir, out, curve, metrics)
        shutil.rmtree(state_root, ignore_errors=True)
    return summary


def _summary(name, cfg, model, result, enc, extra_unk, token_stats, result_scores, spread) -> dict:
    """metrics/finetune-<name>.json: numbers a rerun reproduces bit for bit."""
    accs = [spread[s] for s in sorted(spread)]
    return {
        "finetune": name,
        "run": cfg.run,
        "corpus": cfg.corpus,
        "trainable": cfg.trainable,
        "init": cfg.init,
        "max_length": enc.max_length,
        "truncation_side": enc.side,
        "params": sum(p.numel() for p in model.parameters()),
        "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": cfg.train.max_steps,
        "selected_step": result.selected_step,
        "unknown_id": enc.unk,
        "unknown_row_added": extra_unk,
        "tokens": token_stats,
        "splits": result_scores,
        "seeds": {
            "seeds": sorted(spread),
            "test_accuracy": accs,
            "mean": statistics.fmean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs),
            "max": max(accs),
        },
    }


def _write_outputs(model, run, vocab_size, labels, summary, rows, enc, tok_dir, out, curve, metrics) -> None:
    """The classifier folder (one atomic directory), the curve CSV and the metrics JSON."""
    with atomic_dir(out) as tmp:
        save_model(model, str(tmp / checkpoint.WEIGHTS))
        write_json(tmp / CONFIG, {
            "finetune": summary["finetune"], "run": summary["run"], "run_config": run.model_dump(mode="json"),
            "vocab_size": vocab_size, "labels": list(labels), "max_length": enc.max_length,
            "truncation_side": enc.side, "unknown_id": enc.unk, "unknown_row_added": summary["unknown_row_added"],
        })  # fmt: skip
        shutil.copyfile(Path(tok_dir) / "tokenizer.json", tmp / TOKENIZER)
        write_json(tmp / SUMMARY, {k: summary[k] for k in ("finetune", "run", "trainable", "init", "selected_step")})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(curve, buf.getvalue())
    write_json(metrics, summary)


# ----------------------------------------------------------------------------------------------
# using a fine-tuned classifier (lm classify)


def load_classifier(folder: Path) -> tuple[Classifier, Encoder, list[str]]:
    """A fine-tuned classifier from its folder (finetunes/<name>), its encoder and its labels; a folder that is not
    one is a FinetuneError naming the fix."""
    folder = Path(folder)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        hint = " (it is a language model's checkpoint: fine-tune it first, see docs/finetune.md)" if (
            folder / checkpoint.CONFIG).is_file() else ""  # fmt: skip
        raise FinetuneError(f"{folder} is not a fine-tuned classifier: no {CONFIG}{hint}")
    meta = json.loads(cfg_path.read_text())
    run = RunConfig.model_validate(meta["run_config"])
    lm = build_model(run.model, int(meta["vocab_size"]))
    model = Classifier(lm, len(meta["labels"]), extra_unk=bool(meta["unknown_row_added"]))
    load_model(model, str(folder / checkpoint.WEIGHTS))
    model.eval()
    tok = Tokenizer.from_file(str(folder / TOKENIZER))
    enc = Encoder(tok, int(meta["max_length"]), meta["unknown_id"], meta["truncation_side"])
    return model, enc, list(meta["labels"])
