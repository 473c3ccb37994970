"""The passes of `whence query` that run the model over corpus sequences again: --rescore and --per-token.

The index stores each sequence's compressed gradient, not its tokens' activations, so exact and per-token scores
need the model: the wanted sequences are read from the corpus as the index build read them, and each query's
full preconditioned gradient (rank --query-rank, whence.queries, as `whence score` prepares it) scores them
(whence.scoring):
    rescore    the pooled top-N sequences of every query by the index are scored exactly and ranked again: the
               index shortlists, the model ranks (topk.parquet then holds full EK-FAC scores)
    per-token  s_t^T P(grad f(q)) a_t for the top-k sequences: tokens.parquet, in `whence score`'s schema. They
               sum to the full EK-FAC score: topk.parquet's score when rescored, else the index's estimate of it.
"""

from __future__ import annotations

from itertools import islice


class ModelScorer:
    """The index's model with the queries prepared in full, scoring corpus sequences by key."""

    def __init__(self, index, corpus, queries, config):
        from whence.queries import prepare_queries
        from whence.scoring import QueryScorer

        hosted = index.hosted
        prepared = prepare_queries(hosted, index.factors, queries, config.query_rank, config.damping, config.method)
        self.scorer = QueryScorer(hosted.model, hosted.layers, prepared)
        self.tokenizer, self.corpus, self.batch_size = hosted.tokenizer, corpus, config.batch_size

    def batches(self, topk, per_token: bool = False):
        """(sequences, whence.scoring.BatchScores) for the sequences of `topk`'s entries, batch_size at a time."""
        from whence.text import collate_sequences, pad_id_of

        keys = {(str(d), int(c)) for entry in topk.entries for d, c in zip(entry["doc_id"], entry["chunk"])}
        involved = {int(f) for entry in topk.entries for f in entry["fragment"]}
        iterator = iter(_sequences(self.corpus, involved, keys))
        while group := list(islice(iterator, self.batch_size)):
            yield group, self.scorer.score(collate_sequences(group, pad_id_of(self.tokenizer)), per_token=per_token)

    def rescore(self, topk, k: int | None):
        """A TopK of `k` per query from the exact scores of the pooled sequences of `topk`."""
        from whence.topk import TopK

        fragments = {(str(d), int(c)): int(f) for entry in topk.entries
                     for d, c, f in zip(entry["doc_id"], entry["chunk"], entry["fragment"])}
        exact = TopK.empty(topk.query_ids, k, len(self.scorer.layers))
        for group, scores in self.batches(topk):
            keys = [(s.doc_id, s.chunk) for s in group]
            exact.update([d for d, _ in keys], [c for _, c in keys], scores.total.T.cpu().numpy(),
                         scores.per_layer.permute(1, 0, 2).cpu().numpy(), [fragments[key] for key in keys])
        return exact

    def per_token(self, state, queries, topk) -> None:
        """Write RESULTS_DIR/tokens.parquet for `topk`'s entries."""
        from whence.results import TOKENS_FILE, TOKENS_SCHEMA, tokens_table, write_table_atomically
        from whence.text import token_pieces

        wanted: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (doc_id, chunk) -> [(query index, rank)]
        for q, entry in enumerate(topk.entries):
            for rank, (doc_id, chunk) in enumerate(zip(entry["doc_id"], entry["chunk"]), start=1):
                wanted.setdefault((str(doc_id), int(chunk)), []).append((q, rank))
        rows = []  # (query index, rank, doc_id, chunk, tokens, token_ids, token_scores)
        for group, scores in self.batches(topk, per_token=True):
            per_token = scores.per_token.cpu().numpy()  # (Q, B, T)
            for j, sequence in enumerate(group):
                key, ids = (sequence.doc_id, sequence.chunk), list(sequence.input_ids)
                pieces = token_pieces(self.tokenizer, ids)
                rows += [(q, rank, *key, pieces, ids, per_token[q, j, : len(ids)].tolist()) for q, rank in wanted[key]]
        rows.sort(key=lambda row: row[:2])  # query order, then rank
        columns = {name: [row[i] for row in rows] for i, name in enumerate(TOKENS_SCHEMA.names)}
        columns["query_id"] = [queries[q].id for q in columns["query_id"]]
        write_table_atomically(tokens_table(columns), state.path / TOKENS_FILE)


def _sequences(corpus, involved: set[int], keys: set[tuple[str, int]]):
    """The TrainingSequences of `keys` from the fragments `involved` (tokenising only their documents)."""
    from flows.corpus_pipeline import fragment_sequences

    _, skip, _ = corpus.scan()
    doc_ids = {doc_id for doc_id, _ in keys}
    for fragment in corpus.fragments:
        if fragment.index not in involved:
            continue
        for sequence in fragment_sequences(fragment, corpus.settings, skip.get(fragment.index, frozenset()), doc_ids):
            if (sequence.doc_id, sequence.chunk) in keys:
                yield sequence



