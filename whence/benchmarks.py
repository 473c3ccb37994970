"""Measurement helpers for `whence bench` that need no Ray: model shapes, timers, and one function per ratio.

Every figure is a ratio of two timings (or two memory peaks) taken in the same process, interleaved and
best-of-n, so it holds on a noisy machine where absolute seconds do not:

    scoring   training tokens/s of QueryScorer.score  /  tokens/s of a plain training step (same model and batch)
    fitting   seconds of fit_factors                  /  seconds of training steps over the same tokens
    lissa     seconds of LiSSA to EK-FAC's accuracy   /  seconds of EK-FAC query preconditioning
    tfidf     peak traced memory on a 4x corpus       /  peak on the 1x corpus (and docs/s, 4x over 1x)

Timings take the minimum over repeats: other processes only ever add time, so the minimum is the best
estimate of what the code itself costs.
"""

from __future__ import annotations

import gzip
import json
import math
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch

from whence.factors import Factors
from whence.fitting import fit_factors
from whence.model import TrackedLayer, find_tracked_layers
from whence.queries import PreparedQueries, factorise, prepare_queries
from whence.scoring import QueryScorer
from whence.task import LanguageModelingTask
from whence.text import Query

# The corpus bundled with the project (a data file beside flows/; nothing is imported from there).
BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "flows" / "demo_assets" / "corpus.jsonl.gz"

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
                        batch_size=4, fit_batches=4, repeats=3, fit_repeats=2, tfidf_documents=120, tfidf_candidates=20,
                        micro_sequences=1000, pipeline=False),
    # A realistic Llama-like shape (TinyLlama's proportions, narrower): several minutes on two cores.
    "medium": BenchConfig("medium", hidden=512, intermediate=1376, blocks=4, heads=8, vocab=32000, seq_len=512,
                          batch_size=8, fit_batches=6, repeats=3, fit_repeats=2),
}


# ---------------------------------------------------------------------------------------------------------
# Building blocks


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


def find_corpus() -> Path:
    """The demo corpus bundled with the project."""
    if not BUNDLED_CORPUS.exists():
        raise FileNotFoundError(f"no demo corpus at {BUNDLED_CORPUS}")
    return BUNDLED_CORPUS


def iter_documents(path: Path, limit: int | None = None, copies: int = 1) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of the first `limit` documents, streamed `copies` times (copy k's ids end in #k)."""
    for copy in range(copies):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                if limit is not None and index >= limit:
                    break
                row = json.loads(line)
                yield (f"{row['id']}#{copy}" if copies > 1 else row["id"]), row["text"]


def make_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` (seconds), with one end-of-text token as BOS/EOS/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def random_batches(config: BenchConfig, count: int, device: torch.device, seed: int = 0) -> list[dict]:
    """`count` batches of full-length sequences of random tokens (timing does not depend on the tokens),
    with per-sequence seeds for the true Fisher."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        shape = (config.batch_size, config.seq_len)
        target_mask = torch.ones(shape, dtype=torch.bool)
        target_mask[:, 0] = False
        batches.append({
            "input_ids": torch.randint(1, config.vocab, shape, generator=generator).to(device),
            "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
            "target_mask": target_mask.to(device),
            "seeds": torch.arange(index * shape[0], (index + 1) * shape[0]),
        })
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def best_times(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best-of-`repeats` seconds of each function, run round-robin so slow phases of the machine hit all."""
    times = {name: math.inf for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name] = min(times[name], time_call(function, device))
    return times


def training_step(model, batch: dict) -> None:
    """A plain training step without the optimizer: forward, mean next-token cross-entropy, backward into every
    parameter's .grad; gradients are dropped afterwards."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def tokens_in(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------------------
# 1. Scoring throughput against training throughput


def tile_queries(prepared: PreparedQueries, count: int) -> PreparedQueries:
    """`count` queries made by repeating the prepared ones (scoring time does not depend on their values)."""
    reps = math.ceil(count / prepared.num_queries)
    tile = lambda d: {n: t.repeat(reps, *([1] * (t.dim() - 1)))[:count].contiguous() for n, t in d.items()}  # noqa: E731
    return PreparedQueries([f"q{i}" for i in range(count)], prepared.layer_names, prepared.rank,
                           tile(prepared.left), tile(prepared.right), tile(prepared.full))


def prepared_by_rank(model, tokenizer, layers: list[TrackedLayer], factors: Factors, ranks, dtype: torch.dtype
                     ) -> dict:
    """The benchmark queries preconditioned once (full rank), then truncated to each rank, in `dtype`."""
    full = prepare_queries(model, tokenizer, layers, factors, QUERIES, rank="full")
    out = {}
    for rank in ranks:
        prepared = full if rank == "full" else factorise(full.query_ids, full.full, rank)
        out[rank] = prepared.to(dtype=dtype)
    return out


def scoring_throughput(model, layers: list[TrackedLayer], prepared: dict, batch: dict, query_counts, repeats: int,
                       device: torch.device, report: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Per (queries, rank): scoring tokens/s over plain-training tokens/s on the same batch.

    Returns (figures, details): figures[f"scoring_q{Q}_rank{r}"] = the ratio; details hold seconds and the
    evaluation path QueryScorer chose for each layer."""
    figures, details = {}, {}
    tokens = tokens_in(batch)
    for rank, base in prepared.items():
        for count in query_counts:
            queries = tile_queries(base, count)
            scorer = QueryScorer(model, layers, queries)
            scorer.score(batch)  # warm-up: builds the dense query matrices the gradient path keeps
            times = best_times({"train": lambda: training_step(model, batch), "score": lambda s=scorer: s.score(batch)},
                               repeats, device)
            key = f"scoring_q{count}_rank{rank}"
            figures[key] = times["train"] / times["score"]
            paths = sorted({scorer.layer_path(layer, tokens, batch["input_ids"].shape[0]) for layer in layers})
            details[key] = {"train_s": times["train"], "score_s": times["score"], "paths": paths,
                            "score_tokens_per_s": tokens / times["score"],
                            "train_tokens_per_s": tokens / times["train"]}
            report(f"  {key}: {figures[key]:.3f} (train {times['train']:.3f}s, score {times['score']:.3f}s, "
                   f"path {'/'.join(paths)})")
            del scorer, queries
    return figures, details


# ---------------------------------------------------------------------------------------------------------
# 2. Factor fitting against training


class PassClock:
    """Wraps fit_factors' `batches()` to time its passes: each call starts a pass, exhausting it ends one, so
    the gap between passes is the eigendecomposition."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.marks: list[tuple[float, float]] = []  # (start, end) per pass

    def __call__(self) -> Iterator[dict]:
        start = time.perf_counter()
        yield from self.batches
        self.marks.append((start, time.perf_counter()))


def fitting_time(model, layers: list[TrackedLayer], batches: list[dict], repeats: int, device: torch.device,
                 report: Callable[[str], None] = print) -> tuple[dict, dict, Factors]:
    """fit_factors (EK-FAC, true Fisher) over `batches` against training steps over the same batches.

    Figures: fitting_vs_training (the whole fit), fitting_passes_vs_training (the two data passes only) and
    eigendecomposition_vs_training. Returns (figures, details, factors)."""
    train = [math.inf] * len(batches)
    fit, passes, eigh, factors = math.inf, math.inf, math.inf, None
    for _ in range(repeats):
        for i, batch in enumerate(batches):
            train[i] = min(train[i], time_call(lambda b=batch: training_step(model, b), device))
        clock = PassClock(batches)
        synchronize(device)
        start = time.perf_counter()
        factors = fit_factors(model, layers, clock, strategy="ekfac", fisher="true")
        synchronize(device)
        total = time.perf_counter() - start
        (cov_start, cov_end), (cor_start, cor_end) = clock.marks
        fit = min(fit, total)
        passes = min(passes, (cov_end - cov_start) + (cor_end - cor_start))
        eigh = min(eigh, cor_start - cov_end)
    training = sum(train)
    figures = {"fitting_vs_training": fit / training, "fitting_passes_vs_training": passes / training,
               "eigendecomposition_vs_training": eigh / training}
    tokens = sum(tokens_in(b) for b in batches)
    details = {"tokens": tokens, "batches": len(batches), "fit_s": fit, "passes_s": passes, "eigh_s": eigh,
               "train_s": training}
    report(f"  fitting_vs_training: {figures['fitting_vs_training']:.3f} (fit {fit:.2f}s = passes {passes:.2f}s "
           f"+ eigh {eigh:.2f}s; training {training:.2f}s over {tokens} tokens)")
    return figures, details, factors


# ---------------------------------------------------------------------------------------------------------
# 3. Query preparation: EK-FAC against LiSSA at the same accuracy (micro model, exact damped Fisher)


def micro_setting(sequences: int, seq_len: int = 12, vocab: int = 200, seed: int = 0) -> dict:
    """As in tests/test_accuracy.py: a Llama of width 12 whose block-0 MLP down_proj (12 x 24 = 288 parameters)
    has a full-rank Fisher; its exact Fisher from per-sequence gradients, EK-FAC factors on the same sequences,
    and eight query gradients (data labels)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from whence.api import sequence_batches
    from whence.text import TrainingSequence
    from whence.tracking import LayerTracker

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    layers = find_tracked_layers(model, r"layers\.0\.mlp\.down_proj$")
    layer = layers[0]
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (sequences + 8, seq_len), generator=generator)
    all_sequences = [TrainingSequence(str(i), 0, tuple(row.tolist())) for i, row in enumerate(tokens)]
    fit_set, query_set = all_sequences[:sequences], all_sequences[sequences:]

    class _Pad:  # sequence_batches only asks a tokenizer for its padding id
        pad_token_id = eos_token_id = 0

    task, tracker = LanguageModelingTask(), LayerTracker(layers)

    def gradients(group, objective):
        parts = []
        for _, batch in sequence_batches(_Pad(), group, 64):
            (capture,) = tracker.capture(model, batch, objective, task.forward)
            parts.append(capture.per_sequence_gradients())
        return torch.cat(parts)  # (N, d_out, d_in)

    fit_gradients = gradients(fit_set, lambda logits, b: task.fisher_objective(logits, b, "true"))
    flat = fit_gradients.flatten(1)
    factors = fit_factors(model, layers, lambda: (b for _, b in sequence_batches(_Pad(), fit_set, 64)))
    return {"layer": layer, "fisher": flat.T @ flat / flat.shape[0], "fit_gradients": fit_gradients,
            "factors": factors, "queries": gradients(query_set, task.sequence_log_likelihood)}


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """||estimate - exact||_F / ||exact||_F over all queries together."""
    return float(torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact))


def ekfac_vs_lissa(setting: dict, repeats: int, max_steps: int = 100_000,
                   report: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Seconds of LiSSA iterations to match EK-FAC's relative error against the exact (G + damping I)^-1 v,
    over the seconds of EK-FAC's preconditioning of the same query gradients v.

    Damping as in tests/test_accuracy.py: mean(Lambda), the same for both. LiSSA gets its best case: the exact,
    full-data Fisher-vector product from per-sequence gradients already in memory (no forward or backward pass
    per step), and its scale (from power iteration) for free; only its iterations are timed. Both run on one
    thread: these are tiny operations, which threads only slow down."""
    from whence.lissa import fisher_product, lissa_inverse_hvp, top_eigenvalue

    layer, factors, v = setting["layer"], setting["factors"], setting["queries"]
    name, device = layer.name, v.device
    damping = float(factors.eigenvalues[name].mean())
    identity = torch.eye(setting["fisher"].shape[0], dtype=torch.float64)
    exact = torch.linalg.solve(setting["fisher"] + damping * identity, v.flatten(1).T).T.reshape(v.shape)
    product = fisher_product({name: setting["fit_gradients"]})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ekfac_error = relative_error(factors.precondition(name, v, damping), exact)
        ekfac_s = min(time_call(lambda: factors.precondition(name, v, damping), device)
                      for _ in range(max(repeats, 5)))
        scale = 1.2 * (top_eigenvalue(product, {name: v}) + damping)
        errors = []  # errors[j]: error of the estimate x_j / scale after j steps (step j + 1 starts from it)

        def recording(x):
            errors.append(relative_error(x[name] / scale, exact))
            return product(x)

        def recorded_products():  # stop as soon as the last estimate is as accurate as EK-FAC's
            while not errors or errors[-1] > ekfac_error:
                yield recording

        lissa_inverse_hvp({name: v}, recorded_products(), {name: damping}, scale, iterations=max_steps)
        reached = next((j for j, error in enumerate(errors) if error <= ekfac_error), None)
        steps = reached if reached is not None else max_steps
        lissa_s = min(time_call(lambda: lissa_inverse_hvp({name: v}, iter(lambda: product, None), {name: damping},
                                                          scale, iterations=steps), device)
                      for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    figures = {"lissa_vs_ekfac_preparation": lissa_s / ekfac_s}
    details = {"ekfac_relative_error": ekfac_error, "lissa_steps": steps, "lissa_reached": reached is not None,
               "lissa_s": lissa_s, "ekfac_s": ekfac_s, "damping": damping, "parameters": layer.d_out * layer.d_in,
               "fit_sequences": int(setting["fit_gradients"].shape[0])}
    bound = "" if reached is not None else f" (a lower bound: not reached in {max_steps} steps)"
    report(f"  lissa_vs_ekfac_preparation: {figures['lissa_vs_ekfac_preparation']:.1f}{bound} "
           f"(EK-FAC relative error {ekfac_error:.3f}; LiSSA {steps} steps {lissa_s * 1e3:.1f} ms, "
           f"EK-FAC {ekfac_s * 1e3:.3f} ms)")
    return figures, details


# ---------------------------------------------------------------------------------------------------------
# 4. TF-IDF filtering: throughput and peak memory, 1x and 4x corpus


def tfidf_filter(documents: Callable[[], Iterable[tuple[str, str]]], query_texts: list[str], batch_size: int,
                 candidates: int) -> int:
    """The streaming filter on whole documents: pass 1 counts document frequencies, pass 2 scores every
    document against the queries (BM25) and keeps the top `candidates` per query. Returns documents seen."""
    from whence.tfidf import CandidateSelector, DocumentFrequencies, TermHasher, bm25_scores

    hasher = TermHasher()
    frequencies = DocumentFrequencies.zeros(hasher.n_features)
    for group in _groups(documents(), batch_size):
        frequencies.update(hasher.transform([text for _, text in group]))
    idf = frequencies.idf()
    query_rows = hasher.transform(query_texts)
    selector = CandidateSelector([str(i) for i in range(len(query_texts))], candidates)
    for group in _groups(documents(), batch_size):
        scores = bm25_scores(query_rows, hasher.transform([text for _, text in group]), idf)
        selector.update(scores, [doc_id for doc_id, _ in group], [0] * len(group))
    return frequencies.num_documents


def _groups(iterable, size):
    iterator = iter(iterable)
    while group := list(islice(iterator, size)):
        yield group


def tfidf_scaling(corpus: Path, config: BenchConfig, report: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Docs/s and peak traced memory (tracemalloc: Python and numpy allocations) on the corpus and on it 4x.
    Throughput runs untraced (tracing slows allocation-heavy code); memory runs traced."""
    query_texts = [f"{q.prompt}{q.completion}" for q in QUERIES]
    # Warm-up on a few documents: the first call pays for imports and first-touch allocations.
    tfidf_filter(lambda: iter_documents(corpus, 8), query_texts, config.tfidf_batch, config.tfidf_candidates)
    details = {}
    for copies in (1, 4):
        def documents(copies=copies):
            return iter_documents(corpus, config.tfidf_documents, copies)

        start = time.perf_counter()
        count = tfidf_filter(documents, query_texts, config.tfidf_batch, config.tfidf_candidates)
        seconds = time.perf_counter() - start
        tracemalloc.start()
        try:
            tfidf_filter(documents, query_texts, config.tfidf_batch, config.tfidf_candidates)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Each document is read twice (two passes); docs/s counts documents filtered.
        details[f"{copies}x"] = {"documents": count, "seconds": seconds, "docs_per_s": count / seconds,
                                 "peak_bytes": peak}
        report(f"  tfidf {copies}x: {count} documents, {count / seconds:.0f} docs/s, peak {peak / 2**20:.1f} MiB")
    one, four = details["1x"], details["4x"]
    figures = {"tfidf_peak_memory_4x_vs_1x": four["peak_bytes"] / one["peak_bytes"],
               "tfidf_throughput_4x_vs_1x": four["docs_per_s"] / one["docs_per_s"]}
    return figures, details
