"""Resumable output directories: arguments saved beside the outputs, finished work skipped, mismatches refused.

Layout of a run directory (fit or score):
    run.json          the arguments that define the run and its status ("running" / "finished")
    manifest.json     written at the end (the contract: arguments, tracked layers, fingerprint, versions)
    parts/            finished units of work (one file per corpus fragment), written atomically
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from whence.errors import RunStateError

RUN_FILE = "run.json"
PARTS = "parts"


class RunDirectory:
    def __init__(self, path: str | Path, command: str, arguments: dict):
        self.path = Path(path)
        self.command = command
        self.arguments = arguments

    def open(self, overwrite: bool) -> bool:
        """Prepare the directory. Returns True when resuming an unfinished run with the same arguments.

        A finished run with the same arguments is redone from its saved parts (cheap); a run with other
        arguments is refused unless overwrite, which clears the directory."""
        run_file = self.path / RUN_FILE
        if run_file.exists():
            saved = json.loads(run_file.read_text())
            if saved.get("command") != self.command or saved.get("arguments") != self.arguments:
                if not overwrite:
                    changed = sorted(k for k in set(saved.get("arguments", {})) | set(self.arguments)
                                     if saved.get("arguments", {}).get(k) != self.arguments.get(k))
                    raise RunStateError(
                        f"{self.path} holds a `whence {saved.get('command')}` run with other arguments "
                        f"(differing: {', '.join(changed) or 'command'}); pass --overwrite to replace it"
                    )
                shutil.rmtree(self.path)
            else:
                return True
        elif self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise RunStateError(f"{self.path} exists and is not a whence run directory; pass --overwrite "
                                    "to replace its contents, or choose another --out")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_json(RUN_FILE, {"command": self.command, "arguments": self.arguments, "status": "running"})
        return False

    @property
    def finished(self) -> bool:
        """True when the directory holds a finished run of these arguments (its outputs are complete)."""
        saved = self.read_json(RUN_FILE) or {}
        return saved.get("status") == "finished" and saved.get("arguments") == self.arguments

    def finish(self, summary: dict | None = None) -> None:
        self.write_json(RUN_FILE, {"command": self.command, "arguments": self.arguments, "status": "finished",
                                   "summary": summary or {}})

    def saved_summary(self) -> dict:
        return (self.read_json(RUN_FILE) or {}).get("summary", {})

    def write_json(self, name: str, body: dict) -> Path:
        path = self.path / name
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(body, indent=2, default=str))
        partial.replace(path)
        return path

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    def part_path(self, kind: str, index: int) -> Path:
        directory = self.path / PARTS
        directory.mkdir(exist_ok=True)
        return directory / f"{kind}-{index:06d}.parquet"

    def finished_parts(self, kind: str) -> dict[int, Path]:
        directory = self.path / PARTS
        if not directory.exists():
            return {}
        return {int(p.stem.rsplit("-", 1)[1]): p for p in sorted(directory.glob(f"{kind}-*.parquet"))}


def write_table_atomically(table, path: Path) -> None:
    import pyarrow.parquet as pq

    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    partial.replace(path)
