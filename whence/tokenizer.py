"""The one byte-level BPE tokenizer builder: the demo's tokenizer (`whence pretrain`), the bench's and the tests'.

Byte-level BPE has no unknown tokens: every text maps to the 256 byte symbols and the merges learnt on `texts`.
One special token, `<|endoftext|>`, is BOS, EOS and pad. With `bos_prefix`, `tokenizer(text)` puts it in front of
every text (and none after it), so a document's first window and a query's prompt both start with it; without it,
`tokenizer(text)` adds no special token.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKEN = "<|endoftext|>"  # the tokenizer's one special token: BOS, EOS and pad


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 0, bos_prefix: bool = False):
    """A PreTrainedTokenizerFast trained on `texts` (seconds for a few MB) with at most `vocab_size` tokens, the
    special token and the 256 byte symbols included; merges seen fewer than `min_frequency` times are not learnt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[SPECIAL_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    if bos_prefix:
        bos_id = backend.token_to_id(SPECIAL_TOKEN)
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{SPECIAL_TOKEN} $A",
                                          pair=f"{SPECIAL_TOKEN} $A {SPECIAL_TOKEN} $B:1",
                                          special_tokens=[(SPECIAL_TOKEN, bos_id)]),
        ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN,
                                   pad_token=SPECIAL_TOKEN)
