"""Batches: every target scored exactly once, with its true context, and names never leak into each other."""

from __future__ import annotations

import numpy as np
import pytest

from lm.batches import BatchError, Batches

NAMES = np.array([0, 5, 13, 13, 1, 0, 15, 12, 9, 22, 9, 1, 0, 1, 22, 1, 0])  # .emma.olivia.ava.


def test_lines_rows_are_one_name_each():
    b = Batches(NAMES, "lines", seq_len=0, boundary_id=0)
    xs, ys = zip(*b.iterate(2))
    x, y = np.concatenate([t.numpy() for t in xs]), np.concatenate([t.numpy() for t in ys])
    assert x.shape == y.shape == (3, 7)  # longest: '.olivia' = 7 positions
    assert x[0].tolist() == [0, 5, 13, 13, 1, 0, 0] and y[0].tolist() == [5, 13, 13, 1, 0, -1, -1]
    assert y[1].tolist() == [15, 12, 9, 22, 9, 1, 0]
    assert b.num_targets == len(NAMES) - 1 == int((y != -1).sum())


def test_lines_reject_names_longer_than_the_block():
    with pytest.raises(BatchError, match="block_size >= 7"):
        Batches(NAMES, "lines", seq_len=0, boundary_id=0, max_len=6)


@pytest.mark.parametrize("seq_len, overlap", [(4, 0), (5, 2), (8, 7), (3, 0), (16, 3)])
def test_text_iterate_scores_every_token_once_with_full_context(seq_len, overlap):
    ids = np.arange(37) % 11
    b = Batches(ids, "text", seq_len=seq_len, overlap=overlap)
    scored = []
    for x, y in b.iterate(3):
        for xr, yr in zip(x.numpy(), y.numpy()):
            for t in np.flatnonzero(yr != -1):
                scored.append(int(yr[t]))
                # a target at window position t has min(t+1, ...) tokens of in-window context:
                # with overlap k-1 every scored target past the stream start has >= k tokens before it
                assert t >= overlap or xr[0] == ids[0]
    assert scored == ids[1:].tolist()
    assert b.num_targets == len(ids) - 1


def test_text_sampling_is_seeded():
    ids = np.arange(1000) % 50
    b = Batches(ids, "text", seq_len=8, overlap=2)
    a1 = b.sample(np.random.default_rng(0), 4)
    a2 = b.sample(np.random.default_rng(0), 4)
    assert all((p == q).all() for p, q in zip(a1, a2))
    x, y = a1
    assert ((x[:, 1:] == y[:, :-1]) | (y[:, :-1] == -1)).all()  # y is x shifted by one


def test_text_too_short():
    with pytest.raises(BatchError, match="fewer than one window"):
        Batches(np.arange(5), "text", seq_len=8)


@pytest.mark.parametrize("n_ctx", [4, 5, 8])
def test_chunks_score_llama_cpps_protocol(n_ctx):
    """llama-perplexity's windows: non-overlapping n_ctx tokens, a partial last one dropped; position j of a
    window predicts its token j + 1, scored only for j from n_ctx // 2 to n_ctx - 2."""
    ids = np.arange(37)  # distinct ids: a target names its own position
    b = Batches(ids, "text", seq_len=n_ctx)
    got = [(x.numpy(), y.numpy()) for x, y in b.chunks(n_ctx, 2)]
    x = np.concatenate([g[0] for g in got])
    y = np.concatenate([g[1] for g in got])
    n = 37 // n_ctx
    assert x.shape == y.shape == (n, n_ctx) and x.flatten().tolist() == list(range(n * n_ctx))
    first = n_ctx // 2
    for row_x, row_y in zip(x, y):
        assert (row_y[:first] == -1).all() and row_y[-1] == -1  # the first half, and nothing from the next window
        assert row_y[first:-1].tolist() == row_x[first + 1 :].tolist()
    assert int((y != -1).sum()) == n * (n_ctx - 1 - first)


def test_chunks_need_two_windows_of_text():
    with pytest.raises(BatchError, match="at least 2 windows of 8"):
        list(Batches(np.arange(12), "text", seq_len=8).chunks(8, 1))
    with pytest.raises(BatchError, match="one token stream"):
        list(Batches(NAMES, "lines", seq_len=0, boundary_id=0).chunks(4, 1))
