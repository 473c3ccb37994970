"""`whence score --per-token`: the top-k sequences scored again token by token (one pass per query group, the
model unsharded), their tokens decoded whole: RESULTS_DIR/tokens.parquet (whence.results owns its schema)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flows.corpus_pipeline import FragmentPlan
    from flows.query_groups import QueryGroup
    from flows.score import ScoringRun
    from whence.topk import TopK

def per_token_pass(run: ScoringRun, plan: FragmentPlan, topk: TopK) -> None:
    """Score the top-k sequences again, token by token, one pass per query group, and write tokens.parquet (the
    groups' rows in query order)."""
    import pyarrow as pa

    from whence.results import TOKENS_FILE, write_table_atomically

    tables = [_group_tokens(run, plan, topk, group) for group in run.groups]
    write_table_atomically(pa.concat_tables(tables), run.state.path / TOKENS_FILE)


def _group_tokens(run: ScoringRun, plan: FragmentPlan, topk: TopK, group: QueryGroup):
    """The tokens.parquet rows of `group`'s queries (a pyarrow Table), their top-k sequences read from plan.stored
    when the candidates were gathered."""
    from flows.corpus_pipeline import FragmentPlan, load_tokenizer
    from flows.score_pass import scoring_dataset
    from whence.results import TOKENS_SCHEMA, tokens_table
    from whence.text import token_pieces

    entries = topk.entries[group.start : group.stop]  # query q of the group is the run's group.start + q
    wanted: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (doc_id, chunk) -> [(query in group, rank)]
    for q, entry in enumerate(entries):
        for rank, (doc_id, chunk) in enumerate(zip(entry["doc_id"], entry["chunk"]), start=1):
            wanted.setdefault((str(doc_id), int(chunk)), []).append((q, rank))
    involved = {int(f) for entry in entries for f in entry["fragment"]}
    plan = FragmentPlan(skip_lines=plan.skip_lines, keys=set(wanted), stored=plan.stored)
    dataset = scoring_dataset(run, [f for f in run.fragments if f.index in involved], plan, group, per_token=True)
    tokenizer = load_tokenizer(run.settings.tokenizer_path)
    rows = []  # (query index, rank, doc_id, chunk, tokens, token_ids, token_scores)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i in np.flatnonzero(batch["marker_total"] < 0):
            key = (str(batch["doc_id"][i]), int(batch["chunk"][i]))
            ids = [int(t) for t in batch["input_ids"][i]]
            pieces = token_pieces(tokenizer, ids)  # joined, they are the decoded text (CJK and emoji whole)
            for q, rank in wanted.get(key, []):
                rows.append((q, rank, *key, pieces, ids, batch["token_scores"][i][q].tolist()))
    rows.sort(key=lambda row: row[:2])  # query order, then rank
    columns = {name: [row[j] for row in rows] for j, name in enumerate(TOKENS_SCHEMA.names)}
    columns["query_id"] = [run.query_ids[group.start + q] for q in columns["query_id"]]
    return tokens_table(columns)
