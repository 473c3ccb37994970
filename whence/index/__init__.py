"""The gradient index: every corpus sequence's gradient stored once, compressed, so that new queries are
answered by matrix products instead of a pass of the model over the corpus (`whence index`, `whence query`).

    projection.py  the Kronecker-structured projections (EK-FAC eigenbasis truncation, seeded random), each
                   sequence's own low-rank factors (lowrank), and the query side that preconditions to match
    build.py       a batch of sequences -> compressed rows (GradientCompressor), a fragment -> its shard's parts
    shards.py      the index directory: each corpus fragment's shard in safetensors part files, their records,
                   checksums, resume
    search.py      scoring shards by matrix products; Index.open(path).query(queries, top_k=10)

Pure torch: no Ray (actors/indexer.py and flows/index.py, flows/query.py run it at corpus scale).
"""

from whence.index.build import GradientCompressor
from whence.index.projection import DEFAULT_DIM, DEFAULT_KIND, KINDS, Projections, build_projections
from whence.index.search import Index, score_shard
from whence.index.shards import DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES, Shard, read_shard, write_shard

__all__ = ["DEFAULT_DIM", "DEFAULT_KIND", "DEFAULT_STORAGE_DTYPE", "KINDS", "STORAGE_DTYPES", "GradientCompressor",
           "Index", "Projections", "Shard", "build_projections", "read_shard", "score_shard", "write_shard"]
