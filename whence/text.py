"""From text to token batches: training sequences (document windows) and queries (prompt + completion).

Conventions (DESIGN.md): a document is tokenized with the tokenizer's defaults and cut into consecutive,
non-overlapping windows of at most `seq_len` tokens, numbered by `chunk`. A query's tokens are
tokenizer(prompt) followed by tokenizer(completion, add_special_tokens=False); its measurement covers the
completion tokens only.

A batch is a dict of tensors, right-padded:
    input_ids       (B, T) int64
    attention_mask  (B, T) int64, 1 on real tokens
    target_mask     (B, T) bool, True where the token at t is a predicted label (t >= 1); the log-likelihood
                    sums log p(x_t | x_<t) over these positions
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from whence.errors import QueryError

# A window needs two tokens for one term of its loss (positions t >= 2 in 1-based counting).
MIN_SEQUENCE_TOKENS = 2


@dataclass(frozen=True)
class Query:
    id: str
    prompt: str
    completion: str


@dataclass(frozen=True)
class TrainingSequence:
    """One training sequence: window `chunk` of document `doc_id`."""

    doc_id: str
    chunk: int
    input_ids: tuple[int, ...]



def tokenize_document(tokenizer, text: str) -> list[int]:
    # verbose=False: long documents are expected; we cut them into windows ourselves.
    return list(tokenizer(text, verbose=False)["input_ids"])


def chunk_tokens(token_ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of at most seq_len tokens; a trailing window of fewer than
    MIN_SEQUENCE_TOKENS tokens has no loss term and is dropped."""
    if seq_len < MIN_SEQUENCE_TOKENS:
        raise ValueError(f"seq_len must be at least {MIN_SEQUENCE_TOKENS}, got {seq_len}")
    windows = [list(token_ids[i : i + seq_len]) for i in range(0, len(token_ids), seq_len)]
    return [w for w in windows if len(w) >= MIN_SEQUENCE_TOKENS]


def document_sequences(tokenizer, doc_id: str, text: str, seq_len: int) -> list[TrainingSequence]:
    windows = chunk_tokens(tokenize_document(tokenizer, text), seq_len)
    return [TrainingSequence(doc_id, chunk, tuple(w)) for chunk, w in enumerate(windows)]


def iter_sequences(tokenizer, documents: Iterable[tuple[str, str]], seq_len: int) -> Iterator[TrainingSequence]:
    """Training sequences of (doc_id, text) pairs, in order."""
    for doc_id, text in documents:
        yield from document_sequences(tokenizer, doc_id, text, seq_len)


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(token_lists: Sequence[Sequence[int]], pad_id: int, target_starts: Sequence[int] | None = None) -> dict:
    """Right-pad token lists into a batch. target_starts[i] is the first predicted position of row i
    (1 for training sequences: every token after the first; the prompt length for queries)."""
    if not token_lists:
        raise ValueError("cannot collate an empty batch")
    width = max(len(t) for t in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    target_mask = torch.zeros((len(token_lists), width), dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        input_ids[row, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
        start = 1 if target_starts is None else max(1, int(target_starts[row]))
        target_mask[row, start : len(tokens)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


def collate_sequences(sequences: Sequence[TrainingSequence], pad_id: int) -> dict:
    return collate([s.input_ids for s in sequences], pad_id)


def context_length(model) -> int | None:
    """The context window (max_position_embeddings, n_positions or n_ctx) of a model or of its config."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None


def check_window(model_config, seq_len: int, model: str) -> None:
    """SettingsError when training windows of seq_len tokens would not fit the model's context (positions past
    it have no embedding, or are extrapolated silently)."""
    from whence.errors import SettingsError

    limit = context_length(model_config)
    if limit is not None and seq_len > limit:
        raise SettingsError(f"--seq-len {seq_len}: longer than the context window of {model} ({limit} tokens, "
                            "max_position_embeddings); use --seq-len " + str(limit) + " or less", "seq_len")


def token_pieces(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """One string per token whose concatenation is tokenizer.decode(token_ids): the text each token adds.

    Decoding tokens one at a time breaks characters that byte-level BPE splits over several tokens (CJK, emoji)
    into U+FFFD. Here piece t is decode(ids[:t+1]) minus decode(ids[:t]) (prefix differences), and while a prefix
    ends inside a character (it decodes to a trailing U+FFFD) the character waits: it lands on the token that
    completes it, and the tokens before get "". Differences also keep SentencePiece's leading spaces, which a
    token decoded alone loses. Costs T decodes of up to T tokens (T <= seq_len)."""
    ids = [int(t) for t in token_ids]
    full = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    pieces, done = [], ""
    for end in range(1, len(ids) + 1):
        text = full if end == len(ids) else tokenizer.decode(ids[:end], clean_up_tokenization_spaces=False)
        if end < len(ids) and (text.endswith("\ufffd") or not text.startswith(done)):
            pieces.append("")  # inside a character (or a prefix the next tokens rewrite): wait for its end
            continue
        back = len(pieces)
        while not text.startswith(done):  # the last token rewrote earlier text: that text moves onto it
            back -= 1
            done = done[: len(done) - len(pieces[back])]
            pieces[back] = ""
        pieces.append(text[len(done):])
        done = text
    return pieces


def encode_query(tokenizer, query: Query, max_length: int | None) -> tuple[list[int], int]:
    """(tokens, prompt_length): tokenizer(prompt) then the completion with no special tokens."""
    if not query.completion or not query.completion.strip():
        raise QueryError(f"query {query.id!r}: empty completion (the measurement log p(completion | prompt) needs one)")
    prompt = list(tokenizer(query.prompt, verbose=False)["input_ids"])
    completion = list(tokenizer(query.completion, add_special_tokens=False, verbose=False)["input_ids"])
    if not prompt:
        raise QueryError(f"query {query.id!r}: the prompt has no tokens; a completion needs some context")
    tokens = prompt + completion
    if max_length is not None and len(tokens) > max_length:
        raise QueryError(
            f"query {query.id!r}: {len(tokens)} tokens ({len(prompt)} prompt + {len(completion)} completion) "
            f"exceed the model's context window of {max_length} tokens"
        )
    return tokens, len(prompt)


def collate_queries(tokenizer, queries: Sequence[Query], max_length: int | None) -> dict:
    encoded = [encode_query(tokenizer, q, max_length) for q in queries]
    return collate([t for t, _ in encoded], pad_id_of(tokenizer), [p for _, p in encoded])


def _query_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a queries file; QueryError naming the file (and line) when it is missing, a directory,
    unreadable, or not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise QueryError(f"{path}: queries file not found") from None
    except IsADirectoryError:
        raise QueryError(f"{path}: is a directory; --queries takes a JSON-lines file") from None
    except OSError as error:
        raise QueryError(f"{path}: cannot read the queries file: {error.strerror or error}") from None
    for line_number, raw in enumerate(data.splitlines(), start=1):
        try:
            yield line_number, raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a BOM is not JSON
        except UnicodeDecodeError as error:
            raise QueryError(f"{path}:{line_number}: not UTF-8 text (byte {error.start + 1} of the line); "
                             "save the queries file as UTF-8") from None


def load_queries(path: str | Path) -> list[Query]:
    """Queries from JSON lines {"id", "prompt", "completion"}; errors name the file and line."""
    queries, seen = [], set()
    for line_number, line in _query_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise QueryError(f"{where}: invalid JSON: {error.msg}") from error
        if not isinstance(row, dict):
            raise QueryError(f"{where}: expected a JSON object with id, prompt and completion")
        for field in ("id", "prompt", "completion"):
            if field not in row:
                raise QueryError(f"{where}: missing field {field!r}")
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise QueryError(f"{where}: prompt and completion must be strings")
        query = Query(str(row["id"]), row["prompt"], row["completion"])
        if query.id in seen:
            raise QueryError(f"{where}: duplicate query id {query.id!r}")
        if not query.completion.strip():
            raise QueryError(f"{where}: query {query.id!r} has an empty completion")
        seen.add(query.id)
        queries.append(query)
    if not queries:
        raise QueryError(f"{path}: no queries")
    return queries
