"""Fine-tuning a run of the ladder as a classifier (lm/models/classifier.py, lm/finetune.py, lm/probe.py,
stages/finetune.py, `lm classify`): the head reads the last real token, freezing, unknown characters, truncation,
keep-best on val accuracy, the stage killed and resumed, per-layer probes, and the command a person types."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from lm.config import FinetuneConfig, StudyConfig, TrainConfig
from lm.finetune import Encoder, Examples, FinetuneError, load_classifier, predict
from lm.models import build_model
from lm.models.classifier import PAD, Classifier
from lm.tokenizer import load_tokenizer
from lm.trainer import fit, make_optimizer

from helpers import finish, saved_step, stage, wait_for_state
from tiny import CONFIGS, ROOT, on_fixtures, tiny_params

TRANSFORMERS = ["gpt", "gpt_switches", "llama", "block_pre", "gpt_post_sin_tied", "llama_mqa_tied"]


def classifier(key: str, *, extra_unk: bool = False, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build_model(CONFIGS[key], 11), 2, extra_unk=extra_unk).eval()


@pytest.mark.parametrize("key", TRANSFORMERS)
def test_the_head_reads_the_last_real_token_and_padding_never_changes_it(key):
    model = classifier(key)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    alone, _ = model(ids)  # (1, 1, 2)
    assert alone.shape == (1, 1, 2)
    for pad in (1, 3):  # same row, 1 or 3 PAD positions after it, beside a longer row
        x = torch.full((2, 5 + pad), PAD)
        x[0, :5], x[1, :] = ids[0], torch.arange(5 + pad) % 11
        padded, _ = model(x)
        torch.testing.assert_close(padded[0], alone[0], rtol=0, atol=1e-6)
    changed = ids.clone()
    changed[0, -1] = 9  # the last real token is the one read
    assert not torch.allclose(model(changed)[0], alone)


@pytest.mark.parametrize("trainable", ["head", "last_block", "all"])
@pytest.mark.parametrize("key", ["gpt", "llama"])
def test_frozen_parameters_are_bit_identical_after_a_step_and_trained_ones_move(key, trainable):
    model = classifier(key)
    model.train_only(trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.1))
    x, y = torch.randint(0, 11, (4, 6)), torch.tensor([[0], [1], [0], [1]])
    model.train()
    model(x, y)[1].backward()
    opt.step()
    last = f"lm.transformer.h.{len(model.lm.transformer.h) - 1}."
    for n, p in model.named_parameters():
        trained = (
            trainable == "all" or n.startswith("head.")
            or (trainable == "last_block" and (n.startswith(last) or n.startswith("lm.transformer.ln_f")))
        )  # fmt: skip
        assert p.requires_grad == trained, n
        if trained:
            assert not torch.equal(p, before[n]), f"{n} did not move"
        else:
            assert torch.equal(p, before[n]), f"{n} moved though frozen"


def test_a_model_without_transformer_blocks_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="needs a transformer's hidden states .* MLP has no transformer blocks"):
        Classifier(build_model(CONFIGS["mlp"], 11), 2)


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    """A char tokenizer of a tiny text without digits or '£' (as Tiny Shakespeare's)."""
    from lm.config import TokenizerConfig
    from lm.tokenizer import train_tokenizer

    tok = train_tokenizer(TokenizerConfig(corpus="c", kind="char"), {"train": ["hello world. call me!"]}, "text")
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    return load_tokenizer(d)


def test_unknown_characters_get_one_extra_id_and_are_counted(char_tok):
    vocab = char_tok.get_vocab_size()
    enc, extra = Encoder.for_run(char_tok, vocab, 64, "left")
    assert extra and enc.unk == vocab
    assert enc.encode("call me") == char_tok.encode("call me").ids  # known characters: the tokenizer's own ids
    assert enc.encode("call 09£") == char_tok.encode("call ").ids + [vocab] * 3
    assert enc.unknown("call 0900 £5") == {"0": 3, "9": 1, "£": 1, "5": 1}
    model = Classifier(build_model(CONFIGS["gpt"], vocab), 2, extra_unk=True)
    wte = model.lm.transformer.wte.weight
    assert wte.shape[0] == vocab + 1
    torch.testing.assert_close(wte[-1], wte[:-1].mean(0))  # an average character, not a random one
    model.eval()(enc.batch(["call 09£"])[:, :8])  # the unknown id embeds: no crash


def test_truncation_keeps_the_end_or_the_start(char_tok):
    left, _ = Encoder.for_run(char_tok, char_tok.get_vocab_size(), 4, "left")
    right = Encoder(left.tok, 4, left.unk, "right")
    ids = left.encode("hello world")
    assert left.batch(["hello world"])[0].tolist() == ids[-4:]
    assert right.batch(["hello world"])[0].tolist() == ids[:4]
    assert left.batch(["hello world", "me"])[1].tolist() == left.encode("me") + [PAD, PAD]
    with pytest.raises(FinetuneError, match="encodes to no tokens"):
        left.batch([""])


def test_keep_best_ranks_evaluations_by_val_accuracy(one_thread):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 11, (64, 6)))
    y = (x[:, -1] >= 5).long()  # learnable from the last token
    model = Classifier(build_model(CONFIGS["gpt"], 11), 2)
    cfg = TrainConfig(max_steps=60, batch_size=16, lr=3e-3, eval_interval=5, keep="best", device="cpu")
    data = Examples(x, y)
    result = fit(model, data, Examples(x[:32], y[:32]), cfg, progress=False, select="val_accuracy")
    rows = result.curve
    assert all("val_accuracy" in r for r in rows)
    best = min(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["step"]))
    assert result.selected_step == best["step"]
    kept = (predict(model, x[:32]).argmax(-1) == y[:32]).float().mean().item()
    assert kept == pytest.approx(best["val_accuracy"])
    with pytest.raises(ValueError, match="select must be one of"):
        fit(model, data, data, cfg, progress=False, select="val_f1")


def test_finetune_entries_are_checked_against_runs_and_corpora():
    params = on_fixtures(yaml.safe_load((ROOT / "params.yaml").read_text()))
    ok = {"run": "shakespeare-gpt", "corpus": "sms"}
    for entry, message in [
        ({"run": "nope", "corpus": "sms"}, "finetune.f.run: got 'nope'; must be a run of `runs`"),
        ({"run": "shakespeare-gpt", "corpus": "oz"}, "finetune.f.corpus: got 'oz'; must be a labelled corpus"),
        (ok | {"max_length": 65}, "finetune.f.max_length: got 65; run 'shakespeare-gpt' reads at most block_size 64"),
        (ok | {"train": {"optimizer": "muon"}}, "fine-tuning uses 'adamw', got 'muon'"),
        (ok | {"spread_seeds": [1337]}, "1337 is train.seed already"),
        (ok | {"trainable": "embeddings"}, "finetune.f.trainable"),
    ]:
        p = copy.deepcopy(params) | {"finetune": {"f": entry}}
        with pytest.raises(ValidationError, match=None) as e:
            StudyConfig.model_validate(p)
        assert message in str(e.value), str(e.value)
    assert FinetuneConfig(**ok).train.keep == "best"


# ----------------------------------------------------------------------------------------------
# the stages, for real


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """sms and shakespeare fetched, char-tokenized and a tiny gpt trained by the real stages (tracking off), then
    one fine-tune (`ref`) and one probe."""
    d = tmp_path_factory.mktemp("finetune")
    gpt = {"tokenizer": "shakespeare-char", "train": {"max_steps": 40, "batch_size": 8, "eval_interval": 20},
           "model": {"family": "gpt", "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}}  # fmt: skip
    params = tiny_params({"gpt": gpt}, tokenizers=["shakespeare-char"], tracking=False)
    params["corpora"]["sms"] = tiny_params()["corpora"]["sms"]
    train = {"max_steps": 1500, "batch_size": 8, "eval_interval": 500, "checkpoint_interval": 50}
    params["finetune"] = {"ft": {"run": "gpt", "corpus": "sms", "trainable": "last_block", "train": train}}
    params["probes"] = {"pr": {"run": "gpt", "corpus": "sms", "C": [1.0]}}
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (
        ["stages.fetch", "shakespeare", "--out", "data/shakespeare"],
        ["stages.fetch", "sms", "--out", "data/sms"],
        ["stages.tokenize", "shakespeare-char", "--data", "data/shakespeare", "--out", "tokenizers/shakespeare-char"],
        ["stages.train", "gpt", "--tokenizer", "tokenizers/shakespeare-char", "--out", "models/gpt", "--curve",
         "curves/gpt.csv", "--no-progress"],
        finetune_args("ref"),
        ["stages.probe", "pr", "--model", "models/gpt", "--tokenizers", "tokenizers", "--data", "data/sms", "--out",
         "probes/pr.json"],
    ):  # fmt: skip
        code, _, err = finish(stage(d, *args))
        assert code == 0, err
    return d


def finetune_args(out: str) -> list[str]:
    inputs = ["--model", "models/gpt", "--tokenizers", "tokenizers", "--data", "data/sms"]
    outputs = ["--out", f"ft/{out}", "--curve", f"ft/{out}.csv", "--metrics", f"ft/{out}.json"]
    return ["stages.finetune", "ft", *inputs, *outputs, "--no-progress"]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_bit_identical(work):
    state = work / "ft" / ".killed.resume" / "seed-1337"
    p = stage(work, *finetune_args("killed"))
    wait_for_state(p, state, 300)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = saved_step(state)
    assert 300 <= step < 1500 and not (work / "ft" / "killed").exists()
    code, _, err = finish(stage(work, *finetune_args("killed")))
    assert code == 0, err
    assert f"at step {step}/1500" in err
    for f in ("model.safetensors", "classifier.json"):
        assert (work / "ft" / "killed" / f).read_bytes() == (work / "ft" / "ref" / f).read_bytes(), f
    for f in ("killed.csv", "killed.json"):
        assert (work / "ft" / f).read_bytes() == (work / "ft" / f.replace("killed", "ref")).read_bytes(), f
    assert not (work / "ft" / ".killed.resume").exists()


def test_the_metrics_hold_every_split_the_unknown_characters_and_the_seeds(work):
    m = json.loads((work / "ft" / "ref.json").read_text())
    assert set(m["splits"]) == {"train", "val", "test"}
    test = m["splits"]["test"]
    assert test["examples"] == m["tokens"]["test"]["messages"] and sum(map(sum, test["confusion"])) == test["examples"]
    assert 0 < m["tokens"]["test"]["with_unknown"] <= test["examples"]  # SMS digits the Shakespeare excerpt lacks
    assert m["unknown_row_added"] and m["seeds"]["seeds"] == [1337]
    assert m["seeds"]["test_accuracy"] == [test["accuracy"]]
    assert 0 < m["trained_params"] < m["params"]


def test_probes_score_every_layer_of_the_pretrained_and_the_random_model(work):
    p = json.loads((work / "probes" / "pr.json").read_text())
    assert p["layers"] == [0, 1, 2]  # embeddings, after block 1, after block 2
    for init in ("pretrained", "random"):
        assert [sorted(r) for r in p["models"][init]] == [["C", "test", "train", "val"]] * 3
    assert p["models"]["pretrained"] != p["models"]["random"]


def lm_classify(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lm.cli", "classify", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_lm_classify_labels_what_a_person_types(work, tmp_path):
    folder = work / "ft" / "ref"
    texts = ["WINNER!! Call 09061701461 to claim your £1000 prize", "ok see you at home"]
    out = lm_classify("ft", "--model-dir", str(folder), "--text", texts[0], "--text", texts[1], cwd=work)
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [line[2] for line in lines] == texts and all(line[0] in ("ham", "spam") for line in lines)
    model, enc, labels = load_classifier(folder)
    probs = predict(model, enc.batch(texts))
    assert [float(line[1]) for line in lines] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-4)
    (tmp_path / "m.txt").write_text(f"{texts[0]}\n\n{texts[1]}\n")
    by_file = lm_classify("ft", "--model-dir", str(folder), "--file", str(tmp_path / "m.txt"), cwd=work)
    assert by_file.stdout == out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["ft", "--model-dir", "ft/ref", "--text", "  "], "error: --text is empty: give the message to classify"),
        (["ft", "--model-dir", "ft/ref"], "error: no message to classify: pass --text"),
        (["ft", "--model-dir", "ft/ref", "--file", "nope.txt"], "error: cannot read --file nope.txt"),
        (["gpt", "--text", "hi"], "error: 'gpt' is a language model of the ladder, not a fine-tuned classifier"),
        (["nope", "--text", "hi"], "error: no fine-tuned classifier at finetune/models/nope: run `make finetune`"),
        (["x", "--model-dir", "models/gpt", "--text", "hi"], "error: models/gpt is not a fine-tuned classifier: no"),
    ],
)
def test_lm_classify_bad_input_is_one_line_naming_the_fix(work, args, message):
    out = lm_classify(*args, cwd=work)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
