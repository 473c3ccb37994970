"""`whence bench --only scale`: `whence score` at scale on a multi-node Ray cluster, against itself.

On a local cluster of ScaleSettings.nodes nodes (ray.cluster_utils.Cluster: a head and workers on this machine,
`node_cpus` CPUs and `node_store_bytes` of object store each) and a generated corpus of `sequences` short
documents (one sequence of at most `seq_len` tokens each), scored by a tiny random Llama with the real
flows.score.score_corpus in this process (--tfidf-candidates 0, `workers` scoring actors):

    driver   bytes the driver receives per sequence, and its CPU seconds per 1,000 sequences during the scoring
             pass, when the scorers send their batches' per-query top-k (the default) over when they send every
             score (--top-k all); 1x corpus
    read     sequences per second of the scan pass (read, validate, tokenise, count: every row) over the 4x
             corpus as one uncompressed .jsonl file, read as byte-range fragments, over the same rows as one
             .jsonl.gz (gzip cannot be split: one fragment)
    memory   the driver's peak resident memory (the kernel's high-water mark, reset before each run) and the
             largest scoring actor's (sampled), on the corpus 4x over 1x (top-k runs)

What the driver receives is observed, not changed: while a run is measured, flows.score_pass's scoring pass and the
dataset it iterates are wrapped (DriverObserver) to count the batches' bytes (flows.bench.reduce.batch_bytes, the
in-process measurement's count) and the driver's CPU time; the counting's own CPU and the memory sampler's are
taken out of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

log = logging.getLogger("whence.bench")

MIB = 2**20


@dataclass(frozen=True)
class ScaleSettings:
    """The cluster, corpus and model of the scale measurement (the same for every --config: a tiny model)."""

    sequences: int = 200_000  # documents in the 1x corpus, one sequence each
    nodes: int = 3  # Ray nodes: a head and nodes - 1 workers
    node_cpus: int = 2  # logical CPUs of a node (this machine's two cores are shared by all of them)
    node_store_bytes: int = 200 * MIB  # object store per node
    workers: int = 2  # scoring actors (a CPU each; Ray Data spreads them over the nodes)
    seq_len: int = 24  # tokens per sequence; documents are shorter, so each is one sequence
    words: tuple[int, int] = (2, 6)  # words per document, uniform in [low, high): 3 to 18 tokens, 7 the median
    top_k: int = 10
    query_rank: int = 8
    batch_size: int = 256  # sequences per forward and backward pass
    read_repeats: int = 2  # scan passes per layout, interleaved, best of
    fragment_bytes: int | None = None  # byte-range fragments of the read measurement (None: whence's own size)
    vocab: int = 600  # the tokenizer's (the LM head and its log-softmax are most of a tiny model's work)
    hidden: int = 32  # the model: one Llama block
    intermediate: int = 64
    seed: int = 0


@dataclass
class ScaleFixture:
    """The files of one scale measurement, made in a temporary directory, and its score runs' results."""

    root: Path
    settings: ScaleSettings
    model_dir: Path
    factors_dir: Path
    queries_path: Path
    corpora: dict[str, Path]  # "1x", "4x", "4x_gz" -> corpus file
    runs: dict[str, dict] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# the corpus, the model and the cluster


def corpus_words(documents: int = 200, count: int = 100) -> list[str]:
    """The `count` most frequent lower-case words of the demo corpus's first `documents` documents, sorted: the
    generator's vocabulary. The tokenizer is trained on the same documents, so most of them are one token."""
    from collections import Counter

    from flows.bench.fixtures import demo_corpus, iter_documents

    words = (w.strip(".,;:!?\"'()").lower() for _, text in iter_documents(demo_corpus(), limit=documents)
             for w in text.split())
    return sorted(w for w, _ in Counter(w for w in words if w.isalpha()).most_common(count))


def generated_texts(count: int, words: tuple[int, int], seed: int) -> list[str]:
    """`count` documents of random words (uniformly `words[0]` to `words[1] - 1` of them), deterministic in `seed`."""
    import numpy as np

    vocabulary = np.asarray(corpus_words(), dtype=object)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(words[0], words[1], size=count)  # (count,)
    picks = rng.integers(0, len(vocabulary), size=(count, words[1]))  # (count, max words)
    return [" ".join(vocabulary[row[:n]]).capitalize() + "." for row, n in zip(picks, lengths)]


def write_corpus(path: Path, texts: list[str], copies: int = 1) -> Path:
    """One JSON-lines file (gzipped when `path` ends in .gz) of `texts`, `copies` times (copy k's ids end in #k)."""
    import gzip

    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8", compresslevel=1)) if path.suffix == ".gz" else \
        (lambda p: open(p, "w", encoding="utf-8"))
    with opener(path) as handle:
        for copy in range(copies):
            suffix = f"#{copy}" if copies > 1 else ""
            handle.writelines(json.dumps({"id": f"s{i:07d}{suffix}", "text": text}) + "\n"
                              for i, text in enumerate(texts))
    return path


def scale_model(settings: ScaleSettings, vocab: int):
    """A random one-block Llama: the bench's builder with the scale shape (context 64: room for the queries)."""
    import torch

    from flows.bench.configs import CONFIGS
    from flows.bench.fixtures import build_model

    shape = replace(CONFIGS["tiny"], hidden=settings.hidden, intermediate=settings.intermediate, blocks=1, heads=2,
                    vocab=vocab, seq_len=64, batch_size=8, fit_batches=2)
    return shape, build_model(shape, torch.device("cpu"), torch.float32, seed=settings.seed)


def save_model_and_factors(root: Path, settings: ScaleSettings) -> tuple[Path, Path]:
    """The model and tokenizer as a checkpoint directory, and EK-FAC factors of its MLP fitted on random batches,
    saved as `whence fit` writes them (fitted with seq_len = settings.seq_len)."""
    from flows.bench.fixtures import TOKENIZER_DOCUMENTS, demo_corpus, iter_documents, random_batches
    from whence.fitting import fit_factors
    from whence.model import find_tracked_layers, model_fingerprint
    from whence.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer((t for _, t in iter_documents(demo_corpus(), limit=TOKENIZER_DOCUMENTS)),
                                    settings.vocab)
    shape, model = scale_model(settings, len(tokenizer))
    model_dir, factors_dir = root / "model", root / "factors"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    batches = random_batches(shape, shape.fit_batches, model.device, seed=settings.seed)
    factors = fit_factors(model, find_tracked_layers(model, "mlp"), lambda: iter(batches))
    factors.metadata.update({"model_fingerprint": model_fingerprint(model), "model": str(model_dir),
                             "arguments": {"seq_len": settings.seq_len, "modules": "mlp", "strategy": "ekfac"}})
    factors.save(factors_dir, {"command": "fit"})
    return model_dir, factors_dir


def write_queries(path: Path) -> Path:
    from flows.bench.configs import QUERIES

    path.write_text("".join(json.dumps({"id": q.id, "prompt": q.prompt, "completion": q.completion}) + "\n"
                            for q in QUERIES))
    return path


@contextmanager
def multi_node_ray(settings: ScaleSettings):
    """A local Ray cluster of `settings.nodes` nodes (ray.cluster_utils.Cluster), this process connected to it as
    the driver (flows.cluster.connect); every node on 127.0.0.1 and without a dashboard. Stopped afterwards. A
    Ray this process was already connected to (an earlier measurement's) is shut down first: a driver joins one
    cluster at a time."""
    import ray
    from ray.cluster_utils import Cluster

    from flows.cluster import connect, local_only_node

    if ray.is_initialized():
        log.info("scale: leaving the Ray this process had joined, for a %d-node cluster", settings.nodes)
        ray.shutdown()
    node = {"num_cpus": settings.node_cpus, "object_store_memory": settings.node_store_bytes}
    with local_only_node(True):
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        try:
            for _ in range(settings.nodes - 1):
                cluster.add_node(**node)
            cluster.wait_for_nodes()
            connect(cluster.address)
        except BaseException:
            cluster.shutdown()
            raise
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextmanager
def scan_cache_in(directory: Path):
    """WHENCE_CACHE pointed at `directory` (the runs on one corpus share its scan; the user's cache is untouched)."""
    from flows.scan_cache import CACHE_ENV

    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(directory)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = saved


def make_fixture(root: Path, settings: ScaleSettings) -> ScaleFixture:
    """The model, factors, queries and the corpus files (1x and 4x, each as .jsonl and as .jsonl.gz) under `root`."""
    model_dir, factors_dir = save_model_and_factors(root, settings)
    texts = generated_texts(settings.sequences, settings.words, settings.seed)
    corpora = {"1x": write_corpus(root / "corpus-1x.jsonl", texts),
               "4x": write_corpus(root / "corpus-4x.jsonl", texts, copies=4),
               "4x_gz": write_corpus(root / "corpus-4x.jsonl.gz", texts, copies=4)}
    return ScaleFixture(root, settings, model_dir, factors_dir, write_queries(root / "queries.jsonl"), corpora)


# ---------------------------------------------------------------------------------------------------------
# observing the driver


class MemorySampler:
    """Samples, every `interval` seconds on a thread of this process, the resident memory of the scoring actors
    (processes below this one whose title names SequenceScorer) started while it runs (an earlier run's, still
    exiting, are left out): the peak of each. The thread's own CPU seconds are kept (cpu_s), to be taken out of
    the driver's."""

    ACTOR_TITLE = "SequenceScorer"

    def __init__(self, interval: float = 0.2):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.actor_peaks: dict[int, int] = {}  # pid -> peak resident bytes
        self.earlier: set[int] = set()  # scoring actors already there when sampling began
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def actors(self):
        """The scoring actors' processes now."""
        import psutil

        for child in self.process.children(recursive=True):
            try:
                if self.ACTOR_TITLE in " ".join(child.cmdline()):
                    yield child
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def sample(self) -> None:
        import psutil

        for actor in self.actors():
            if actor.pid in self.earlier:
                continue
            try:
                self.actor_peaks[actor.pid] = max(self.actor_peaks.get(actor.pid, 0), actor.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def _run(self) -> None:
        tick = time.thread_time()
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
        self.cpu_s = time.thread_time() - tick

    def __enter__(self) -> MemorySampler:
        self.earlier = {actor.pid for actor in self.actors()}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class CountedDataset:
    """A Ray Dataset whose iter_batches also counts what it hands the driver: batches, bytes, and the CPU seconds
    the counting took (this thread's), so that they can be taken out of the driver's."""

    def __init__(self, dataset, observer: DriverObserver):
        self.dataset, self.observer = dataset, observer

    def iter_batches(self, **options):
        from flows.bench.reduce import batch_bytes

        for batch in self.dataset.iter_batches(**options):
            tick = time.thread_time()
            self.observer.bytes += batch_bytes(batch)
            self.observer.batches += 1
            self.observer.counting_cpu_s += time.thread_time() - tick
            yield batch

    def __getattr__(self, name):
        return getattr(self.dataset, name)


@dataclass
class DriverObserver:
    """While installed (`with observer:`), the scoring pass (flows.score_pass.score_fragments) is timed in this
    process's CPU seconds and the dataset it iterates (scoring_dataset) is a CountedDataset. flows.score_pass
    itself is not changed; the originals are put back on exit."""

    bytes: int = 0
    batches: int = 0
    counting_cpu_s: float = 0.0
    pass_cpu_s: float = 0.0  # process CPU seconds inside the scoring passes, counting and sampling included
    pass_s: float = 0.0  # their wall seconds
    _saved: dict = field(default_factory=dict)

    def __enter__(self) -> DriverObserver:
        import flows.score_pass as score

        self._saved = {"score_fragments": score.score_fragments, "scoring_dataset": score.scoring_dataset}
        original_pass, original_dataset = self._saved["score_fragments"], self._saved["scoring_dataset"]

        def timed_pass(*args, **kwargs):
            cpu, wall = time.process_time(), time.monotonic()
            try:
                return original_pass(*args, **kwargs)
            finally:
                self.pass_cpu_s += time.process_time() - cpu
                self.pass_s += time.monotonic() - wall

        def counted_dataset(*args, **kwargs):
            return CountedDataset(original_dataset(*args, **kwargs), self)

        score.score_fragments, score.scoring_dataset = timed_pass, counted_dataset
        return self

    def __exit__(self, *exc) -> None:
        import flows.score_pass as score

        for name, value in self._saved.items():
            setattr(score, name, value)


# ---------------------------------------------------------------------------------------------------------
# the runs


# name -> (corpus, every score). Every score reaches the driver with --top-k all (the top-k is then every score);
# with --save-all-scores the scorers write every score themselves and send their top-k like the default.
SCORE_RUNS = {"1x_topk": ("1x", False), "4x_topk": ("4x", False), "1x_all": ("1x", True)}


def run_score(fx: ScaleFixture, name: str) -> dict:
    """score_corpus run `name` of SCORE_RUNS, observed: its summary with the driver's bytes, CPU and peak memory
    and the scoring actors' peaks. Cached by name."""
    if name in fx.runs:
        return fx.runs[name]
    import gc

    import psutil

    from actors.owner import peak_rss, release_free_memory, reset_peak_rss
    from flows.cluster import ClusterSettings
    from flows.score import score_corpus
    from whence.config import ScoreConfig

    corpus, every_score = SCORE_RUNS[name]
    s = fx.settings
    config = ScoreConfig(top_k=None if every_score else s.top_k, tfidf_candidates=0, query_rank=s.query_rank,
                         batch_size=s.batch_size)
    gc.collect()
    release_free_memory()  # the C allocator's free pages back: an earlier run's memory counts less in this one
    reset_peak_rss()
    start_rss = psutil.Process().memory_info().rss
    with DriverObserver() as observer, MemorySampler() as sampler:
        summary = score_corpus(str(fx.model_dir), str(fx.factors_dir), str(fx.queries_path), [str(fx.corpora[corpus])],
                               str(fx.root / f"results-{name}"), config, cluster=ClusterSettings(workers=s.workers),
                               overwrite=True)
    sequences = summary["sequences_scored"]
    driver_cpu = observer.pass_cpu_s - observer.counting_cpu_s - sampler.cpu_s
    run = {"sequences": sequences, "fragments": summary["fragments"], "seconds": summary["seconds"],
           "score_s": observer.pass_s, "batches": observer.batches, "bytes": observer.bytes,
           "bytes_per_sequence": observer.bytes / sequences, "driver_cpu_s": driver_cpu,
           "driver_cpu_s_per_1000": driver_cpu / sequences * 1000, "counting_cpu_s": observer.counting_cpu_s,
           "sampler_cpu_s": sampler.cpu_s, "driver_start_rss": start_rss, "driver_peak_rss": peak_rss(),
           "actor_peak_rss": sorted(sampler.actor_peaks.values(), reverse=True)}
    log.debug("scale run %s: %s", name, run)
    shutil.rmtree(fx.root / f"results-{name}", ignore_errors=True)
    fx.runs[name] = run
    return run


def scan_seconds(fx: ScaleFixture, path: Path) -> tuple[float, int, int]:
    """(seconds, sequences, fragments) of one scan pass (flows.corpus_pipeline.run_scan, on the cluster, not
    cached) over the corpus file at `path`, tokenised with the fixture's tokenizer."""
    from flows.corpus_pipeline import ReadSettings, run_scan
    from whence.corpus import FRAGMENT_BYTES, list_fragments

    fragments = list_fragments([str(path)], fx.settings.fragment_bytes or FRAGMENT_BYTES)
    read = ReadSettings(str(fx.model_dir), fx.settings.seq_len)
    tick = time.monotonic()
    scans = run_scan(fragments, read)
    seconds = time.monotonic() - tick
    return seconds, sum(int(scan["sequence_counts"].sum()) for scan in scans), len(fragments)


def read_throughput(fx: ScaleFixture) -> dict:
    """Best-of-repeats sequences per second of the scan pass over the 4x corpus (enough rows for several
    fragments), per layout ("one_file": the .jsonl.gz, "fragments": the .jsonl), repeats interleaved."""
    best = {}
    for _ in range(fx.settings.read_repeats):
        for layout, corpus in (("one_file", "4x_gz"), ("fragments", "4x")):
            seconds, sequences, fragments = scan_seconds(fx, fx.corpora[corpus])
            if layout not in best or seconds < best[layout]["seconds"]:
                best[layout] = {"seconds": seconds, "sequences": sequences, "fragments": fragments,
                                "sequences_per_s": sequences / seconds}
    return best


# ---------------------------------------------------------------------------------------------------------
# the figures


def driver_figures(fx: ScaleFixture) -> tuple[dict, dict]:
    """Bytes a sequence and driver CPU seconds per 1,000 sequences, top-k over every score (1x corpus)."""
    cut, every = run_score(fx, "1x_topk"), run_score(fx, "1x_all")
    figures = {"scale_driver_bytes_topk_vs_all": cut["bytes_per_sequence"] / every["bytes_per_sequence"],
               "scale_driver_cpu_topk_vs_all": cut["driver_cpu_s_per_1000"] / every["driver_cpu_s_per_1000"]}
    print(f"  driver: {every['bytes_per_sequence']:,.4g} -> {cut['bytes_per_sequence']:,.4g} bytes a sequence, "
          f"{every['driver_cpu_s_per_1000']:.3f} -> {cut['driver_cpu_s_per_1000']:.3f} CPU s per 1,000 sequences "
          f"(every score -> top {fx.settings.top_k}; {cut['sequences']:,} sequences)", flush=True)
    return figures, {"all": every, "topk": cut}


def read_figures(fx: ScaleFixture) -> tuple[dict, dict]:
    """The scan's sequences per second, the .jsonl's byte-range fragments over the one .jsonl.gz (4x corpus)."""
    best = read_throughput(fx)
    one, many = best["one_file"], best["fragments"]
    print(f"  read: {one['sequences_per_s']:,.0f} sequences/s from one .jsonl.gz, {many['sequences_per_s']:,.0f} "
          f"from the .jsonl in {many['fragments']} fragments", flush=True)
    return {"scale_read_fragments_vs_one_file": many["sequences_per_s"] / one["sequences_per_s"]}, best


def memory_figures(fx: ScaleFixture) -> tuple[dict, dict]:
    """The driver's and the largest scoring actor's peak resident memory, 4x corpus over 1x (top-k runs)."""
    runs = {"1x": run_score(fx, "1x_topk"), "4x": run_score(fx, "4x_topk")}
    actor = {size: max(run["actor_peak_rss"], default=0) for size, run in runs.items()}
    figures = {"scale_driver_peak_memory_4x_vs_1x": runs["4x"]["driver_peak_rss"] / runs["1x"]["driver_peak_rss"],
               "scale_actor_peak_memory_4x_vs_1x": actor["4x"] / max(actor["1x"], 1)}
    print(f"  memory: driver {runs['1x']['driver_peak_rss'] / MIB:.0f} -> {runs['4x']['driver_peak_rss'] / MIB:.0f} "
          f"MiB, largest scoring actor {actor['1x'] / MIB:.0f} -> {actor['4x'] / MIB:.0f} MiB; "
          f"{runs['1x']['sequences']:,} -> {runs['4x']['sequences']:,} sequences", flush=True)
    keys = ("sequences", "driver_start_rss", "driver_peak_rss", "actor_peak_rss", "seconds")
    details = {size: {key: run[key] for key in keys}
               for size, run in runs.items()}
    return figures, details


def scale_costs(settings: ScaleSettings = ScaleSettings()) -> tuple[dict, dict]:  # noqa: B008 (frozen)
    """(figures, details) of the scale measurement: one cluster and one corpus for all of them."""
    root = Path(tempfile.mkdtemp(prefix="whence-bench-scale-"))
    figures, details = {}, {"settings": asdict(settings)}
    try:
        tick = time.monotonic()
        fx = make_fixture(root, settings)
        details["fixture_s"] = time.monotonic() - tick
        with multi_node_ray(settings) as cluster, scan_cache_in(root / "cache"):
            details["nodes"] = len(cluster.list_all_nodes())
            print(f"  {details['nodes']} Ray nodes of {settings.node_cpus} CPUs, {settings.workers} scoring actors; "
                  f"{settings.sequences:,} documents of {settings.words[0]}-{settings.words[1] - 1} words (1x), "
                  f"sequences of <= {settings.seq_len} tokens; a one-block Llama of width {settings.hidden}, "
                  f"vocab {settings.vocab}", flush=True)
            # The --top-k all run last: what the driver frees after it stays resident, and would count in the next.
            for name, measure in (("read", read_figures), ("memory", memory_figures), ("driver", driver_figures)):
                found, details[name] = measure(fx)
                figures.update(found)
        details["corpus_bytes"] = {name: path.stat().st_size for name, path in fx.corpora.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures, details
