"""Answering queries from an index: prepare the queries in the compressed space, then one matrix product per
layer and shard.

For queries Q and a shard of N sequences, layer l's scores are
    S_l = G~[:, block_l] @ X~[:, block_l]^T        (N, w_l) x (w_l, Q) -> (N, Q),   w_l = k_out * k_in
with G~ the stored rows and X~ the prepared query rows (whence.index.projection; for the lowrank kind the
stored rank-r factors meet the queries' rank-s factors, or each stored block is expanded to its (d_out, d_in)
rank-r gradient with whole queries, whence.index.projection.BlockLayout); the total is their sum over layers,
so per-layer scores sum to the total as in `whence score`. Shard rows are widened from their storage dtype to
the search's dtype ROW_BLOCK rows and one layer at a time (RowWidener; search_dtype: float32, float64 when the
query rows are float64 as in the tests, or bfloat16 with "auto" on hardware that has it), and the per-layer
scores are accumulated in float64. Shards are scored on the process's GPU when it has one
(search_device; `whence query` reserves a GPU share for each search task on a cluster with GPUs).

`Index.open(path)` loads the model and factors the index was built with (or others given, which must be the
same: their fingerprints are checked against the manifest) once; `Index.query(queries, top_k=10)` returns a
whence.api.ScoreTable as `whence.score` does, and can be called in a loop (shards stay loaded).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from whence.errors import FactorsMismatchError, SettingsError, WhenceError
from whence.index.projection import PROJECTIONS_FILE, BlockLayout, Projections
from whence.index.shards import IndexPart, Shard, index_parts, read_shard
from whence.queries import DEFAULT_QUERY_RANK, parse_rank
from whence.storage import Location
from whence.topk import TopK

MANIFEST_FILE = "manifest.json"
ROW_BLOCK = 4096  # shard rows widened to the compute dtype at a time, one layer block at a time
SEARCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# What a search's `compute` takes: a dtype of SEARCH_DTYPES, or "auto" (search_dtype: bfloat16 where the device
# multiplies it natively, else float32; float64 for float64 query rows).
SEARCH_MODES = ("auto", *SEARCH_DTYPES)
CACHE_BYTES = 4 << 30  # an opened Index keeps the shards it has read up to this many bytes of rows


@dataclass(frozen=True)
class ShardScores:
    """A shard's scored rows: keys, scores (N, Q) and per-layer scores (N, Q, L), float64."""

    fragment: int
    doc_ids: np.ndarray  # (N,) object
    chunks: np.ndarray  # (N,) int64
    scores: np.ndarray
    layer_scores: np.ndarray

    def topk(self, query_ids: list[str], k: int | None) -> TopK:
        topk = TopK.empty(query_ids, k, self.layer_scores.shape[2])
        topk.update(self.doc_ids, self.chunks, self.scores, self.layer_scores,
                    np.full(len(self.chunks), self.fragment, dtype=np.int64))
        return topk


def search_device() -> torch.device:
    """Where shards are scored: the (first visible) GPU when this process has one, else the CPU. In a Ray task
    that reserved no GPU, Ray hides them (CUDA_VISIBLE_DEVICES is empty), so such a task scores on its CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports bfloat16, or a CPU
    with AVX512-BF16 or AMX-BF16 instructions (read from /proc/cpuinfo's flags; False where there is none).
    Elsewhere oneDNN emulates bfloat16 products, which then buy rounding and no speed."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bfloat16()


@functools.cache
def _cpu_has_bfloat16() -> bool:
    """/proc/cpuinfo's flags name AVX512-BF16 or AMX-BF16; read once a process (score_shard asks every shard)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_search_mode(compute: str | None) -> None:
    """A SettingsError unless `compute` is None or one of SEARCH_MODES (checked before a query loads anything)."""
    if compute is not None and compute not in SEARCH_MODES:
        raise SettingsError(f"search dtype must be one of {', '.join(SEARCH_MODES)}, got {compute!r}", "search_dtype")


def search_dtype(compute: str | None, query_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The products' dtype for `compute` (SEARCH_MODES; None: exact, float32, or float64 for float64 query
    rows). "auto": float64 for float64 query rows (as the tests' models), bfloat16 where `device` has it in
    hardware (native_bfloat16), float32 otherwise."""
    check_search_mode(compute)
    if compute is None or compute == "auto":
        if query_dtype == torch.float64:
            return torch.float64
        return torch.bfloat16 if compute == "auto" and native_bfloat16(device) else torch.float32
    return SEARCH_DTYPES[compute]


def score_shard(shard: Shard, prepared: torch.Tensor, layout: Sequence[BlockLayout],
                keys: set[tuple[str, int]] | None = None, device: torch.device | str | None = None,
                compute: str | None = None) -> ShardScores:
    """Scores of every row of `shard` (only those whose (doc_id, chunk) is in `keys`, when given) against the
    prepared query rows (Q, query width); `layout`: Projections.layout, where each layer's blocks lie. On
    `device` (default search_device()): each ROW_BLOCK of a layer's rows goes there widened, the scores come back.
    `compute`: the products' dtype, SEARCH_MODES (search_dtype; default None: float32, float64 for float64 query
    rows as in the tests, the exact score of the stored rows); bfloat16 rounds rows and queries to 8 bits of
    mantissa (a relative error of about 0.5% in a score) and runs several times faster on CPUs with bfloat16
    instructions and on GPUs; "auto" takes it where the device has it."""
    expected = layout[-1].query[1] if layout else 0
    if prepared.shape[1] != expected:
        raise SettingsError(f"the prepared query rows are {prepared.shape[1]:,} values wide where the layout expects "
                            f"{expected:,}: prepare the queries and take the layout at the same query rank "
                            "(Projections.prepare and Projections.layout)", "query_rank")
    rows = np.arange(shard.num_sequences)
    gradients = shard.gradients  # (N, width) in the storage dtype
    if keys is not None:
        rows = np.asarray([i for i, key in enumerate(zip(shard.doc_ids, shard.chunks.tolist())) if key in keys],
                          dtype=np.int64)
        gradients = gradients[torch.from_numpy(rows)]
    device = search_device() if device is None else torch.device(device)
    compute = search_dtype(compute, prepared.dtype, device)
    queries = prepared.to(device, compute)
    layer_scores = np.zeros((len(rows), queries.shape[0], len(layout)), dtype=np.float64)  # (N, Q, L)
    # Each layer's query block made contiguous once: a column slice of the (Q, width) rows is strided, and a
    # product with it is several times slower than with a dense copy.
    layer_queries = [queries[:, slice(*block_layout.query)].contiguous() for block_layout in layout]
    widen = RowWidener(compute) if device.type == "cpu" else lambda rows: rows.to(device, compute)
    for start in range(0, len(rows), ROW_BLOCK):
        for layer, block_layout in enumerate(layout):
            lo, hi = block_layout.stored
            # One layer's block of ROW_BLOCK rows widened at a time: (n, w_l) temporaries, not (n, width).
            block = widen(gradients[start : start + ROW_BLOCK, lo:hi])
            part = block_layout.scores(block, layer_queries[layer])  # (n, Q)
            layer_scores[start : start + len(block), :, layer] = part.to("cpu", torch.float64).numpy()
    doc_ids = np.asarray(shard.doc_ids, dtype=object)[rows] if len(rows) else np.empty(0, dtype=object)
    return ShardScores(shard.fragment, doc_ids, shard.chunks[rows], layer_scores.sum(axis=2), layer_scores)


class RowWidener:
    """Widens (n, w) blocks of stored rows to a CPU compute dtype into one buffer kept between calls: a new
    block of ROW_BLOCK rows is larger than glibc's mmap threshold, so allocating one per call cost a page fault
    for every 4 KiB written, and float16 -> bfloat16 goes through float32 in cache-sized pieces, which torch's
    direct conversion does not vectorise (on the bundled index, one thread, the 12 layers' blocks of a 794-row part:
    0.24 s by `.to`, 0.06 s this way). The block returned is overwritten by the next call."""

    PIECE_BYTES = 1 << 20  # float32 values converted at a time

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buffer = torch.empty(0, dtype=dtype)
        self.piece = torch.empty(0, dtype=torch.float32)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        count, width = rows.shape
        if self.buffer.numel() < count * width:
            self.buffer = torch.empty(count * width, dtype=self.dtype)
        out = self.buffer[: count * width].view(count, width)
        if rows.dtype == self.dtype or self.dtype != torch.bfloat16:
            return out.copy_(rows)
        step = max(1, self.PIECE_BYTES // (4 * width))
        if self.piece.numel() < step * width:
            self.piece = torch.empty(step * width, dtype=torch.float32)
        for start in range(0, count, step):
            part = rows[start : start + step]
            piece = self.piece[: part.numel()].view(part.shape)
            out[start : start + step].copy_(piece.copy_(part))
        return out


def score_shard_file(path: str | Location, prepared: np.ndarray, layout: list[BlockLayout], query_ids: list[str],
                     k: int | None, keys: set[tuple[str, int]] | None = None, compute: str | None = None) -> TopK:
    """One shard file's per-query top-k (what a Ray task over shards returns: small, mergeable)."""
    return score_shard(read_shard(path), torch.from_numpy(prepared), layout, keys, compute=compute).topk(query_ids, k)


def read_index_manifest(index_dir: str | Path | Location) -> dict:
    return load_index_manifest(index_dir)[0]


def load_index_manifest(index_dir: str | Path | Location) -> tuple[dict, str]:
    """(an index's manifest, the SHA-256 of its bytes), from one read: a query records the digest of the very
    manifest it used."""
    directory = Location.of(index_dir)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise WhenceError(f"{directory}: no {MANIFEST_FILE}; is this a finished index written by `whence index`?")
    raw = path.read_bytes()
    manifest = json.loads(raw)
    if manifest.get("command") != "index":
        raise WhenceError(f"{path} is a `whence {manifest.get('command')}` manifest, not an index's")
    return manifest, hashlib.sha256(raw).hexdigest()


def check_index_inputs(manifest: dict, model_fingerprint: str, factors_dir: str | Path | Location) -> None:
    """FactorsMismatchError unless the model (by fingerprint) and the factors directory (by
    whence.fingerprints.factors_fingerprint) are those the index was built with."""
    from whence.fingerprints import factors_fingerprint

    built = manifest["model"]
    if model_fingerprint != built["fingerprint"]:
        raise FactorsMismatchError(f"the index was built for another model (fingerprint {built['fingerprint']}, "
                                   f"model {built['path']}; this model {model_fingerprint})")
    recorded = manifest["factors"]
    if factors_fingerprint(factors_dir) != recorded["fingerprint"]:
        raise FactorsMismatchError(f"the index was built with other factors than {Location.of(factors_dir)} (it used "
                                   f"{recorded['path']}, fingerprint {recorded['fingerprint'][:12]}...; refitted "
                                   "factors need a new `whence index`)")


@dataclass
class Index:
    """An opened index: its manifest, projections, the model and factors it was built with, and its shards
    (loaded on first use and kept, up to `cache_bytes` of them)."""

    path: Location  # the index directory (whence.storage: any pyarrow filesystem)
    manifest: dict
    projections: Projections
    hosted: object  # whence.queries.HostedModel
    factors: object  # whence.factors.Factors
    shards: dict[Location, Shard] = field(default_factory=dict)  # part file -> its rows, as kept
    cache_bytes: int = CACHE_BYTES

    @classmethod
    def open(cls, path: str | Path | Location, model: str | None = None, factors: str | None = None,
             dtype: str = "auto", manifest: dict | None = None) -> Index:
        """The index at `path` with the model and factors it records (or `model` / `factors` given instead,
        which must be the same ones: FactorsMismatchError otherwise). `manifest`: the index's manifest, when the
        caller has read it already (load_index_manifest)."""
        from whence.factors import Factors
        from whence.model import find_tracked_layers, load_causal_lm, model_fingerprint
        from whence.queries import HostedModel
        from whence.redact import REDACTED

        path = Location.of(path)
        manifest = read_index_manifest(path) if manifest is None else manifest
        factors_dir = factors or manifest["factors"]["path"]
        if REDACTED in factors_dir:  # the URI carried credentials, which are never written
            raise SettingsError(f"{path} records its factors as {factors_dir}, whose credentials were redacted; "
                                "pass the factors' location again (--factors)", "factors")
        loaded, tokenizer = load_causal_lm(model or manifest["model"]["path"], dtype=dtype)
        check_index_inputs(manifest, model_fingerprint(loaded), factors_dir)
        layers = find_tracked_layers(loaded, manifest["arguments"].get("modules", "mlp"))
        fitted = Factors.load(factors_dir)
        fitted.check_compatible(manifest["model"]["fingerprint"], [layer.describe() for layer in layers])
        return cls(path, manifest, Projections.load(path / PROJECTIONS_FILE), HostedModel(loaded, tokenizer, layers),
                   fitted)

    @property
    def layer_names(self) -> list[str]:
        return self.projections.layer_names

    @functools.cached_property
    def parts(self) -> list[IndexPart]:
        """Every shard part file, in fragment and part order (whence.index.shards.index_parts)."""
        return index_parts(self.path, self.manifest)

    def shard(self, part: IndexPart) -> Shard:
        """Part `part`'s rows: kept once read while the kept parts stay within `cache_bytes`, read again on
        each use beyond that (a whole-corpus index can exceed the memory of the process that asks)."""
        if part.path in self.shards:
            return self.shards[part.path]
        shard = read_shard(part.path)
        kept = sum(s.gradients.nbytes for s in self.shards.values())
        if kept + shard.gradients.nbytes <= self.cache_bytes:
            self.shards[part.path] = shard
        return shard

    def prepare(self, queries, method: str = "ekfac", damping: float | str = "heuristic",
                query_rank: int | str = "full") -> torch.Tensor:
        """(Q, query width) query rows: the queries' gradients projected and preconditioned by `method` in the
        model's precision, float64 for a float64 model, else float32; for a lowrank index at an integer
        `query_rank` as rank-s factors (Projections.prepare; search with the same query_rank). The search's
        default products follow them (search_dtype): float64 rows of a float32 model would make every search
        product float64, twice the time of float32 for nothing the stored rows (float16 by default) could use;
        and preconditioning a float32 model's queries in float64 doubled the preparation, most of a query's
        time on a small corpus."""
        from whence.factors import compute_dtype
        from whence.queries import query_gradients

        hosted = self.hosted
        gradients = query_gradients(hosted.model, hosted.tokenizer, hosted.layers, queries, task=hosted.task)
        return self.projections.prepare(gradients, self.factors, method, damping,
                                        compute_dtype(hosted.model.dtype), query_rank)  # (Q, query width)

    def search(self, query_ids: list[str], prepared: torch.Tensor, top_k: int | None,
               keys: set[tuple[str, int]] | None = None, compute: str | None = "auto",
               query_rank: int | str = "full") -> TopK:
        """Per-query top-k over every shard, in this process (products in `compute`, score_shard), of query rows
        prepared at `query_rank` (prepare)."""
        merged = TopK.empty(query_ids, top_k, len(self.layer_names))
        layout = self.projections.layout(query_rank)
        for part in self.parts:
            merged.merge(score_shard(self.shard(part), prepared, layout, keys, compute=compute).topk(query_ids, top_k))
        return merged

    def query(self, queries, top_k: int | None = 10, method: str = "ekfac", damping: float | str = "heuristic",
              compute: str | None = "auto", query_rank: int | str = DEFAULT_QUERY_RANK):
        """A whence.api.ScoreTable of the sequences in any query's top-k (every sequence with top_k=None),
        with their scores for every query; `table.top(query_id, k)` as for `whence.score`. `compute`: the
        search's dtype (score_shard, search_dtype: "auto" is bfloat16 where the hardware has it, within about
        0.5% of float32's scores and several times faster; None or "float32" for the stored rows' exact score).
        `query_rank`: a lowrank index meets each preconditioned query as its rank-s SVD factors, the
        approximation `whence.score` makes (default 32; faster than the whole matrix for a few queries at a time),
        or whole with "full"."""
        from whence.api import ScoreTable
        from whence.text import Query

        queries = [q if isinstance(q, Query) else Query(str(q["id"]), q["prompt"], q["completion"]) for q in queries]
        query_ids = [q.id for q in queries]
        query_rank = parse_rank(query_rank)
        prepared = self.prepare(queries, method, damping, query_rank)
        layout = self.projections.layout(query_rank)
        parts = [score_shard(self.shard(part), prepared, layout, compute=compute) for part in self.parts]
        if top_k is not None:
            merged = TopK.empty(query_ids, top_k, len(self.layer_names))
            for part in parts:
                merged.merge(part.topk(query_ids, top_k))
            wanted = {(str(d), int(c)) for entry in merged.entries for d, c in zip(entry["doc_id"], entry["chunk"])}
            parts = [_rows_of(part, wanted) for part in parts]
        return ScoreTable(query_ids, self.layer_names, [str(d) for p in parts for d in p.doc_ids],
                          np.concatenate([p.chunks for p in parts]), np.concatenate([p.scores for p in parts]),
                          np.concatenate([p.layer_scores for p in parts]))


def _rows_of(part: ShardScores, wanted: set[tuple[str, int]]) -> ShardScores:
    keep = np.asarray([(str(d), int(c)) in wanted for d, c in zip(part.doc_ids, part.chunks)], dtype=bool)
    return ShardScores(part.fragment, part.doc_ids[keep], part.chunks[keep], part.scores[keep],
                       part.layer_scores[keep])
