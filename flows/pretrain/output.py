"""`whence pretrain`'s output: MODEL_DIR, a standard Hugging Face directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) with MODEL_DIR/training_report.json.

The directory is written under a temporary name and renamed when complete. A MODEL_DIR that already holds a
finished run with the same arguments is left as it is; with other arguments the command refuses unless given
`--overwrite` (flows.run_state.RunDirectory decides, from the arguments recorded in training_report.json).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from flows.pretrain.data import PretrainData
from flows.pretrain.settings import PretrainConfig
from flows.run_state import RunDirectory

REPORT_FILE = "training_report.json"
COMMAND = "pretrain"


def already_trained(out: Path, arguments: dict, overwrite: bool) -> bool:
    """True if `out` holds a finished run with these arguments; raises RunStateError if it holds anything else
    (without `overwrite`). The record of a finished run is its report's "arguments"."""
    report = Path(out) / REPORT_FILE
    saved = None
    if report.is_file():
        saved = {"command": COMMAND, "arguments": json.loads(report.read_text()).get("arguments")}
    return RunDirectory(out, COMMAND, arguments).holds_this_run(saved, overwrite)


def training_report(data: PretrainData, config: PretrainConfig, outcome: dict, arguments: dict, started: float,
                    prepared_seconds: float) -> dict:
    """training_report.json: the losses and the baseline, what was trained on, the model, timing and provenance.
    `outcome` is the rank-0 worker's result (flows.pretrain.training.train_loop); `started` the time.time() the
    command started at."""
    from flows.provenance import versions

    train, val, tokens_seen = data.train, data.val, outcome["tokens_seen"]
    return {
        "val_loss": outcome["val_loss"],
        **data.baseline,
        "loss_units": "nats per predicted token (positions t >= 2 of each window)",
        "steps": outcome["steps"],
        "stopped_by_time_limit": outcome["stopped_by_time_limit"],
        "train": {"documents": len(data.train_docs), "windows": len(train), "tokens": train.num_tokens,
                  "tokens_seen": tokens_seen, "epochs": tokens_seen / train.num_tokens},
        "val": {"documents": len(data.val_docs), "windows": len(val), "tokens": val.num_tokens,
                "predicted_tokens": val.num_targets},
        "model": {"parameters": outcome["parameters"], "vocab_size": len(data.tokenizer),
                  "hidden_size": config.hidden_size, "intermediate_size": config.mlp_size,
                  "layers": config.layers, "heads": config.heads, "context": config.seq_len},
        "timing": {"prepare_seconds": round(prepared_seconds, 1), "train_seconds": round(outcome["seconds"], 1),
                   "total_seconds": round(time.time() - started, 1),
                   "tokens_per_second": round(tokens_seen / max(outcome["seconds"], 1e-9))},
        "device": outcome["device"],
        "corpus": data.tally.as_dict(),
        "history": outcome["history"],
        "val_document_ids": [doc_id for doc_id, _ in data.val_docs],
        "arguments": arguments,
        "versions": versions(),
    }


def write_model_dir(out: Path, model_config, state_dict: dict, tokenizer, report: dict, overwrite: bool) -> None:
    """Save the model, tokenizer and report under a temporary name beside `out`, then move it into place."""
    import torch
    from transformers import LlamaForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model = LlamaForCausalLM(model_config)
        model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in state_dict.items()})
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _portable_tokenizer_class(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _usual_permissions(staging)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise FileExistsError(f"{out} appeared while training")
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _usual_permissions(directory: Path) -> None:
    """Readable by others as the umask allows (mkdtemp makes the directory private; some writers do files too)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _portable_tokenizer_class(directory: Path) -> None:
    """Name the tokenizer class that both transformers 4 and 5 load from tokenizer.json as it is.

    transformers 5 writes "TokenizersBackend", which transformers 4 lacks; both know "PreTrainedTokenizerFast".
    """
    path = directory / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2) + "\n")
