import pickle

import numpy as np
import pytest

from jaxmr.data import caption_table, parse_source
from jaxmr.text import load_tokenizer, minilm_wordpiece, train_bpe


@pytest.fixture(scope="module")
def captions():
    texts, _ = caption_table(parse_source("shapes:n=300"))
    return texts


def test_bpe_round_trip_and_layout(captions):
    tokenizer = train_bpe(captions, vocab_size=400, max_len=40)
    ids = tokenizer.encode(captions[:20])
    assert ids.shape == (20, 40) and ids.dtype == np.int32
    assert tokenizer.decode(ids) == [c.lower() for c in captions[:20]]
    assert (ids[:, 0] == tokenizer.bos_id).all()
    lengths = (ids != tokenizer.pad_id).sum(1)
    assert (ids[np.arange(20), lengths - 1] == tokenizer.eos_id).all()
    assert tokenizer.decode(tokenizer.encode("A Small RED circle"))[0] == "a small red circle"


def test_truncation_keeps_eos(captions):
    tokenizer = train_bpe(captions, vocab_size=400, max_len=6)
    ids = tokenizer.encode("a small red circle left of a large blue square above a green star")
    assert ids.shape == (1, 6) and ids[0, 0] == tokenizer.bos_id and ids[0, -1] == tokenizer.eos_id


def test_bpe_deterministic_picklable_and_saved(captions, tmp_path):
    a = train_bpe(captions, vocab_size=300, max_len=24)
    b = train_bpe(captions, vocab_size=300, max_len=24)
    assert np.array_equal(a.encode(captions), b.encode(captions))
    c = pickle.loads(pickle.dumps(a))
    assert np.array_equal(a.encode(captions), c.encode(captions))
    a.save(tmp_path / "tok")
    d = load_tokenizer(tmp_path / "tok")
    assert d.max_len == 24 and np.array_equal(a.encode(captions), d.encode(captions))


def test_minilm_wordpiece_matches_bert_ids():
    tokenizer = minilm_wordpiece(max_len=8)
    ids = tokenizer.encode(["Hello world", "a dog runs on the beach with a red ball"])
    # bert-base-uncased ids: [CLS]=101 hello=7592 world=2088 [SEP]=102, padded with 0
    assert ids[0].tolist() == [101, 7592, 2088, 102, 0, 0, 0, 0]
    assert ids[1, 0] == 101 and ids[1, -1] == 102
    assert tokenizer.vocab_size == 30522
    assert tokenizer.decode(tokenizer.encode("Hello World")) == ["hello world"]
    again = pickle.loads(pickle.dumps(tokenizer))
    assert np.array_equal(again.encode(["Hello world"]), ids[:1])


def test_cut_padding_keeps_every_token_at_the_shortest_allowed_length():
    from jaxmr.text import cut_padding

    tokens = np.zeros((3, 64), np.int32)
    tokens[0, :5], tokens[1, :17], tokens[2, :3] = 7, 8, 9
    assert cut_padding(tokens, 0, (16, 32)).shape == (3, 32)  # the longest row has 17 tokens
    np.testing.assert_array_equal(cut_padding(tokens, 0, (16, 32)), tokens[:, :32])
    assert cut_padding(tokens[[0, 2]], 0, (16, 32)).shape == (2, 16)
    assert cut_padding(tokens, 0, (8, 16)).shape == (3, 64)  # none holds 17: the full length
    assert cut_padding(tokens, 0, range(8, 64, 8)).shape == (3, 24)
    assert cut_padding(np.ones((2, 64), np.int32), 1, (16,)).shape == (2, 16)  # all padding
    assert cut_padding(tokens, 0, (128,)).shape == (3, 64)  # never longer than the tokens
