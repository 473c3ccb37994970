"""`whence bench` measurements 5-8: the Ray scoring pipeline (flows.score.score_corpus) against itself.

    5. pipeline overhead   score_corpus's throughput once started (sequences after the first scored batch over
                           the seconds they took) over QueryScorer's in this process: same model, queries,
                           sequences and torch threads as the one scoring actor
    6. peak memory         peak resident memory of the run (this process and every process it started: Ray's
                           raylet and workers), above the level before the run, on the corpus 4x over 1x
    7. workers             throughput after start-up with 2 workers over 1 worker (4x corpus)
    8. shards              scoring throughput of the model split over 2 stage actors over 1, and the share of
                           their time the 2 stages spend idle

The fixture (a saved model and tokenizer, fitted factors, queries, a corpus slice cut into small files) is made
once per bench run in a temporary directory. Each corpus file holds DOCUMENTS_PER_FILE one-window documents:
the pipeline scores a fragment's rows as one batch, so that is its batch size, and the in-process one's.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from flows.bench.configs import QUERIES
from flows.bench.fixtures import Bench, demo_corpus, iter_documents
from flows.bench.timing import time_call

log = logging.getLogger("whence.bench")

CORPUS_DOCUMENTS = 32  # one-window documents in the 1x corpus
# Documents per corpus file. The pipeline scores a fragment's rows as one batch, so this is its batch size (and
# the in-process reference's); 8 files in the 1x corpus are enough to keep Ray Data's readers as busy as on 4x.
DOCUMENTS_PER_FILE = 4
QUERY_RANK = 32
# score_corpus runs: name -> (corpus copies, workers). Each runs once per bench run, whichever figures use it.
SCORE_RUNS = {"1x_1w": (1, 1), "4x_1w": (4, 1), "4x_2w": (4, 2)}


@dataclass
class PipelineFixture:
    root: Path
    model_dir: Path
    factors_dir: Path
    queries_path: Path
    corpora: dict[int, Path]  # copies -> directory of corpus files
    texts: list[tuple[str, str]]  # the 1x corpus's (doc_id, text)
    runs: dict[str, dict] = field(default_factory=dict)  # run name -> score_corpus summary (+ memory)
    started_ray: bool = False


class PeakMemory:
    """Samples the resident memory of this process and of every process it started (Ray's raylet, workers and
    actors) every `interval` seconds: the peak of their sum, and the peak of the largest single process."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak_total = 0
        self.peak_process = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        """(sum, largest) of the resident set sizes now."""
        import psutil

        sizes = []
        for process in [self.process, *self.process.children(recursive=True)]:
            try:
                sizes.append(process.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return sum(sizes), max(sizes)

    def _record(self) -> None:
        total, largest = self.sample()
        self.peak_total, self.peak_process = max(self.peak_total, total), max(self.peak_process, largest)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.baseline_total, _ = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()


def fixture(bench: Bench) -> PipelineFixture:
    """Made once per bench run (bench.pipeline), removed by `cleanup`."""
    if bench.pipeline is not None:
        return bench.pipeline
    import ray

    from flows.cluster import connect

    bench.ensure_model()
    bench.ensure_tokenizer()
    root = Path(tempfile.mkdtemp(prefix="whence-bench-"))
    model_dir = root / "model"
    bench.model.save_pretrained(model_dir)
    bench.tokenizer.save_pretrained(model_dir)
    texts = one_window_texts(bench)
    corpora = {copies: _write_corpus(root / f"corpus_{copies}x", texts, copies, DOCUMENTS_PER_FILE)
               for copies in (1, 4)}
    queries_path = root / "queries.jsonl"
    queries_path.write_text("".join(json.dumps({"id": q.id, "prompt": q.prompt, "completion": q.completion}) + "\n"
                                    for q in QUERIES))
    factors_dir = _save_factors(bench, root / "factors", model_dir)
    started = not ray.is_initialized()
    connect(None)  # Ray starts here, outside every timed run
    bench.pipeline = PipelineFixture(root, model_dir, factors_dir, queries_path, corpora, texts, started_ray=started)
    return bench.pipeline


def one_window_texts(bench: Bench) -> list[tuple[str, str]]:
    """(doc_id, text) of the corpus's first documents, each cut to one window: a little under seq_len tokens,
    so that re-tokenising the decoded text cannot spill into a second window."""
    texts = []
    for doc_id, text in iter_documents(demo_corpus(), limit=CORPUS_DOCUMENTS):
        ids = bench.tokenizer(text, verbose=False)["input_ids"][: bench.config.seq_len - 16]
        texts.append((doc_id, bench.tokenizer.decode(ids, skip_special_tokens=True)))
    return texts


def _save_factors(bench: Bench, factors_dir: Path, model_dir: Path) -> Path:
    """The bench's factors (those of the fitting measurement, else from one batch), saved as `whence fit` would."""
    from whence.model import model_fingerprint

    bench.ensure_factors()
    bench.factors.metadata.update({"model_fingerprint": model_fingerprint(bench.model), "model": str(model_dir),
                                   "arguments": {"seq_len": bench.config.seq_len, "modules": "mlp",
                                                 "strategy": "ekfac"}})
    bench.factors.save(factors_dir, {"command": "fit"})
    return factors_dir


def _write_corpus(directory: Path, texts: list[tuple[str, str]], copies: int, per_file: int) -> Path:
    directory.mkdir(parents=True)
    rows = [(f"{doc_id}#{copy}", text) for copy in range(copies) for doc_id, text in texts]
    for start in range(0, len(rows), per_file):
        with open(directory / f"part-{start // per_file:05d}.jsonl", "w", encoding="utf-8") as handle:
            for doc_id, text in rows[start : start + per_file]:
                handle.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return directory


def run_score(bench: Bench, name: str) -> dict:
    """score_corpus run `name` of SCORE_RUNS; its summary plus the run's memory, cached by name."""
    fx = fixture(bench)
    if name in fx.runs:
        return fx.runs[name]
    from flows.cluster import ClusterSettings
    from flows.score import score_corpus
    from whence.config import ScoreConfig

    copies, workers = SCORE_RUNS[name]
    config = ScoreConfig(top_k=10, tfidf_candidates=0, query_rank=QUERY_RANK, batch_size=DOCUMENTS_PER_FILE)
    with PeakMemory() as memory:
        summary = score_corpus(str(fx.model_dir), str(fx.factors_dir), str(fx.queries_path), [str(fx.corpora[copies])],
                               str(fx.root / f"results_{name}"), config, cluster=ClusterSettings(workers=workers),
                               overwrite=True)
    summary = dict(summary, peak_rss=memory.peak_total, peak_process_rss=memory.peak_process,
                   baseline_rss=memory.baseline_total)
    log.debug("score run %s: %s", name, summary)
    fx.runs[name] = summary
    return summary


def corpus_batches(bench: Bench) -> tuple[int, list[dict]]:
    """(sequences, batches) of the 1x corpus, DOCUMENTS_PER_FILE sequences a batch, as the pipeline cuts them."""
    from whence.api import sequence_batches
    from whence.text import iter_sequences

    sequences = list(iter_sequences(bench.tokenizer, fixture(bench).texts, bench.config.seq_len))
    return len(sequences), [batch for _, batch in sequence_batches(bench.tokenizer, sequences, DOCUMENTS_PER_FILE)]


def fixture_queries(bench: Bench):
    """The fixture's queries prepared in this process with its saved factors, at QUERY_RANK."""
    from whence.factors import Factors
    from whence.queries import HostedModel, prepare_queries
    from whence.text import load_queries

    fx = fixture(bench)
    return prepare_queries(HostedModel(bench.model, bench.tokenizer, bench.layers), Factors.load(fx.factors_dir),
                           load_queries(fx.queries_path), rank=QUERY_RANK)


def in_process_seconds(bench: Bench, threads: int) -> tuple[float, int]:
    """Best-of-repeats seconds for QueryScorer over the 1x corpus's sequences, with `threads` torch threads."""
    import torch

    from whence.scoring import QueryScorer

    count, batches = corpus_batches(bench)
    batches = [{k: v.to(bench.device) for k, v in b.items()} for b in batches]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scorer = QueryScorer(bench.model, bench.layers, fixture_queries(bench))
        scorer.score(batches[0])  # warm-up
        seconds = min(time_call(lambda: [scorer.score(b) for b in batches], bench.device)
                      for _ in range(max(1, bench.config.repeats - 1)))
    finally:
        torch.set_num_threads(previous)
    return seconds, count


def steady_rate(run: dict) -> float:
    """Sequences per second of a score_corpus run once started (after its first scored batch)."""
    return run["timings"]["score_steady_sequences"] / max(run["timings"]["score_steady_s"], 1e-9)


def pipeline_overhead(bench: Bench) -> tuple[dict, dict]:
    """The pipeline's throughput after start-up (sequences arriving after the first scored batch, over the
    seconds they took) against the in-process scorer's, on the 4x and the 1x corpus; and the whole 1x run's
    (start-up, scan and reduction included) for context."""
    from flows.cluster import actor_resources, torch_threads

    one, four = run_score(bench, "1x_1w"), run_score(bench, "4x_1w")
    threads = torch_threads(actor_resources(1).get("num_cpus", 1))  # as a lone scoring actor gets
    seconds, count = in_process_seconds(bench, threads)
    reference = count / seconds  # sequences per second in process
    figures = {"pipeline_throughput_vs_in_process": steady_rate(four) / reference,
               "pipeline_throughput_1x_vs_in_process": steady_rate(one) / reference,
               "pipeline_whole_run_vs_in_process": one["sequences_scored"] / one["seconds"] / reference}
    details = {"sequences": {"1x": one["sequences_scored"], "4x": four["sequences_scored"]},
               "in_process_sequences": count, "in_process_s": seconds, "threads": threads,
               "sequences_per_s": {"in_process": reference, "1x": steady_rate(one), "4x": steady_rate(four)},
               "timings": {"1x": one["timings"], "4x": four["timings"]}, "run_s": one["seconds"]}
    print(f"  pipeline: {steady_rate(four):.3f} sequences/s after start-up (4x corpus) against "
          f"{reference:.3f} in process ({threads} thread(s) in the actor and in process): "
          f"{figures['pipeline_throughput_vs_in_process']:.2f}; whole 1x run "
          f"{figures['pipeline_whole_run_vs_in_process']:.2f}")
    return figures, details


MEMORY_KEYS = ("peak_rss", "peak_process_rss", "baseline_rss", "sequences_scored")


def score_memory(bench: Bench) -> tuple[dict, dict]:
    """Peak memory of the score_corpus runs on the 4x corpus over the 1x corpus (1 worker each)."""
    runs = {"1x": run_score(bench, "1x_1w"), "4x": run_score(bench, "4x_1w")}
    mib = {size: (run["peak_rss"] / 2**20, run["peak_process_rss"] / 2**20) for size, run in runs.items()}
    figures = {"score_peak_memory_4x_vs_1x": runs["4x"]["peak_rss"] / runs["1x"]["peak_rss"],
               "score_largest_process_memory_4x_vs_1x": runs["4x"]["peak_process_rss"] / runs["1x"]["peak_process_rss"]}
    print(f"  score memory: peak of all processes {mib['1x'][0]:.0f} MiB (1x) -> {mib['4x'][0]:.0f} MiB (4x), "
          f"largest process {mib['1x'][1]:.0f} -> {mib['4x'][1]:.0f} MiB; {runs['1x']['sequences_scored']} -> "
          f"{runs['4x']['sequences_scored']} sequences")
    return figures, {size: {key: run[key] for key in MEMORY_KEYS} for size, run in runs.items()}


def worker_scaling(bench: Bench) -> tuple[dict, dict]:
    """Throughput after start-up of score_corpus with 2 workers over 1 worker (4x corpus)."""
    runs = {"1": run_score(bench, "4x_1w"), "2": run_score(bench, "4x_2w")}
    rate = {workers: steady_rate(run) for workers, run in runs.items()}
    print(f"  workers: {rate['1']:.2f} -> {rate['2']:.2f} sequences/s after start-up (1 -> 2 workers, 4x corpus)")
    return ({"score_throughput_2_workers_vs_1": rate["2"] / rate["1"]},
            {"sequences_per_s": rate, "score_s": {workers: run["timings"]["score_s"] for workers, run in runs.items()}})


def shard_scaling(bench: Bench) -> tuple[dict, dict]:
    """Scoring throughput of the model split into 2 pipeline stages against 1 stage (ShardedWorker,
    the machinery behind `--shards`), the same torch threads in all, and each stage's idle share: the part of
    its wall time spent waiting for work from its neighbours."""
    import os

    import torch

    count, batches = corpus_batches(bench)
    prepared = fixture_queries(bench)
    cores = max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
    rates, idle, details = {}, {}, {}
    for stages in (1, 2):
        # As many threads in all as the machine has cores: one stage gets them all, two stages half each.
        seconds, timings, threads = _time_stages(bench, stages, max(1, cores // stages), prepared, batches)
        rates[stages] = count / seconds
        idle[stages] = [t["idle_s"] / max(t["wall_s"], 1e-9) for t in timings]
        details[f"{stages}_stages"] = {"seconds": seconds, "sequences": count, "stage_timings": timings,
                                       "threads_per_stage": threads}
    figures = {"shards_throughput_2_vs_1": rates[2] / rates[1],
               "shards_stage_idle_share_mean": sum(idle[2]) / len(idle[2]),
               "shards_stage_idle_share_max": max(idle[2])}
    print(f"  shards: {rates[1]:.3f} -> {rates[2]:.3f} sequences/s (1 -> 2 stages); stages idle "
          f"{', '.join(f'{share:.0%}' for share in idle[2])} of their time")
    return figures, details


def _time_stages(bench: Bench, stages: int, threads: int, prepared, batches: list[dict]) -> tuple[float, list, int]:
    """Best-of-repeats seconds of a ShardedWorker of `stages` stages over `batches`, the stage timings of that
    best run, and the threads each stage had."""
    import torch

    from actors.sharded_worker import ShardedWorker, ShardOptions

    options = ShardOptions(micro_batch_size=max(1, DOCUMENTS_PER_FILE // 2), num_threads=threads)
    worker = ShardedWorker(str(fixture(bench).model_dir), stages, batch_size=DOCUMENTS_PER_FILE, options=options)
    try:
        worker.set_queries(prepared)
        worker.score_batches(batches[:1])  # warm-up: every stage has run once
        best, timings = float("inf"), None
        for _ in range(max(1, bench.config.repeats - 1)):
            worker.reset_timing()
            seconds = time_call(lambda w=worker: w.score_batches(batches), torch.device("cpu"))
            if seconds < best:
                best, timings = seconds, worker.stage_timings()
    finally:
        worker.shutdown()
    return best, timings, options.num_threads


def cleanup(bench: Bench) -> None:
    import shutil

    fx = bench.pipeline
    if fx is None:
        return
    if fx.started_ray:
        import ray

        ray.shutdown()
    shutil.rmtree(fx.root, ignore_errors=True)
    bench.pipeline = None
