"""`whence bench` measurements 5-7: the Ray scoring pipeline (flows.score.score_corpus) against itself.

    5. pipeline overhead   seconds per sequence of score_corpus's scoring stage (and of the whole command) over
                           seconds per sequence of QueryScorer in this process, same model, queries, sequences
                           and torch threads as one scoring actor
    6. peak memory         peak resident memory of the run (this process and every process it started: Ray's
                           raylet and workers), above the level before the run, on the corpus 4x over 1x
    7. workers             scoring-stage throughput with 2 workers over 1 worker

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


def pipeline_overhead(bench) -> tuple[dict, dict]:
    """Seconds per sequence of the pipeline over the in-process scorer's: the scoring stage on the 1x and the 4x
    corpus (which spreads the actor's start-up over four times the sequences) and the whole 1x run."""
    from flows.cluster import actor_resources, torch_threads

    one, four = run_score(bench, "1x_1w", 1, 1), run_score(bench, "4x_1w", 4, 1)
    threads = torch_threads(actor_resources(1).get("num_cpus", 1))  # as a lone scoring actor gets
    seconds, count = in_process_seconds(bench, threads)
    reference = seconds / count
    def per_sequence(run: dict, seconds: float) -> float:
        return seconds / max(run["sequences_scored"], 1) / reference

    figures = {"pipeline_scoring_stage_vs_in_process": per_sequence(one, one["timings"]["score_s"]),
               "pipeline_scoring_stage_4x_vs_in_process": per_sequence(four, four["timings"]["score_s"]),
               "pipeline_whole_run_vs_in_process": per_sequence(one, one["seconds"])}
    details = {"sequences": {"1x": one["sequences_scored"], "4x": four["sequences_scored"]},
               "in_process_sequences": count, "in_process_s": seconds, "threads": threads,
               "timings": {"1x": one["timings"], "4x": four["timings"]}, "run_s": one["seconds"]}
    print(f"  pipeline: scoring stage {figures['pipeline_scoring_stage_vs_in_process']:.2f}x (1x corpus), "
          f"{figures['pipeline_scoring_stage_4x_vs_in_process']:.2f}x (4x), whole run "
          f"{figures['pipeline_whole_run_vs_in_process']:.2f}x the in-process seconds per sequence "
          f"({threads} thread(s) per actor and in process)")
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
    one, two = run_score(bench, "1x_1w", 1, 1), run_score(bench, "1x_2w", 1, 2)
    rate = {name: run["sequences_scored"] / run["timings"]["score_s"] for name, run in (("1", one), ("2", two))}
    figures = {"score_throughput_2_workers_vs_1": rate["2"] / rate["1"]}
    details = {"sequences_per_s": rate, "score_s": {"1": one["timings"]["score_s"], "2": two["timings"]["score_s"]}}
    print(f"  workers: {rate['1']:.2f} -> {rate['2']:.2f} sequences/s (1 -> 2 workers)")
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

