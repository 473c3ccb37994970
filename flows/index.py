"""`whence index`: store every corpus sequence's gradient once, compressed, so `whence query` answers new
queries by matrix products (whence.index).

    projections  made on the driver from the factors (whence.index.projection) and saved in INDEX_DIR
    scan         bad rows and duplicates, as `whence score` finds them (flows.scan_cache), so the index holds
                 exactly the sequences `whence score --tfidf-candidates 0` scores
    index        Ray Data streams the pending fragments (one row each) through FragmentIndexer actors; each
                 reads its fragment, compresses its sequences' gradients and writes the fragment's shard in
                 parts of at most --part-size sequences as they fill (whence.index.shards), then its record
    manifest     model and factors fingerprints, projection kind, seed and dimensions, the layers' blocks
Finished shards (verified against their checksums) survive an interruption, and so do the finished parts of an
unfinished fragment; rerunning with the same arguments indexes only the rest, and other arguments are refused
unless --overwrite (flows.run_state). Pipeline-sharded models (--shards N > 1) are refused: each worker holds a
whole model replica.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass

from flows.cluster import ClusterSettings, surface_user_errors
from flows.options import add_model_and_corpus, positive_int
from whence.index.config import IndexConfig
from whence.index.projection import KINDS
from whence.settings import help_for

log = logging.getLogger("whence.index")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_corpus(parser)
    # --dtype here is the index's storage dtype (the contract), so the model's precision moves to --model-dtype:
    # a group made after switching the parser to "resolve" replaces add_model_and_corpus's --dtype.
    parser.conflict_handler = "resolve"
    index = parser.add_argument_group("index")
    index.add_argument("--dtype", default=IndexConfig.dtype, choices=["float16", "bfloat16", "float32"],
                       help=help_for(IndexConfig, "dtype"))
    index.add_argument("--model-dtype", default="auto", choices=["auto", "float32", "float64", "bfloat16"],
                       help="model precision: auto = bfloat16 on GPU, float32 on CPU")
    index.add_argument("--factors", required=True, metavar="DIR", help="factors directory written by `whence fit`")
    index.add_argument("--dim", type=positive_int, default=IndexConfig.dim, metavar="K",
                       help=help_for(IndexConfig, "dim"))
    index.add_argument("--projection", default=IndexConfig.projection, choices=list(KINDS),
                       help=help_for(IndexConfig, "projection"))
    index.add_argument("--seed", type=int, default=0, help=help_for(IndexConfig, "seed"))
    index.add_argument("--seq-len", type=positive_int, default=None, help=help_for(IndexConfig, "seq_len"))
    index.add_argument("--part-size", type=positive_int, default=None, metavar="N",
                       help=help_for(IndexConfig, "part_size"))


def run(args: argparse.Namespace) -> int:
    from flows.options import corpus_from_args, settings_from_args
    from whence.errors import SettingsError
    from whence.redact import redact_uri

    if args.shards > 1:
        raise SettingsError("--shards: `whence index` runs whole model replicas (--workers N); pipeline-sharded "
                            "indexing is not supported", "shards")
    cluster = ClusterSettings(workers=args.workers, dtype=args.model_dtype, address=args.address)
    summary = build_index(args.model, args.factors, corpus_from_args(args), args.out,
                          settings_from_args(IndexConfig, args), cluster, overwrite=args.overwrite)
    print(f"indexed {summary['sequences']:,} sequences ({summary['bytes_per_sequence']:,} bytes each, "
          f"{summary['bad_rows']} bad rows skipped) in {summary['seconds']:.1f}s; index in {redact_uri(str(args.out))}")
    return 0


@dataclass(frozen=True)
class FragmentReader:
    """Fragment index -> its training sequences, as every pass of `whence score` reads them (a picklable callable
    handed to the actors, which do not import flows)."""

    fragments: dict  # index -> whence.corpus.Fragment
    settings: object  # flows.corpus_pipeline.ReadSettings
    skip: dict  # fragment -> lines to skip (duplicates)

    def __call__(self, fragment: int):
        from flows.corpus_pipeline import fragment_sequences

        return fragment_sequences(self.fragments[fragment], self.settings, self.skip.get(fragment, frozenset()))


@surface_user_errors
def build_index(model: str, factors_dir: str, corpus, out: str, config: IndexConfig = IndexConfig(),  # noqa: B008
                cluster: ClusterSettings = ClusterSettings(), overwrite: bool = False) -> dict:  # noqa: B008
    """Build (or resume) the index at `out`; returns the summary also stored in its manifest.json."""
    from flows.cluster import connect
    from flows.corpus_pipeline import ReadSettings
    from flows.run_state import RunDirectory
    from flows.score import _factors_manifest
    from whence.corpus import CorpusSource, list_fragments
    from whence.fingerprints import corpus_fingerprint, factors_fingerprint
    from whence.index.shards import finished_shards, fragment_parts, part_rows
    from whence.model import check_finite_checkpoint, check_model_source
    from whence.redact import redact_uri
    from whence.text import check_window

    model_config, _ = check_model_source(model)
    check_finite_checkpoint(model)
    started = time.monotonic()
    # Local paths are recorded absolute: `whence query` and Index.open read them from any directory.
    model, factors_dir = _absolute(model), _absolute(factors_dir)
    corpus = CorpusSource.of(corpus)
    corpus = dataclasses.replace(corpus, paths=tuple(_absolute(p) for p in corpus.paths))
    factors_manifest = _factors_manifest(factors_dir)
    fitted = factors_manifest.get("arguments", {})
    seq_len = config.seq_len or fitted.get("seq_len", 512)
    check_window(model_config, seq_len, model)
    fragments = list_fragments(list(corpus.paths))
    arguments = {"model": model, "factors": redact_uri(str(factors_dir)), **corpus.to_arguments(),
                 "model_dtype": cluster.dtype,
                 **config.to_dict(), "seq_len": seq_len, "modules": fitted.get("modules", "mlp"),
                 "factors_fingerprint": factors_fingerprint(factors_dir),
                 "corpus_fingerprint": corpus_fingerprint([f.path for f in fragments])}
    state = RunDirectory(out, "index", arguments)
    if state.reuse_or_open(overwrite):
        return state.saved_summary()
    projections = _projections(state, factors_dir, config)
    connect(cluster.address)
    settings = ReadSettings.for_corpus(model, seq_len, corpus)
    tally, skip, counts = _scan(fragments, settings)
    # Verified once (a checksum read of every finished shard): both the room check and the build use it.
    done = finished_shards(state.location, [f.index for f in fragments])
    _check_room(state, projections, config, counts, done)
    rows_per_part = part_rows(projections.width, config.dtype, config.part_size)
    built = _index_fragments(state, fragments, FragmentReader({f.index: f for f in fragments}, settings, skip),
                             factors_manifest, cluster, done, rows_per_part)
    # The records say each fragment's parts (the fragments done before were verified above, the others were
    # written just now): reading them is enough, no second checksum pass over the shards.
    parts = {f.index: found for f in fragments if (found := fragment_parts(state.location, f.index)) is not None}
    summary = _summary(fragments, projections, config, tally, started, built, parts)
    state.write_json("manifest.json", _manifest(state, factors_manifest, projections, summary, parts, rows_per_part))
    state.finish(summary)
    return summary


def _absolute(path: str) -> str:
    """An existing local path made absolute; a hub id or a URI as given."""
    from pathlib import Path

    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _projections(state, factors_dir: str, config: IndexConfig):
    """The index's projections: made once from the factors and saved (a resume reads them back)."""
    from whence.factors import Factors
    from whence.index.projection import PROJECTIONS_FILE, Projections, build_projections

    path = state.location / PROJECTIONS_FILE
    if path.is_file():
        return Projections.load(path)
    projections = build_projections(Factors.load(factors_dir), config.projection, config.dim, config.seed)
    projections.save(path)
    return projections


def _scan(fragments, settings):
    """(tally, duplicate lines per fragment) as `whence score` finds them; CorpusError on an empty corpus."""
    from flows.corpus_pipeline import reduce_scans
    from flows.scan_cache import cached_scan
    from whence.errors import CorpusError

    scans, _ = cached_scan(fragments, settings, 0)
    tally, skip, counts, _ = reduce_scans(scans)
    if sum(counts.values()) == 0:
        raise CorpusError(f"no sequences to index in {len(fragments)} fragments ({tally.total_bad} bad rows)")
    return tally, skip, counts


def _check_room(state, projections, config: IndexConfig, counts: dict[int, int], done: dict) -> None:
    """Log the index's size (sequences x bytes a row) before any work, and refuse with the options that would
    fit when a local output directory has less room than the fragments still to index (not in `done`) need."""
    import shutil

    from whence.errors import SettingsError
    from whence.index.shards import STORAGE_DTYPES

    row = projections.width * STORAGE_DTYPES[config.dtype].itemsize
    total = sum(counts.values()) * row
    needed = sum(n for fragment, n in counts.items() if fragment not in done) * row
    log.info("index: %d sequences x %s bytes = %.2f GiB (%s, dim %d, %s)", sum(counts.values()), f"{row:,}",
             total / 2**30, projections.kind, projections.dim, config.dtype)
    if not state.location.is_local:
        return
    free = shutil.disk_usage(state.location.local).free
    if needed > free:
        raise SettingsError(f"{state.location}: the index needs {needed / 2**30:.2f} GiB more ({row:,} bytes a "
                            f"sequence) and the disk has {free / 2**30:.2f} GiB free; choose a smaller --dim, "
                            "--projection eigen (K*K values a layer), or another --out", "out")


def _index_fragments(state, fragments, reader: FragmentReader, factors_manifest: dict,
                     cluster: ClusterSettings, done: dict, rows_per_part: int) -> dict:
    """Stream the fragments without a verified shard (those not in `done`, whence.index.shards.finished_shards)
    through the indexer actors. Returns {"sequences", "tokens", "indexed_s"} of the fragments indexed now."""
    import ray.data

    from actors.hosting import ModelSpec
    from actors.indexer import FragmentIndexer
    from flows.cluster import actor_resources, torch_threads
    from whence.index.projection import PROJECTIONS_FILE

    pending = [f.index for f in fragments if f.index not in done]
    built = {"sequences": 0, "tokens": 0, "indexed_s": 0.0}
    if done:
        log.info("resuming: %d of %d fragments already indexed", len(done), len(fragments))
    if not pending:
        return built
    arguments = state.arguments
    resources = actor_resources(cluster.workers)
    constructor = {"spec": ModelSpec(arguments["model"], arguments["modules"], cluster.dtype),
                   "projections_path": state.location / PROJECTIONS_FILE, "factors_manifest": factors_manifest,
                   "read_fragment": reader, "index_dir": state.location, "rows_per_part": rows_per_part,
                   "storage_dtype": arguments["dtype"],
                   "batch_size": arguments["batch_size"], "num_threads": torch_threads(resources.get("num_cpus", 1))}
    dataset = ray.data.from_items([{"fragment": index} for index in pending], override_num_blocks=len(pending))
    tick = time.monotonic()
    # One fragment per call: a fragment is a unit of work and of resuming; the actor pool restarts a dead actor
    # and reruns its fragment (Ray Data's defaults), whose shard is then written again, whole.
    for row in dataset.map_batches(FragmentIndexer, batch_size=1, fn_constructor_kwargs=constructor,
                                   compute=ray.data.ActorPoolStrategy(size=cluster.workers),
                                   runtime_env={"env_vars": cluster.actor_env} if cluster.actor_env else None,
                                   **resources).iter_rows():
        built["sequences"] += int(row["sequences"])
        built["tokens"] += int(row["tokens"])
        log.info("fragment %d: %d sequences in %.1fs", int(row["fragment"]), int(row["sequences"]),
                 float(row["seconds"]))
    built["indexed_s"] = time.monotonic() - tick
    return built


def _summary(fragments, projections, config: IndexConfig, tally, started: float, built: dict, parts: dict) -> dict:
    from whence.errors import WhenceError
    from whence.index.shards import STORAGE_DTYPES

    missing = [f.index for f in fragments if f.index not in parts]
    if missing:  # every actor returned, so a fragment without a verified shard is a fault, not a resume
        raise WhenceError(f"fragments {missing[:8]} have no complete shard after indexing; rerun the same command")
    sequences = sum(rows for f in fragments for _, rows in parts[f.index])
    item = STORAGE_DTYPES[config.dtype].itemsize
    return {"sequences": sequences, "fragments": len(fragments), "documents": tally.documents,
            "bad_rows": tally.total_bad, "bytes_per_sequence": projections.width * item,
            "index_bytes": sequences * projections.width * item, "sequences_indexed_now": built["sequences"],
            "tokens_indexed_now": built["tokens"], "indexed_s": built["indexed_s"],
            "seconds": time.monotonic() - started}


def _manifest(state, factors_manifest: dict, projections, summary: dict, parts: dict, rows_per_part: int) -> dict:
    from flows.provenance import versions
    from flows.score_checks import fisher_sequences
    from whence.results import FISHER_SEQUENCES

    arguments = state.arguments
    # The factors' model fingerprint is the model's: every indexer actor checked they are equal before indexing.
    fingerprint = factors_manifest.get("model_fingerprint")
    layers, offsets = [], projections.offsets
    for layer, described, start in zip(projections.layers, factors_manifest["layers"], offsets):
        layers.append({"name": layer.name, "d_out": described["d_out"], "d_in": described["d_in"],
                       "k_out": layer.k_out, "k_in": layer.k_in, "rank": layer.rank, "offset": start})
    return {
        "command": "index", "arguments": arguments, "layers": layers, "width": projections.width,
        "projection": {"kind": projections.kind, "dim": projections.dim, "seed": projections.seed},
        "dtype": arguments["dtype"], "part_size": rows_per_part,
        # fragment -> [[part file, rows], ...]: what `whence query` reads, without listing the directory
        "shards": {str(fragment): [list(part) for part in parts[fragment]] for fragment in sorted(parts)},
        "model": {"path": arguments["model"], "fingerprint": fingerprint},
        "factors": {"path": arguments["factors"], "fingerprint": arguments["factors_fingerprint"],
                    "strategy": factors_manifest.get("strategy")},
        FISHER_SEQUENCES: fisher_sequences(factors_manifest), "summary": summary, "versions": versions(),
    }
