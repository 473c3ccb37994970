"""`whence pretrain`'s data, all on the driver: the corpus's documents, the validation split, the tokenizer, the
training windows and the unigram baseline.

Windows are the training sequences that `whence fit` and `whence score` use (`whence.text`): consecutive,
non-overlapping windows of at most `seq_len` tokens of one document, so the model is pretrained on exactly the
sequences whose influence is later measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flows.pretrain.settings import PretrainConfig
from whence.corpus import CorpusSource, CorpusTally
from whence.errors import CorpusError
from whence.tokenizer import SPECIAL_TOKEN, train_bpe_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_MIN_FREQUENCY = 2  # merges of pairs seen once are not learnt


def read_documents(corpus: CorpusSource) -> tuple[list[tuple[str, str]], CorpusTally]:
    """(doc_id, text) pairs in corpus order, the first occurrence of each id, and the tally of rows read.

    Bad rows are skipped and counted, as `whence fit` does without --strict.
    """
    from whence.corpus import DUPLICATE_ID, BadRow, list_fragments, read_fragment

    documents, seen, tally = [], set(), CorpusTally()
    for fragment in list_fragments(corpus.paths):
        for row in read_fragment(fragment, corpus.id_field, corpus.text_field):
            tally.add(row)
            if isinstance(row, BadRow):
                continue
            if row.doc_id in seen:
                tally.documents -= 1
                tally.add_bad(DUPLICATE_ID)
                continue
            seen.add(row.doc_id)
            documents.append((row.doc_id, row.text))
    if tally.total_bad:
        log.warning("skipped %d bad corpus rows: %s", tally.total_bad, tally.as_dict()["bad_by_reason"])
    if len(documents) < 2:
        raise CorpusError(f"{' '.join(corpus.paths)}: {len(documents)} usable documents; pretraining needs at least "
                          "2 (some to train on, some to validate on)")
    return documents, tally


def split_documents(documents: list[tuple[str, str]], val_fraction: float, seed: int):
    """(train, val): a random `val_fraction` of the documents (at least one each side) is held out."""
    import numpy as np

    num_val = min(len(documents) - 1, max(1, round(val_fraction * len(documents))))
    held_out = set(np.random.default_rng(seed).permutation(len(documents))[:num_val].tolist())
    train = [doc for i, doc in enumerate(documents) if i not in held_out]
    val = [doc for i, doc in enumerate(documents) if i in held_out]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (no unknown tokens) whose `tokenizer(text)` starts with the special token."""
    return train_bpe_tokenizer(texts, vocab_size, min_frequency=TOKENIZER_MIN_FREQUENCY, bos_prefix=True)


@dataclass
class Windows:
    """Training sequences as one padded array: `tokens` (N, seq_len) int32, right-padded; `lengths` (N,) int32."""

    tokens: object  # np.ndarray (N, T) int32
    lengths: object  # np.ndarray (N,) int32
    pad_id: int

    @classmethod
    def from_documents(cls, tokenizer, documents: list[tuple[str, str]], seq_len: int) -> Windows:
        import numpy as np

        from whence.text import chunk_tokens, pad_id_of, tokenize_document

        pad_id = pad_id_of(tokenizer)
        windows = [w for _, text in documents for w in chunk_tokens(tokenize_document(tokenizer, text), seq_len)]
        tokens = np.full((len(windows), seq_len), pad_id, dtype=np.int32)
        lengths = np.zeros(len(windows), dtype=np.int32)
        for row, window in enumerate(windows):
            tokens[row, : len(window)] = window
            lengths[row] = len(window)
        return cls(tokens, lengths, pad_id)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_targets(self) -> int:
        """Predicted tokens: every token of a window but its first."""
        return int(self.lengths.sum() - len(self.lengths))

    def targets(self):
        """The predicted tokens of all windows, flattened (int64)."""
        import numpy as np

        positions = np.arange(self.tokens.shape[1])
        mask = (positions >= 1) & (positions < self.lengths[:, None])  # (N, T)
        return self.tokens[mask].astype(np.int64)


def unigram_baseline(train: Windows, val: Windows, vocab_size: int) -> dict:
    """Cross-entropy of the validation targets under the training targets' unigram distribution (add-one
    smoothed, so a token unseen in training costs a finite amount), and that distribution's own entropy."""
    import numpy as np

    counts = np.bincount(train.targets(), minlength=vocab_size).astype(np.float64) + 1.0  # add-one smoothing
    log_p = np.log(counts / counts.sum())  # (V,)
    return {
        "unigram_val_loss": float(-log_p[val.targets()].mean()),
        "unigram_train_entropy": float(-(np.exp(log_p) * log_p).sum()),
    }


@dataclass
class PretrainData:
    """Everything training reads, made on the driver: the split documents, the tokenizer trained on the training
    documents, both sides cut into windows, the unigram baseline and the tally of corpus rows."""

    train_docs: list[tuple[str, str]]
    val_docs: list[tuple[str, str]]
    tokenizer: object
    train: Windows
    val: Windows
    baseline: dict  # unigram_baseline's
    tally: CorpusTally


def prepare_data(corpus: CorpusSource, config: PretrainConfig) -> PretrainData:
    documents, tally = read_documents(corpus)
    train_docs, val_docs = split_documents(documents, config.val_fraction, config.seed)
    log.info("%d documents (%d bad rows skipped): %d for training, %d held out", len(documents),
             tally.total_bad, len(train_docs), len(val_docs))
    tokenizer = train_tokenizer([text for _, text in train_docs], config.vocab_size)
    train = Windows.from_documents(tokenizer, train_docs, config.seq_len)
    val = Windows.from_documents(tokenizer, val_docs, config.seq_len)
    baseline = unigram_baseline(train, val, len(tokenizer))
    log.info("tokenizer: %d tokens; %d training windows (%d tokens), %d validation windows; unigram baseline %.4f "
             "nats/token", len(tokenizer), len(train), train.num_tokens, len(val), baseline["unigram_val_loss"])
    return PretrainData(train_docs, val_docs, tokenizer, train, val, baseline, tally)


def llama_config(config: PretrainConfig, tokenizer):
    """The LlamaConfig of the model to train: `config`'s shape, the tokenizer's vocabulary and special token."""
    from transformers import LlamaConfig

    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.mlp_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.seq_len,
        tie_word_embeddings=False,
        bos_token_id=special,
        eos_token_id=special,
        pad_token_id=special,
    )
