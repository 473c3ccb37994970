"""Byte-level BPE documents tokenised and decoded fast, with exactly the ids and texts the tokenizer itself gives.

The corpus passes tokenise every document (22 M characters for the demo) and the TF-IDF passes decode every
window back to text. Measured on the demo's tokenizer, the Rust tokenizer spends most of its time in its
pre-tokenising regex; Python's `regex` module splits the same text several times faster, and the BPE of a
pre-token depends on that pre-token alone, so each distinct pre-token is encoded once and cached:

    ids(text) = prefix + concat(bpe(piece) for piece in GPT2_PATTERN.findall(text)) + suffix

`prefix`/`suffix` are the post-processor's special tokens (e.g. one BOS in front). Decoding: in a byte-level
vocabulary each character of a token's string stands for one byte, so a window's bytes are a slice of the
document's UTF-8 bytes, found by a cumulative sum of token byte lengths; decoding that slice with replacement
of broken characters is what the ByteLevel decoder does.

`DocumentTokenizer.of(tokenizer)` takes the fast path only for tokenizers of exactly that shape (no normaliser,
one ByteLevel pre-tokenizer with the GPT-2 regex and no prefix space, a BPE model without dropout, a ByteLevel
decoder, no space clean-up) whose output on a probe text equals the tokenizer's own; any other tokenizer, and
any document containing an added token's text, goes through the tokenizer unchanged.
"""

from __future__ import annotations

import json
from itertools import chain

import numpy as np

# The GPT-2 pre-tokenising pattern, as the `tokenizers` ByteLevel pre-tokenizer applies it (use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Distinct pre-tokens whose ids are kept; the cache is emptied when it grows past this (memory stays bounded).
PIECE_CACHE_SIZE = 1 << 20
# Checked at construction: the fast path must give the tokenizer's own ids on it (letters, digits, contractions,
# whitespace runs, CRLF, non-Latin scripts, a character split across tokens).
PROBE_TEXT = ("It's 1790, they'd said -- \"Fellow-Citizens\"!\r\n\n   Indented\ttab  x  \u00e9t\u00e9 na\u00efve "
              "\u4e2d\u6587 \u0928\u092e\u0938\u094d\u0924\u0947 3.14159 emoji \U0001f600 end  ")


class DocumentTokenizer:
    """`encode(text)`: the ids of `tokenizer(text)["input_ids"]`; `window_texts(text, ids, bounds)`: the texts of
    `tokenizer.batch_decode(windows, skip_special_tokens=True)`, fast for byte-level BPE (module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._fast = _FastByteLevel.build(tokenizer)

    @property
    def fast(self) -> bool:
        return self._fast is not None

    def encode(self, text: str) -> list[int]:
        if self._fast is not None and not self._fast.has_added_token(text):
            return self._fast.encode(text)
        return list(self.tokenizer(text, verbose=False)["input_ids"])

    def window_texts(self, text: str, ids: list[int], bounds: list[tuple[int, int]]) -> list[str]:
        """The decoded text of each window ids[start:end] for (start, end) in `bounds` (ids = encode(text))."""
        if self._fast is not None and not self._fast.has_added_token(text):
            return self._fast.window_texts(text, ids, bounds)
        return self.tokenizer.batch_decode([ids[s:e] for s, e in bounds], skip_special_tokens=True)


class _FastByteLevel:
    def __init__(self, backend, byte_lengths: np.ndarray, prefix: list[int], suffix: list[int], added: list[str]):
        import regex

        self.backend = backend
        self.byte_lengths = byte_lengths  # (V,) int64: bytes each id stands for in decoded text (0: special)
        self.prefix, self.suffix, self.added = prefix, suffix, added
        self.pattern = regex.compile(GPT2_PATTERN)
        self.cache: dict[str, list[int]] = {}

    @classmethod
    def build(cls, tokenizer) -> _FastByteLevel | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False) or not _byte_level(backend):
            return None
        try:
            import regex  # noqa: F401 (a dependency of transformers; without it, the plain path)
        except ImportError:
            return None
        added = backend.get_added_tokens_decoder()
        lengths = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
        for token, index in backend.get_vocab(with_added_tokens=True).items():
            if index not in added and index < lengths.shape[0]:
                lengths[index] = len(token)  # ByteLevel: one character per byte
        # The post-processor's additions: what it puts around the ids of a text with no special tokens.
        plain = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a").ids
        at = _find(full, plain)
        if at < 0:
            return None
        fast = cls(backend, lengths, full[:at], full[at + len(plain):], [t.content for t in added.values()])
        if fast.has_added_token(PROBE_TEXT) or fast.encode(PROBE_TEXT) != list(tokenizer(PROBE_TEXT)["input_ids"]):
            return None
        return fast

    def has_added_token(self, text: str) -> bool:
        return any(token in text for token in self.added)

    def encode(self, text: str) -> list[int]:
        cache = self.cache
        if len(cache) > PIECE_CACHE_SIZE:
            cache.clear()
        pieces = self.pattern.findall(text)
        missing = [piece for piece in set(pieces) if piece not in cache]
        if missing:
            # A pre-token is its own only pre-token, so encoding it alone gives its ids in context.
            for piece, encoding in zip(missing, self.backend.encode_batch(missing, add_special_tokens=False)):
                cache[piece] = encoding.ids
        return [*self.prefix, *chain.from_iterable(map(cache.__getitem__, pieces)), *self.suffix]

    def window_texts(self, text: str, ids: list[int], bounds: list[tuple[int, int]]) -> list[str]:
        data = text.encode("utf-8")
        # ends[i] = bytes of text covered by ids[:i]; window ids[s:e] covers data[ends[s]:ends[e]].
        ends = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(self.byte_lengths[np.asarray(ids, dtype=np.int64)], out=ends[1:])
        return [data[ends[s]:ends[e]].decode("utf-8", errors="replace") for s, e in bounds]


def _byte_level(backend) -> bool:
    """Whether the backend is a plain byte-level BPE: the only shape the fast path reproduces."""
    spec = json.loads(backend.to_str())
    pre, decoder, model = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}, spec.get("model") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and decoder.get("type") == "ByteLevel"
            and model.get("type") == "BPE" and not model.get("dropout"))


def _find(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start:start + len(needle)] == needle:
            return start
    return -1
