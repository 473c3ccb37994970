"""`whence bench` measurements 5-7: the Ray scoring pipeline (flows.score.score_corpus) against itself.

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

log = logging.getLogger("whence.bench")

CORPUS_DOCUMENTS = 32  # one-window documents in the 1x corpus
# Documents per corpus file. The pipeline scores a fragment's rows as one batch, so this is its batch size (and
# the in-process reference's); 8 files in the 1x corpus are enough to keep Ray Data's readers as busy as on 4x.
DOCUMENTS_PER_FILE = 4
QUERY_RANK = 32


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


def fixture(bench) -> PipelineFixture:
    """Made once per bench run (bench.pipeline), removed by `cleanup`."""
    if getattr(bench, "pipeline", None) is not None:
        return bench.pipeline
    from flows.cluster import connect
    from whence.benchmarks import QUERIES, find_corpus, iter_documents
    from whence.fitting import fit_factors
    from whence.model import model_fingerprint

    bench.ensure_model()
    bench.ensure_tokenizer()
    config, tokenizer, model = bench.config, bench.tokenizer, bench.model
    root = Path(tempfile.mkdtemp(prefix="whence-bench-"))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # One window per document: keep a little under seq_len tokens so that re-tokenising the decoded text
    # cannot spill into a second window.
    texts = []
    for doc_id, text in iter_documents(find_corpus(), limit=CORPUS_DOCUMENTS):
        ids = tokenizer(text, verbose=False)["input_ids"][: config.seq_len - 16]
        texts.append((doc_id, tokenizer.decode(ids, skip_special_tokens=True)))
    corpora = {copies: _write_corpus(root / f"corpus_{copies}x", texts, copies, DOCUMENTS_PER_FILE)
               for copies in (1, 4)}
    queries_path = root / "queries.jsonl"
    queries_path.write_text("".join(json.dumps({"id": q.id, "prompt": q.prompt, "completion": q.completion}) + "\n"
                                    for q in QUERIES))
    factors_dir = root / "factors"
    metadata = {"model_fingerprint": model_fingerprint(model), "model": str(model_dir),
                "arguments": {"seq_len": config.seq_len, "modules": "mlp", "strategy": "ekfac"}}
    factors = bench.factors or fit_factors(model, bench.layers, lambda: iter(bench.batches[:1]))
    factors.metadata.update(metadata)
    factors.save(factors_dir, {"command": "fit"})
    import ray

    started = not ray.is_initialized()
    connect(None)  # Ray starts here, outside every timed run
    bench.pipeline = PipelineFixture(root, model_dir, factors_dir, queries_path, corpora, texts, started_ray=started)
    return bench.pipeline


def _write_corpus(directory: Path, texts: list[tuple[str, str]], copies: int, per_file: int) -> Path:
    directory.mkdir(parents=True)
    rows = [(f"{doc_id}#{copy}", text) for copy in range(copies) for doc_id, text in texts]
    for start in range(0, len(rows), per_file):
        with open(directory / f"part-{start // per_file:05d}.jsonl", "w", encoding="utf-8") as handle:
            for doc_id, text in rows[start : start + per_file]:
                handle.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return directory


def run_score(bench, name: str, copies: int, workers: int) -> dict:
    """score_corpus on the `copies`x corpus with `workers`; its summary plus the run's memory, cached by name."""
    fx = fixture(bench)
    if name in fx.runs:
        return fx.runs[name]
    from flows.score import score_corpus
    from whence.config import ScoreConfig

    config = ScoreConfig(top_k=10, tfidf_candidates=0, query_rank=QUERY_RANK, batch_size=DOCUMENTS_PER_FILE)
    with PeakMemory() as memory:
        summary = score_corpus(str(fx.model_dir), str(fx.factors_dir), str(fx.queries_path), [str(fx.corpora[copies])],
                               str(fx.root / f"results_{name}"), config, workers=workers, overwrite=True)
    summary = dict(summary, peak_rss=memory.peak_total, peak_process_rss=memory.peak_process,
                   baseline_rss=memory.baseline_total)
    log.debug("score run %s: %s", name, summary)
    fx.runs[name] = summary
    return summary


def in_process_seconds(bench, threads: int) -> tuple[float, int]:
    """Best-of-repeats seconds for QueryScorer over the 1x corpus's sequences, with `threads` torch threads."""
    import torch

    from whence.api import sequence_batches
    from whence.benchmarks import time_call
    from whence.factors import Factors
    from whence.queries import prepare_queries
    from whence.scoring import QueryScorer
    from whence.text import iter_sequences, load_queries

    fx = fixture(bench)
    sequences = list(iter_sequences(bench.tokenizer, fx.texts, bench.config.seq_len))
    batches = [batch for _, batch in sequence_batches(bench.tokenizer, sequences, DOCUMENTS_PER_FILE)]
    batches = [{k: v.to(bench.device) for k, v in b.items()} for b in batches]
    factors = Factors.load(fx.factors_dir)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prepared = prepare_queries(bench.model, bench.tokenizer, bench.layers, factors, load_queries(fx.queries_path),
                                   rank=QUERY_RANK)
        scorer = QueryScorer(bench.model, bench.layers, prepared)
        scorer.score(batches[0])  # warm-up
        seconds = min(time_call(lambda: [scorer.score(b) for b in batches], bench.device)
                      for _ in range(max(1, bench.config.repeats - 1)))
    finally:
        torch.set_num_threads(previous)
    return seconds, len(sequences)


def steady_rate(run: dict) -> float:
    """Sequences per second of a score_corpus run once started (after its first scored batch)."""
    return run["timings"]["score_steady_sequences"] / max(run["timings"]["score_steady_s"], 1e-9)


def pipeline_overhead(bench) -> tuple[dict, dict]:
    """The pipeline's throughput after start-up (sequences arriving after the first scored batch, over the
    seconds they took) against the in-process scorer's, on the 4x and the 1x corpus; and the whole 1x run's
    (start-up, scan and reduction included) for context."""
    from flows.cluster import actor_resources, torch_threads

    one, four = run_score(bench, "1x_1w", 1, 1), run_score(bench, "4x_1w", 4, 1)
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


def score_memory(bench) -> tuple[dict, dict]:
    one, four = run_score(bench, "1x_1w", 1, 1), run_score(bench, "4x_1w", 4, 1)
    figures = {"score_peak_memory_4x_vs_1x": four["peak_rss"] / one["peak_rss"],
               "score_largest_process_memory_4x_vs_1x": four["peak_process_rss"] / one["peak_process_rss"]}
    details = {name: {key: run[key] for key in ("peak_rss", "peak_process_rss", "baseline_rss", "sequences_scored")}
               for name, run in (("1x", one), ("4x", four))}
    print(f"  score memory: peak of all processes {one['peak_rss'] / 2**20:.0f} MiB (1x) -> "
          f"{four['peak_rss'] / 2**20:.0f} MiB (4x), largest process {one['peak_process_rss'] / 2**20:.0f} -> "
          f"{four['peak_process_rss'] / 2**20:.0f} MiB; {one['sequences_scored']} -> {four['sequences_scored']} "
          f"sequences")
    return figures, details


def worker_scaling(bench) -> tuple[dict, dict]:
    one, two = run_score(bench, "4x_1w", 4, 1), run_score(bench, "4x_2w", 4, 2)
    rate = {"1": steady_rate(one), "2": steady_rate(two)}
    figures = {"score_throughput_2_workers_vs_1": rate["2"] / rate["1"]}
    details = {"sequences_per_s": rate, "score_s": {"1": one["timings"]["score_s"], "2": two["timings"]["score_s"]}}
    print(f"  workers: {rate['1']:.2f} -> {rate['2']:.2f} sequences/s after start-up (1 -> 2 workers, 4x corpus)")
    return figures, details


def shard_scaling(bench) -> tuple[dict, dict]:
    """Scoring throughput of the model split into 2 pipeline stages against 1 stage (actors.shard.ShardedWorker,
    the machinery behind `--shards`), the same torch threads in all, and each stage's idle share: the part of
    its wall time spent waiting for work from its neighbours."""
    import os

    import torch

    from actors.shard import ShardedWorker, ShardOptions
    from whence.api import sequence_batches
    from whence.benchmarks import time_call
    from whence.factors import Factors
    from whence.queries import prepare_queries
    from whence.text import iter_sequences, load_queries

    fx = fixture(bench)
    sequences = list(iter_sequences(bench.tokenizer, fx.texts, bench.config.seq_len))
    batches = [batch for _, batch in sequence_batches(bench.tokenizer, sequences, DOCUMENTS_PER_FILE)]
    prepared = prepare_queries(bench.model, bench.tokenizer, bench.layers, Factors.load(fx.factors_dir),
                               load_queries(fx.queries_path), rank=QUERY_RANK)
    cores = max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
    rates, idle, details = {}, {}, {}
    for stages in (1, 2):
        # As many threads in all as the machine has cores: one stage gets them all, two stages half each.
        options = ShardOptions(micro_batch_size=max(1, DOCUMENTS_PER_FILE // 2), num_threads=max(1, cores // stages))
        worker = ShardedWorker(str(fx.model_dir), stages, batch_size=DOCUMENTS_PER_FILE, options=options)
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
        rates[stages] = len(sequences) / best
        idle[stages] = [t["idle_s"] / max(t["wall_s"], 1e-9) for t in timings]
        details[f"{stages}_stages"] = {"seconds": best, "sequences": len(sequences), "stage_timings": timings,
                                       "threads_per_stage": options.num_threads}
    figures = {"shards_throughput_2_vs_1": rates[2] / rates[1],
               "shards_stage_idle_share_mean": sum(idle[2]) / len(idle[2]),
               "shards_stage_idle_share_max": max(idle[2])}
    print(f"  shards: {rates[1]:.3f} -> {rates[2]:.3f} sequences/s (1 -> 2 stages); stages idle "
          f"{', '.join(f'{share:.0%}' for share in idle[2])} of their time")
    return figures, details


def cleanup(bench) -> None:
    import shutil

    fx = getattr(bench, "pipeline", None)
    if fx is None:
        return
    if fx.started_ray:
        import ray

        ray.shutdown()
    shutil.rmtree(fx.root, ignore_errors=True)
    bench.pipeline = None

