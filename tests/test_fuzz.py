"""Property tests (hypothesis): tokenizers round-trip any text, and the params loader never crashes.

Tokenizers: a char tokenizer trained on arbitrary unicode encodes exactly one token per character and
decodes back to the text (unseen characters become [UNK] with oov='unk'); a byte-level BPE trained on
arbitrary text round-trips any other text; `tokenize_corpus` writes files that decode to every split.
(test_tokenizer.py fuzzes a BPE trained on Oz; these train on the random text itself.)

Params: whatever the YAML holds (random nested structures, random YAML-ish text, the real params.yaml
with keys deleted or leaves replaced by values of the wrong type), `parse_params` / `load_params`
return a valid StudyConfig or raise ParamsError with one line per problem, never anything else.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lm.config import ParamsError, StudyConfig, TokenizerConfig, load_params, parse_params
from lm.tokenizer import UNK, encode_split, load_ids, load_tokenizer, split_text, tokenize_corpus, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])

CHAR = TokenizerConfig(corpus="c", kind="char")
CHAR_UNK = TokenizerConfig(corpus="c", kind="char", oov="unk")
# Any code point a str can hold in a UTF-8 file: everything but lone surrogates.
any_text = st.text(st.characters(codec="utf-8"), max_size=200)
any_line = st.text(st.characters(codec="utf-8", exclude_characters="."), max_size=20)  # '.' is the 'lines' boundary


# ----------------------------------------------------------------------------------------------
# tokenizers


@FAST
@given(any_text.filter(bool))
def test_char_tokenizer_round_trips_the_text_it_was_trained_on(text):
    tok = train_tokenizer(CHAR, {"train": [text]}, "text")
    ids = encode_split(tok, [text], "text")
    assert tok.get_vocab_size() == len(set(text))
    assert ids.size == len(text)  # one token per code point: nothing normalised, merged or dropped
    assert [tok.id_to_token(i) for i in ids.tolist()] == list(text)
    assert tok.decode(ids.tolist()) == text


@FAST
@given(any_text.filter(bool), any_text)
def test_char_tokenizer_maps_unseen_characters_to_unk(train, val):
    tok = train_tokenizer(CHAR_UNK, {"train": [train], "val": [val]}, "text")
    unseen = set(val) - set(train)
    assert tok.get_vocab_size() == len(set(train)) + bool(unseen)  # [UNK] only when some split needs it
    ids = encode_split(tok, [val], "text")
    assert ids.size == len(val)
    assert tok.decode(ids.tolist()) == val.translate({ord(c): UNK for c in unseen})


@settings(deadline=None, max_examples=50)
@given(st.lists(any_line, min_size=1, max_size=6), st.lists(any_line, max_size=6))
def test_char_tokenizer_lines_round_trip(train, val):
    tok = train_tokenizer(CHAR_UNK, {"train": train, "val": val}, "lines")
    assert tok.token_to_id(".") == 0
    for lines in (train, val):
        unseen = set("".join(lines)) - set("".join(train))
        ids = encode_split(tok, lines, "lines")
        assert ids.size == len(split_text(lines, "lines"))
        assert tok.decode(ids.tolist()) == split_text(lines, "lines").translate({ord(c): UNK for c in unseen})


@settings(deadline=None, max_examples=50)
@given(any_text, any_text, st.integers(257, 320))
def test_bpe_trained_on_random_text_round_trips_any_text(train, other, vocab_size):
    tok = train_tokenizer(TokenizerConfig(corpus="c", kind="bpe", vocab_size=vocab_size), {"train": [train]}, "text")
    assert 256 <= tok.get_vocab_size() <= vocab_size
    for s in (train, other, train + other):
        assert tok.decode(encode_split(tok, [s], "text").tolist()) == s


@settings(deadline=None, max_examples=30)
@given(
    st.sampled_from([CHAR_UNK, TokenizerConfig(corpus="c", kind="bpe", vocab_size=300)]),
    st.sampled_from(["text", "lines"]),
    st.data(),
)
def test_tokenize_corpus_writes_what_decodes_to_every_split(cfg, fmt, data):
    part = any_text.filter(bool) if fmt == "text" else st.lists(any_line, min_size=1, max_size=5)
    splits = {
        name: data.draw(part.map(lambda p: [p] if isinstance(p, str) else p), label=name) for name in ("train", "val")
    }
    with tempfile.TemporaryDirectory() as d:
        stats = tokenize_corpus(cfg, splits, fmt, Path(d) / "t")
        tok = load_tokenizer(Path(d) / "t")
        for name, texts in splits.items():
            text = split_text(texts, fmt)
            unseen = set(text) - set(split_text(splits["train"], fmt)) if cfg.kind == "char" else set()
            assert tok.decode(load_ids(Path(d) / "t", name).tolist()) == text.translate({ord(c): UNK for c in unseen})
            assert stats["splits"][name]["characters"] == len(text)
            assert stats["splits"][name]["oov"] == sum(text.count(c) for c in unseen)


# ----------------------------------------------------------------------------------------------
# params

KEYS = [
    "corpora",
    "tokenizers",
    "runs",
    "seed",
    "evaluate",
    "report",
    "tracking",
    "model",
    "train",
    "family",
    "gpt",
    "mlp",
    "split",
    "url",
    "sha256",
    "kind",
    "vocab_size",
    "names",
    "lr",
    "block_size",
    "n_head",
    "x",
    "weight_decay",
    "grad_clip",
    "min_lr",
    "smoothing",
    "temperature",
    "dropout",
    "step_at",
    "max_steps",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(KEYS),
    st.binary(max_size=8),
    st.dates(),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers(), st.none(), st.booleans(), st.floats())
structures = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)


def check_outcome(data: Any, source: str = "params") -> StudyConfig | None:
    """parse_params(data) is a valid config or a ParamsError with one line per problem; nothing else."""
    try:
        cfg = parse_params(data, source)
    except ParamsError as e:
        check_error(e, source)
        return None
    check_valid(cfg)
    return cfg


def check_error(e: ParamsError, source: str) -> None:
    assert e.problems and e.source == source
    assert all(isinstance(p, str) and p.strip() and "\n" not in p for p in e.problems), e.problems
    assert str(e).startswith(f"{source}: {len(e.problems)} problem")


def check_valid(cfg: StudyConfig) -> None:
    assert isinstance(cfg, StudyConfig)
    assert parse_params(cfg.model_dump(mode="json")) == cfg  # a valid config survives its own dump
    for leaf in leaves(cfg.model_dump()):
        assert not (isinstance(leaf, float) and not math.isfinite(leaf)), leaf  # no NaN or infinite setting
    for run in cfg.runs:  # cross references resolve
        assert cfg.corpus_of(run) in cfg.corpora.values()


def leaves(x: Any):
    if isinstance(x, dict):
        for v in x.values():
            yield from leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from leaves(v)
    else:
        yield x


@pytest.fixture(scope="module")
def real() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


@FAST
@given(structures)
@example({"\n": None})  # a key that would break the one-line-per-problem report
@example({"corpora": {"a.b": None, "": 1, " x": 2}, "tokenizers": {"x\u2028y": {}}})
def test_random_structures_are_a_config_or_a_params_error(data):
    check_outcome(data)
    if isinstance(data, dict):  # the same junk as the sections of a file that is otherwise right
        check_outcome({"corpora": data, "tokenizers": data, "runs": data})


@FAST
@given(
    st.one_of(
        structures.map(lambda d: yaml.safe_dump(d, allow_unicode=True, sort_keys=False)),
        st.text(max_size=200),
        st.text("{}[]?:-&*!|>'\"#%@`,. \n\tab01", max_size=60),
    )
)
@example("{[1, 2]: x}\n")  # a list as a key
@example("? {a: 1}\n: 2\n")  # a mapping as a key
@example("corpora: {? [a] : 1}\ntokenizers: {}\n")  # ... inside a section
@example("&a [*a]\n")  # a list that contains itself
@example("corpora: &a {x: *a}\ntokenizers: {}\n")  # a mapping that contains itself
@example("seed: !!binary aGVsbG8=\ncorpora: !!set {a}\ntokenizers: {1: 2}\n")
@example("seed: !!python/object:os.system x\n")  # no arbitrary objects
def test_random_files_are_a_config_or_a_params_error(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            cfg = load_params(path)
        except ParamsError as e:
            check_error(e, str(path))
        else:
            check_valid(cfg)


def paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a nested dict/list (the root excluded)."""
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(paths(v, prefix + (k,)))
    return out


wrong_values = st.one_of(
    scalars,
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3),
)


def numbers_like(x: int | float) -> st.SearchStrategy:
    edge = st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63)])
    if isinstance(x, bool):
        return st.one_of(st.booleans(), st.integers(-1, 2))
    if isinstance(x, int):
        return st.one_of(edge, st.integers(), st.floats(allow_nan=True, allow_infinity=True))
    return st.one_of(
        edge, st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.inf, -math.inf, math.nan])
    )


@FAST
@given(st.data())
def test_mutated_real_params_are_a_config_or_a_params_error(real, data):
    d = copy.deepcopy(real)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        where = paths(d)
        if not where:
            break
        path = data.draw(st.sampled_from(where), label="path")
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        op = data.draw(st.sampled_from(["delete", "replace", "perturb", "add", "rename"]), label="op")
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = data.draw(wrong_values, label="value")
        elif op == "perturb" and isinstance(
            parent[key], (int, float)
        ):  # a number of the right kind, maybe out of range
            parent[key] = data.draw(numbers_like(parent[key]), label="number")
        elif op == "add" and isinstance(parent, dict):
            parent[data.draw(keys, label="new key")] = data.draw(wrong_values, label="value")
        elif op == "rename" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10), label="new name")] = parent.pop(key)
    check_outcome(d)


def test_the_real_params_and_presets_survive_their_own_checks(real):
    check_valid(parse_params(real))
    for path in sorted((ROOT / "presets").glob("*.yaml")):
        check_valid(load_params(path))


def numeric_fields(real: dict) -> list[tuple[tuple, str]]:
    """(path of a section in `real`, name of a numeric field of its config class), for every section."""
    from typing import get_args

    from lm import config as C
    from lm.families import FAMILY_CONFIGS

    def numeric(cls) -> list[str]:
        out = []
        for name, f in cls.model_fields.items():
            types = set(get_args(f.annotation)) | {f.annotation}
            if types & {int, float} and bool not in types:
                out.append(name)
        return out

    families = dict(FAMILY_CONFIGS)
    sections = [(("evaluate",), C.EvaluateConfig), (("report",), C.ReportConfig), ((), C.StudyConfig)]
    sections += [(("corpora", c, "split"), C.SplitConfig) for c in real["corpora"]]
    sections += [(("tokenizers", t), C.TokenizerConfig) for t in real["tokenizers"]]
    for r, run in real["runs"].items():
        sections += [(("runs", r, "train"), C.TrainConfig), (("runs", r, "model"), families[run["model"]["family"]])]
    return [(path, name) for path, cls in sections for name in numeric(cls)]


EDGES = [math.inf, -math.inf, math.nan, 0, -1, 2**63, 1e-12, 0.5, 1e300]


def set_field(real: dict, path: tuple, name: str, value: Any) -> dict:
    d = copy.deepcopy(real)
    section = d
    for k in path:
        section = section.setdefault(k, {})
    section[name] = value
    return d


def test_every_numeric_field_with_edge_values_is_a_finite_config_or_a_params_error(real):
    seen = set()
    for path, name in numeric_fields(real):
        kind = (path[0] if path else "", path[-1] if path else "", name)  # one section of each kind is enough
        if kind in seen:
            continue
        seen.add(kind)
        for value in EDGES:
            check_outcome(set_field(real, path, name, value))
    assert ("runs", "train", "weight_decay") in seen and ("evaluate", "evaluate", "temperature") in seen


@FAST
@given(st.data())
def test_any_number_in_any_numeric_field_is_a_finite_config_or_a_params_error(real, data):
    fields = numeric_fields(real)
    name = data.draw(st.sampled_from(sorted({n for _, n in fields})), label="field")
    path = data.draw(st.sampled_from([p for p, n in fields if n == name]), label="section")
    value = data.draw(st.one_of(st.sampled_from(EDGES), st.floats(), st.integers()), label="value")
    check_outcome(set_field(real, path, name, value))
