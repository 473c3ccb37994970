"""The one helper for settings dataclasses: every field carries its help text, read back by the command line.

    @dataclass
    class FitConfig:
        seq_len: int = setting("tokens per training sequence", 512)

`help_for(FitConfig, "seq_len")` returns that text, so `--help` and the dataclass never drift apart.
"""

from __future__ import annotations

from dataclasses import field, fields


def setting(help_text: str, default):
    """A dataclass field with a default and its help text (a mutable default is given as a factory)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


def help_for(config_class, name: str) -> str:
    """The help text of field `name` of a settings dataclass."""
    return next(f.metadata["help"] for f in fields(config_class) if f.name == name)
