"""whence.fast_tokens: the same ids as tokenizer(text) and the same texts as batch_decode, fast or not."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from flows.corpus_pipeline import window_bounds
from tests.tiny import TEXTS, make_tokenizer
from whence.fast_tokens import DocumentTokenizer
from whence.text import chunk_tokens
from whence.tokenizer import train_bpe_tokenizer

AWKWARD = [
    "It's the whale's harbour -- they'd've gone!\r\n\n   indented\ttabs  and  double  spaces  ",
    "caf\u00e9 na\u00efve \u00e9t\u00e9, \u4e2d\u6587\u5b57 and \u0928\u092e\u0938\u094d\u0924\u0947 \U0001f433\U0001f433 whales",
    "numbers 1790 3.14159 1,000,000 and\u00a0no-break\u2003em-space \u2028 separators",
    "   leading spaces and trailing newlines\n\n\n",
    "text with the special <|endoftext|> token inside it",
    "x",
]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "bos"])
def tokenizer(request):
    return train_bpe_tokenizer(TEXTS * 4, 300, bos_prefix=request.param)


def test_ids_and_window_texts_equal_the_tokenizer(tokenizer):
    wrapped = DocumentTokenizer(tokenizer)
    assert wrapped.fast
    for text in AWKWARD + TEXTS:
        ids = wrapped.encode(text)
        assert ids == list(tokenizer(text)["input_ids"]), text
        for seq_len in (2, 3, 7, 64):
            bounds = window_bounds(len(ids), seq_len)
            windows = chunk_tokens(ids, seq_len)
            assert [ids[s:e] for s, e in bounds] == windows
            if windows:  # (batch_decode([]) gives [""])
                decoded = tokenizer.batch_decode(windows, skip_special_tokens=True)
                assert wrapped.window_texts(text, ids, bounds) == decoded


def test_other_tokenizers_take_the_tokenizer_itself():
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "whale": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    wrapped = DocumentTokenizer(tokenizer)
    assert not wrapped.fast
    assert wrapped.encode("the whale swam") == list(tokenizer("the whale swam")["input_ids"])
    assert wrapped.window_texts("the whale swam", [1, 2, 0], [(0, 2)]) == ["the whale"]


def test_the_piece_cache_is_bounded(monkeypatch):
    monkeypatch.setattr("whence.fast_tokens.PIECE_CACHE_SIZE", 4)
    tokenizer = make_tokenizer(300)
    wrapped = DocumentTokenizer(tokenizer)
    for text in TEXTS:
        assert wrapped.encode(text) == list(tokenizer(text)["input_ids"])
        assert len(wrapped._fast.cache) <= 4 + len(text.split()) + 1
