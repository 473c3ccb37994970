"""The versions of what produced an output, recorded in every manifest (fit, score, pretrain, eval)."""

from __future__ import annotations


def versions() -> dict:
    import platform

    import ray
    import torch
    import transformers

    import whence

    return {"whence": whence.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "ray": ray.__version__, "python": platform.python_version()}
