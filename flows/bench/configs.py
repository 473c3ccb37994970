"""What `whence bench` measures on: the model shapes (`CONFIGS`) and the queries about the demo corpus."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from whence.text import Query

# Queries about the demo corpus (State of the Union addresses, the Brown corpus, Austen, Moby-Dick).
QUERIES = [
    Query("whale", "The whale swam far beyond", " the harbour, and the sailors watched it go."),
    Query("ishmael", "Call me Ishmael. Some years ago", " I thought I would sail about a little."),
    Query("union", "The state of the union", " is strong, said the president to the congress."),
    Query("fortune", "A single man in possession of a good fortune", " must be in want of a wife."),
    Query("taxes", "The committee met to discuss", " the budget, the tariff and the public debt."),
    Query("navy", "We must build a navy", " strong enough to defend our commerce on every sea."),
    Query("rain", "She walked to the window and", " looked at the rain falling on the garden."),
    Query("war", "The war has ended and", " our soldiers are returning home to their families."),
]


@dataclass(frozen=True)
class BenchConfig:
    """A model shape and how much work each measurement does."""

    name: str
    hidden: int  # model width
    intermediate: int  # MLP width
    blocks: int
    heads: int
    vocab: int
    seq_len: int  # tokens per training sequence
    batch_size: int  # sequences per batch
    fit_batches: int  # batches for the fitting measurement (its factors also serve the scoring one)
    repeats: int  # timed repetitions of each step (best of)
    fit_repeats: int  # timed repetitions of the whole fit
    query_counts: tuple[int, ...] = (1, 8, 32, 128)
    ranks: tuple[int | str, ...] = (32, "full")
    tfidf_documents: int | None = None  # corpus documents for the TF-IDF measurement (None: all)
    tfidf_batch: int = 64  # documents hashed per batch
    tfidf_candidates: int = 100  # N kept per query
    micro_sequences: int = 2500  # fitting sequences of the micro model (EK-FAC vs LiSSA)
    pipeline: bool = True  # run the Ray pipeline measurements unless asked for by name

    def describe(self) -> str:
        return (f"Llama-style, {self.blocks} blocks, width {self.hidden}, intermediate {self.intermediate}, "
                f"{self.heads} heads, vocab {self.vocab}, seq len {self.seq_len}, batch {self.batch_size}, "
                f"float32 on CPU (bfloat16 on GPU), tracked: every block's MLP")

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS = {
    # For CI: a minute on two cores. The Ray pipeline measurements (minutes of Ray start-up and actor launches,
    # whatever the model) run only when named: --only pipeline,score_memory,workers.
    "tiny": BenchConfig("tiny", hidden=64, intermediate=172, blocks=2, heads=4, vocab=2000, seq_len=64,
                        batch_size=4, fit_batches=4, repeats=3, fit_repeats=2, tfidf_documents=24, tfidf_candidates=20,
                        micro_sequences=1000, pipeline=False),
    # A realistic Llama-like shape (TinyLlama's proportions, narrower): several minutes on two cores.
    "medium": BenchConfig("medium", hidden=512, intermediate=1376, blocks=4, heads=8, vocab=32000, seq_len=512,
                          batch_size=8, fit_batches=6, repeats=3, fit_repeats=2),
}
