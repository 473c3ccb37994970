"""What the measurements share in one `whence bench` run: the demo corpus (package data of flows), a random
Llama of the config's shape, random batches, a tokenizer trained on the corpus, and `Bench`, which builds each
of them once."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from itertools import islice

import torch

from flows.bench.configs import BenchConfig

TOKENIZER_DOCUMENTS = 200  # corpus documents the bench tokenizer is trained on


def demo_corpus():
    """The demo corpus bundled with flows (flows/demo_assets/corpus/, gzipped JSON-lines shards, package data):
    a Traversable directory."""
    corpus = resources.files("flows") / "demo_assets" / "corpus"
    if not corpus.is_dir():
        raise FileNotFoundError(f"no demo corpus at {corpus}")
    return corpus


def iter_documents(corpus, limit: int | None = None, copies: int = 1) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of the first `limit` documents of a gzipped JSON-lines corpus (a file, or a directory of
    shards read in name order; a path or Traversable), streamed `copies` times (copy k's ids end in #k)."""
    shards = sorted((f for f in corpus.iterdir() if f.name.endswith(".jsonl.gz")), key=lambda f: f.name) \
        if corpus.is_dir() else [corpus]

    def lines():
        for shard in shards:
            with shard.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as handle:
                yield from handle

    for copy in range(copies):
        for line in islice(lines(), limit):
            row = json.loads(line)
            yield (f"{row['id']}#{copy}" if copies > 1 else row["id"]), row["text"]


def build_model(config: BenchConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised LlamaForCausalLM of `config`'s shape (never downloaded), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model_config = LlamaConfig(vocab_size=config.vocab, hidden_size=config.hidden,
                               intermediate_size=config.intermediate, num_hidden_layers=config.blocks,
                               num_attention_heads=config.heads, num_key_value_heads=config.heads,
                               max_position_embeddings=config.seq_len, tie_word_embeddings=False,
                               bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(model_config).to(device=device, dtype=dtype).eval()


def bench_tokenizer(config: BenchConfig):
    """A byte-level BPE tokenizer of `config.vocab` tokens trained on the demo corpus's first documents."""
    from whence.tokenizer import train_bpe_tokenizer

    texts = (text for _, text in iter_documents(demo_corpus(), limit=TOKENIZER_DOCUMENTS))
    return train_bpe_tokenizer(texts, config.vocab)


def random_batches(config: BenchConfig, count: int, device: torch.device, seed: int = 0) -> list[dict]:
    """`count` batches of full-length sequences of random tokens (timing does not depend on the tokens),
    with per-sequence seeds for the true Fisher."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        shape = (config.batch_size, config.seq_len)  # (B, T)
        target_mask = torch.ones(shape, dtype=torch.bool)
        target_mask[:, 0] = False
        batches.append({
            "input_ids": torch.randint(1, config.vocab, shape, generator=generator).to(device),
            "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
            "target_mask": target_mask.to(device),
            "seeds": torch.arange(index * shape[0], (index + 1) * shape[0]),
        })
    return batches


@dataclass
class Bench:
    """The shared state of one run: the model, its tracked layers, batches, tokenizer and fitted factors, each
    built once, by the first measurement that needs it."""

    config: BenchConfig
    device: torch.device
    dtype: torch.dtype
    model: object = field(default=None, init=False)
    layers: list = field(default=None, init=False)
    tokenizer: object = field(default=None, init=False)
    factors: object = field(default=None, init=False)  # whence.factors.Factors, from the fitting measurement
    batches: list = field(default=None, init=False)
    pipeline: object = field(default=None, init=False)  # flows.bench.pipeline.PipelineFixture, made on first use

    def ensure_model(self) -> None:
        from whence.model import find_tracked_layers

        if self.model is None:
            self.model = build_model(self.config, self.device, self.dtype)
            self.layers = find_tracked_layers(self.model, "mlp")
            self.batches = random_batches(self.config, self.config.fit_batches, self.device)

    def ensure_tokenizer(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = bench_tokenizer(self.config)

    def ensure_factors(self) -> None:
        """Factors from one batch when the fitting measurement has not run: enough to time scoring with."""
        from whence.fitting import fit_factors

        self.ensure_model()
        if self.factors is None:
            self.factors = fit_factors(self.model, self.layers, lambda: iter(self.batches[:1]))
