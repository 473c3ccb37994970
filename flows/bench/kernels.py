"""`whence bench` measurements 1-4, in this process and without Ray: one function per ratio.

    scoring   training tokens/s of QueryScorer.score  /  tokens/s of a plain training step (same model and batch)
    fitting   seconds of fit_factors                  /  seconds of training steps over the same tokens
    lissa     seconds of LiSSA to EK-FAC's accuracy   /  seconds of EK-FAC query preparation (micro setting)
    tfidf     peak traced memory on a 4x corpus       /  peak on the 1x corpus (and docs/s, 4x over 1x)

Each returns (figures, details): figures are the ratios, details the raw numbers behind them.
"""

from __future__ import annotations

import math
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import torch

from flows.bench.configs import QUERIES, BenchConfig
from flows.bench.fixtures import iter_documents
from flows.bench.timing import best_times, synchronize, time_call, tokens_in, training_step
from whence.factors import Factors
from whence.fitting import fit_factors
from whence.model import TrackedLayer
from whence.queries import HostedModel, PreparedQueries, factorise, prepare_queries
from whence.scoring import QueryScorer

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
    full = prepare_queries(HostedModel(model, tokenizer, layers), factors, QUERIES, rank="full")
    out = {}
    for rank in ranks:
        prepared = full if rank == "full" else factorise(full.query_ids, full.full, rank)
        out[rank] = prepared.to(dtype=dtype)
    return out


def scoring_throughput(model, layers: list[TrackedLayer], prepared: dict, batch: dict, config: BenchConfig,
                       device: torch.device, report: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Per (queries, rank): scoring tokens/s over plain-training tokens/s on the same batch, for each of
    `config.query_counts` and each rank in `prepared`.

    Returns (figures, details): figures[f"scoring_q{Q}_rank{r}"] = the ratio; details hold seconds and the
    evaluation path QueryScorer chose for each layer."""
    figures, details = {}, {}
    tokens = tokens_in(batch)
    for rank, base in prepared.items():
        for count in config.query_counts:
            queries = tile_queries(base, count)
            scorer = QueryScorer(model, layers, queries)
            scorer.score(batch)  # warm-up: builds the dense query matrices the gradient path keeps
            times = best_times({"train": lambda: training_step(model, batch), "score": lambda s=scorer: s.score(batch)},
                               config.repeats, device)
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
# 3. Query preparation: EK-FAC against LiSSA at the same accuracy (the micro setting, exact damped Fisher)


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """||estimate - exact||_F / ||exact||_F over all queries together."""
    return float(torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact))


def lissa_steps_to(target_error: float, product, v: dict, damping: dict, scale: float, exact: torch.Tensor,
                   max_steps: int) -> int | None:
    """LiSSA iterations until its estimate of (G + damping I)^-1 v is within `target_error` of `exact`
    (None: not within `max_steps`). One layer: `v` and `damping` have the one name."""
    from whence.lissa import lissa_inverse_hvp

    (name,) = v
    errors = []  # errors[j]: error of the estimate x_j / scale after j steps (step j + 1 starts from it)

    def recording(x):
        errors.append(relative_error(x[name] / scale, exact))
        return product(x)

    def recorded_products():  # stop as soon as the last estimate is as accurate as the target
        while not errors or errors[-1] > target_error:
            yield recording

    lissa_inverse_hvp(v, recorded_products(), damping, scale, iterations=max_steps)
    return next((j for j, error in enumerate(errors) if error <= target_error), None)


def ekfac_vs_lissa(setting: dict, repeats: int, max_steps: int = 100_000,
                   report: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Seconds of LiSSA iterations to match EK-FAC's relative error against the exact (G + damping I)^-1 v,
    over the seconds of EK-FAC's preconditioning of the same query gradients v (flows.bench.micro's setting).

    Damping as in tests/test_accuracy.py: mean(Lambda), the same for both. LiSSA gets its best case: the exact,
    full-data Fisher-vector product from per-sequence gradients already in memory (no forward or backward pass
    per step), and its scale (from power iteration) for free; only its iterations are timed. Both run on one
    thread: these are tiny operations, which threads only slow down."""
    from whence.lissa import fisher_product, lissa_inverse_hvp, top_eigenvalue

    layer, factors = setting["layer"], setting["factors"]
    name, shape = layer.name, (-1, layer.d_out, layer.d_in)
    v = setting["queries"].reshape(shape)  # (Q, d_out, d_in)
    damping = float(factors.eigenvalues[name].mean())
    identity = torch.eye(setting["fisher"].shape[0], dtype=torch.float64)
    exact = torch.linalg.solve(setting["fisher"] + damping * identity, v.flatten(1).T).T.reshape(v.shape)
    product = fisher_product({name: setting["fit_gradients"].reshape(shape)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ekfac_error = relative_error(factors.precondition(name, v, damping), exact)
        ekfac_s = min(time_call(lambda: factors.precondition(name, v, damping), v.device)
                      for _ in range(max(repeats, 5)))
        scale = 1.2 * (top_eigenvalue(product, {name: v}) + damping)
        reached = lissa_steps_to(ekfac_error, product, {name: v}, {name: damping}, scale, exact, max_steps)
        steps = reached if reached is not None else max_steps
        lissa_s = min(time_call(lambda: lissa_inverse_hvp({name: v}, iter(lambda: product, None), {name: damping},
                                                          scale, iterations=steps), v.device)
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


def tfidf_scaling(corpus, config: BenchConfig, report: Callable[[str], None] = print) -> tuple[dict, dict]:
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
