"""The start-up checks on their own: the minimum in the "too small" message is the true
minimum, batch ids are bounded on both sides, tokenizers are compared id by id."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmobjectives.errors import UserError
from lmobjectives.train.preflight import check_batch, check_enough_data, check_vocab, compare_tokenizers


def fake_run(tokens: int, batch: int, accum: int, world: int, row: int) -> SimpleNamespace:
    store = SimpleNamespace(manifest={"splits": {"train": {"tokens": tokens}}})
    return SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(batch_size=batch, grad_accum=accum)),
                           world_size=world, row_length=row, sources=[SimpleNamespace(store=store)])


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 8), accum=st.integers(1, 4), world=st.integers(1, 4), row=st.integers(1, 64))
def test_the_stated_minimum_is_exact(batch, accum, world, row):
    need = batch * accum * world
    minimum = (need - 1) * row + 1
    check_enough_data(fake_run(minimum, batch, accum, world, row))  # enough: no error
    if minimum > 1:
        with pytest.raises(UserError, match=f"at least {minimum} tokens"):
            check_enough_data(fake_run(minimum - 1, batch, accum, world, row))


def test_batch_ids_are_bounded_on_both_sides():
    ok = {"input_ids": np.array([[0, 9]]), "labels": np.array([[-100, 9]])}
    check_batch(ok, 10, 1)
    with pytest.raises(UserError, match="step 3: the batch's input_ids holds token id 10"):
        check_batch({"input_ids": np.array([[0, 10]])}, 10, 3)
    with pytest.raises(UserError, match="decoder_input_ids holds token id -1"):
        check_batch({"input_ids": np.array([[1]]), "decoder_input_ids": np.array([[-1]])}, 10, 1)
    with pytest.raises(UserError, match="labels holds token id 12"):
        check_batch({"input_ids": np.array([[1]]), "labels": np.array([[-100, 12]])}, 10, 1)
    check_batch({"input_ids": np.array([[10**6]])}, None, 1)  # no table found: nothing to check


class Tok:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return dict(self.vocab)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self.vocab)


def test_tokenizers_compared_id_by_id():
    a = Tok({"a": 0, "b": 1, "c": 2})
    compare_tokenizers(a, Tok({"c": 2, "a": 0, "b": 1}), "M")
    with pytest.raises(UserError, match=r"M has 3 tokens, the run's tokenizer has 3; 2 id\(s\) differ "
                                        r"\(first: id 1 is 'c' there, 'b' here\)"):
        compare_tokenizers(a, Tok({"a": 0, "c": 1, "b": 2}), "M")


def test_embedding_tables_checked_against_the_tokenizer():
    class M(torch.nn.Module):
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(n_in, 4), torch.nn.Linear(4, n_out)

        def get_input_embeddings(self):  # noqa: ANN201
            return self.emb

        def get_output_embeddings(self):  # noqa: ANN201
            return self.head

    tok = Tok({str(i): i for i in range(50)})
    assert check_vocab(M(64, 64), tok) == 64  # a padded table is fine
    with pytest.raises(UserError, match="input embedding table has 40 rows but the tokenizer has 50"):
        check_vocab(M(40, 64), tok)
    with pytest.raises(UserError, match="output embedding table has 45 rows"):
        check_vocab(M(64, 45), tok)
    wrapper = torch.nn.Sequential(torch.nn.Embedding(30, 2))  # no HF accessors: found anyway
    with pytest.raises(UserError, match="30 rows"):
        check_vocab(wrapper, tok)
