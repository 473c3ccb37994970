"""The `whence eval` result files read back as tables, for notebooks and scripts (no Ray, no plotting).

    body = read_result("OUT/lds")            # the lds.json (or trace.json, exact.json) in a directory, or the file
    lds_table(body)                           # one row per method: lds, stderr, undefined queries
    trace_table(read_result("OUT/trace"))     # one row per method: recall@1, @10, @100, mrr
"""

from __future__ import annotations

import json
from pathlib import Path

RESULT_FILES = ("lds.json", "trace.json", "exact.json")


def read_result(path: str | Path) -> dict:
    """The body of a `whence eval` result: `path` itself, or the one result file in the directory `path`."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in RESULT_FILES if (path / name).is_file()]
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected one of {', '.join(RESULT_FILES)}, found "
                                    f"{', '.join(p.name for p in found) or 'none'}")
        path = found[0]
    return json.loads(path.read_text())


def lds_table(body: dict):
    """pandas DataFrame indexed by method: lds, stderr (over queries), undefined (queries left out)."""
    import pandas as pd

    rows = {name: {"lds": row["lds"], "stderr": row["stderr"], "undefined": row.get("undefined", 0)}
            for name, row in body["methods"].items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method").astype(
        {"lds": float, "stderr": float, "undefined": int})


def trace_table(body: dict):
    """pandas DataFrame indexed by method: recall@1, recall@10, recall@100, mrr."""
    import pandas as pd

    columns = ["recall@1", "recall@10", "recall@100", "mrr"]
    rows = {name: {c: row[c] for c in columns} for name, row in body["methods"].items()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns).rename_axis("method").astype(float)
