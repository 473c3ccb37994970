"""Resumable output directories: arguments saved beside the outputs, finished work skipped, mismatches refused.

Layout of a run directory (fit, score, query, index; fit's and index's on any pyarrow filesystem):
    run.json          the arguments that define the run and its status ("running" / "finished")
    manifest.json     written at the end (the contract: arguments, tracked layers, fingerprint, versions)
    parts/            finished units of work (one file per corpus fragment), written atomically; what a
                      part holds belongs to its command (for `whence score`: whence.fragment_parts, which also
                      keeps the scorers' pieces of a fragment there, in parts/scores-NNNNNN.pieces/, until the
                      fragment completes)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from whence.errors import RunStateError
from whence.storage import Location

log = logging.getLogger("whence.run")

RUN_FILE = "run.json"
PARTS = "parts"


class RunDirectory:
    """A run's output directory, on the local disk or (`whence fit`, `whence index`) on any pyarrow filesystem.

    `location` is the directory as a whence.storage.Location; `path` is the same directory as a Path when it is
    local (commands whose outputs are local only use it), else the Location."""

    def __init__(self, path: str | Path | Location, command: str, arguments: dict):
        self.location = Location.of(path)
        self.path = self.location.local if self.location.is_local else self.location
        self.command = command
        self.arguments = arguments

    def open(self, overwrite: bool) -> bool:
        """Prepare the directory. Returns True when resuming an unfinished run with the same arguments.

        A finished run with the same arguments is redone from its saved parts (cheap); a run with other
        arguments is refused unless overwrite, which clears the directory."""
        run_file = self.location / RUN_FILE
        if run_file.is_file():
            saved = json.loads(run_file.read_text())
            if saved.get("command") != self.command or saved.get("arguments") != self.arguments:
                if not overwrite:
                    changed = sorted(k for k in set(saved.get("arguments", {})) | set(self.arguments)
                                     if saved.get("arguments", {}).get(k) != self.arguments.get(k))
                    raise RunStateError(
                        f"{self.location} holds a `whence {saved.get('command')}` run with other arguments "
                        f"(differing: {', '.join(changed) or 'command'}); pass --overwrite to replace it"
                    )
                self.location.remove()
            else:
                return True
        elif self.location.is_file():
            raise RunStateError(f"{self.location} is a file, not a directory; choose another --out")
        elif self.location.children():
            if not overwrite:
                raise RunStateError(f"{self.location} exists and is not a whence run directory; pass --overwrite "
                                    "to replace its contents, or choose another --out")
            self.location.remove()
        self.location.mkdir()
        self.write_json(RUN_FILE, {"command": self.command, "arguments": self.arguments, "status": "running"})
        return False

    def reuse_or_open(self, overwrite: bool) -> bool:
        """True when the directory already holds a finished run of these arguments and overwrite is off: its
        outputs stand, nothing to do. Otherwise opens it (`open`: resuming an unfinished run with the same
        arguments) and returns False."""
        if self.finished and not overwrite:
            log.info("%s already holds a finished run with these arguments; nothing to do", self.location)
            return True
        if self.open(overwrite):
            log.info("resuming the unfinished run in %s", self.location)
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

    def write_json(self, name: str, body: dict) -> Path | Location:
        target = self.location / name
        target.write_text(json.dumps(body, indent=2, default=str))
        return target.local if target.is_local else target

    def read_json(self, name: str) -> dict | None:
        target = self.location / name
        return json.loads(target.read_text()) if target.is_file() else None

    def part_path(self, kind: str, index: int) -> Path:
        directory = self.location.local / PARTS
        directory.mkdir(exist_ok=True)
        return directory / f"{kind}-{index:06d}.parquet"

    def finished_parts(self, kind: str) -> dict[int, Path]:
        directory = self.location.local / PARTS
        if not directory.exists():
            return {}
        return {int(p.stem.rsplit("-", 1)[1]): p for p in sorted(directory.glob(f"{kind}-*.parquet"))}

    def holds_this_run(self, saved: dict | None, overwrite: bool) -> bool:
        """For a run written elsewhere and moved into place once complete (`whence pretrain`'s model directory),
        judged from `saved`: the {"command", "arguments"} record of the run the directory holds (None: none).

        True when that is this run. Another run, or a directory of other files, raises RunStateError unless
        `overwrite`; False means the caller writes the run (replacing what is there)."""
        if overwrite or not self.path.exists():
            return False
        if not self.path.is_dir():
            raise RunStateError(f"{self.path} is a file, not a directory; choose another --out")
        if saved is None:
            if any(self.path.iterdir()):
                raise RunStateError(f"{self.path} exists and is not a whence {self.command} run; pass --overwrite "
                                    "to replace its contents, or choose another --out")
            return False
        if saved.get("command") == self.command and saved.get("arguments") == self.arguments:
            return True
        differing = ", ".join(self.differing(saved.get("arguments") or {})) or "command"
        raise RunStateError(f"{self.path} holds a `whence {saved.get('command')}` run with other arguments "
                            f"(differing: {differing}); pass --overwrite to replace it")

    def differing(self, saved_arguments: dict) -> list[str]:
        """The names of the arguments whose saved value is not this run's, sorted."""
        names = set(saved_arguments) | set(self.arguments)
        return sorted(name for name in names if saved_arguments.get(name) != self.arguments.get(name))
