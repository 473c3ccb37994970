"""The Ray Data stage that builds an index: each input row names a corpus fragment; the actor reads its
sequences, compresses every sequence's gradient (whence.index.GradientCompressor) and writes the fragment's shard
itself, part by part as the parts fill (whence.index.shards), then the fragment's record, returning one small
summary row per fragment. A fragment whose build was interrupted resumes after its verified leading parts.

A callable class (Ray's batch-inference pattern): the model and the projections load once in __init__. The actor
never imports flows: how a fragment becomes sequences is handed to it as `read_fragment` (a picklable callable,
fragment index -> TrainingSequence iterator, made by flows.index).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from itertools import islice

import numpy as np

from actors.hosting import ModelSpec, host_model, maybe_fail
from whence.index.build import GradientCompressor, check_model_matches_factors
from whence.index.projection import Projections
from whence.index.shards import finished_parts, write_part, write_record
from whence.model import model_fingerprint
from whence.storage import Location
from whence.text import TrainingSequence


class FragmentIndexer:
    """Indexes whole fragments: the model (a replica on this process's device) and the projections at
    `projections_path`; shards go to `index_dir` in `storage_dtype`, `rows_per_part` rows a part file."""

    def __init__(self, spec: ModelSpec, projections_path: str | Location, factors_manifest: dict,
                 read_fragment: Callable[[int], Iterable[TrainingSequence]], index_dir: str | Location,
                 rows_per_part: int, storage_dtype: str = "float16", batch_size: int = 8,
                 num_threads: int | None = None):
        model, tokenizer, layers = host_model(spec, num_threads)
        check_model_matches_factors(model_fingerprint(model), layers, factors_manifest)
        self.compressor = GradientCompressor(model, tokenizer, layers, Projections.load(projections_path))
        self.read_fragment, self.index_dir = read_fragment, index_dir
        self.storage_dtype, self.batch_size, self.rows_per_part = storage_dtype, batch_size, rows_per_part
        self.parts_done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fragments, sequences, tokens, seconds = [], [], [], []
        for fragment in batch["fragment"].tolist():
            tick = time.monotonic()
            new_rows, new_tokens = self.index_fragment(int(fragment))
            fragments.append(int(fragment))
            sequences.append(new_rows)
            tokens.append(new_tokens)
            seconds.append(time.monotonic() - tick)
        return {"fragment": np.asarray(fragments, dtype=np.int64), "sequences": np.asarray(sequences, np.int64),
                "tokens": np.asarray(tokens, dtype=np.int64), "seconds": np.asarray(seconds, dtype=np.float64)}

    def index_fragment(self, fragment: int) -> tuple[int, int]:
        """Write `fragment`'s parts after its verified leading ones (whence.index.shards.finished_parts: the
        sequences they hold are read and skipped, not recomputed), then its record. Returns the (sequences,
        tokens) indexed now."""
        kept = finished_parts(self.index_dir, fragment)  # rows of each verified leading part
        sequences = iter(self.read_fragment(fragment))
        for _ in islice(sequences, sum(kept)):
            pass
        counted, rows = _Counted(sequences), list(kept)
        for part in self.compressor.parts(fragment, counted, self.batch_size, self.storage_dtype,
                                          self.rows_per_part, empty_part=not kept):
            write_part(self.index_dir, part, len(rows), self.storage_dtype)
            rows.append(part.num_sequences)
            self.parts_done += 1
            maybe_fail(self.parts_done)
        write_record(self.index_dir, fragment, rows)
        return sum(rows) - sum(kept), counted.tokens


class _Counted:
    """Passes sequences through, counting their tokens."""

    def __init__(self, sequences: Iterable[TrainingSequence]):
        self.sequences, self.tokens = sequences, 0

    def __iter__(self):
        for sequence in self.sequences:
            self.tokens += len(sequence.input_ids)
            yield sequence
