"""Bad input through the command line: exit status 2 and a message naming the option or file and the value, never a
traceback. Each is refused before Ray starts (settings, queries file, model directory, output location), except
the empty corpus and the over-long window, which need the model's config or the corpus scan."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from tests.pipeline_fixtures import write_workspace
from tests.tiny import TEXTS
from whence.queries import QueriesHeader
from whence.text import load_queries, token_pieces
from whence.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    workspace = write_workspace(root)
    factors = root / "factors"  # enough of a factors directory for score's checks before Ray
    factors.mkdir()
    (factors / "manifest.json").write_text(json.dumps({"arguments": {"seq_len": 16, "modules": "mlp"}}))
    workspace["factors"] = str(factors)
    return workspace


def score_args(space, out, *extra, queries=None):
    return ["score", "--model", space["model"], "--factors", space["factors"], "--queries",
            queries or space["queries"], "--corpus", space["corpus"], "--out", str(out), *extra]


def fit_args(space, out, *extra, model=None):
    return ["fit", "--model", model or space["model"], "--corpus", space["corpus"], "--out", str(out), *extra]


def refused(argv, capsys) -> str:
    """Run the CLI in process; it must exit 2 (returned or through argparse); returns its stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(("value", "shown"), [("-1", "-1.0"), ("nan", "nan"), ("inf", "inf")])
def test_damping_out_of_range(space, tmp_path, capsys, value, shown):
    err = refused(score_args(space, tmp_path / "r", "--damping", value), capsys)
    assert f"--damping {shown}" in err and "damping must be" in err


def test_negative_tfidf_candidates(space, tmp_path, capsys):
    err = refused(score_args(space, tmp_path / "r", "--tfidf-candidates", "-5"), capsys)
    assert "--tfidf-candidates -5" in err and "must be >= 0" in err


def test_negative_or_nan_refine_tolerance(space, tmp_path, capsys):
    for value in ("-1", "nan"):
        err = refused(score_args(space, tmp_path / "r", "--method", "ekfac-cg", "--refine-tolerance", value), capsys)
        assert f"--refine-tolerance {value}" in err and "refine_tolerance" in err


def test_one_token_window(space, tmp_path, capsys):
    err = refused(fit_args(space, tmp_path / "f", "--seq-len", "1"), capsys)
    assert "--seq-len 1" in err and "at least 2" in err


def test_window_longer_than_the_model_context(space, tmp_path, capsys):
    # The tiny model's context is 64 tokens (tests.pipeline_fixtures).
    err = refused(fit_args(space, tmp_path / "f", "--seq-len", "100000"), capsys)
    assert "--seq-len 100000" in err and "context window" in err and "64 tokens" in err
    err = refused(score_args(space, tmp_path / "r", "--seq-len", "65"), capsys)
    assert "--seq-len 65" in err and "64 tokens" in err


@pytest.mark.parametrize("kind", ["missing", "directory", "latin-1"])
def test_queries_file_unreadable(space, tmp_path, capsys, kind):
    path = tmp_path / "queries.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "latin-1":
        line = json.dumps({"id": "a", "prompt": "café", "completion": " crème"}, ensure_ascii=False)
        path.write_bytes(b'{"id": "ok", "prompt": "p", "completion": " c"}\n' + line.encode("latin-1") + b"\n")
    err = refused(score_args(space, tmp_path / "r", queries=str(path)), capsys)
    expected = {"missing": "queries file not found", "directory": "is a directory", "latin-1": ":2: not UTF-8"}
    assert str(path) in err and expected[kind] in err


def test_model_directory_without_weights(space, tmp_path, capsys):
    from pathlib import Path

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(space["model"]) / name).exists():
            (bare / name).write_bytes((Path(space["model"]) / name).read_bytes())
    err = refused(fit_args(space, tmp_path / "f", "--seq-len", "16", model=str(bare)), capsys)
    assert str(bare) in err and "no model weights" in err


@pytest.mark.parametrize("out", ["s3://bucket/results", "gs://bucket/r", "file:///tmp/r"])
def test_outputs_other_than_factors_and_indexes_must_be_local(space, tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    err = refused(score_args(space, out), capsys)
    assert "outputs must be local paths" in err and out.split(":")[0] in err and "`whence fit`" in err
    err = refused(["pretrain", "--corpus", space["corpus"], "--out", out], capsys)  # a type=Path option
    assert "outputs must be local paths" in err
    assert not any(tmp_path.iterdir())  # no ./s3:/bucket/... made


def test_empty_corpus_is_an_error_for_score(tmp_path, capsys, ray_cluster):
    """Every row bad: `whence score` says so (as `whence fit` does) instead of writing an empty top-k."""
    space = write_workspace(tmp_path)
    fitted = tmp_path / "factors"
    assert main(fit_args(space, fitted, "--seq-len", "16", "--max-sequences", "20")) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n{not json\n')
    err = refused(["score", "--model", space["model"], "--factors", str(fitted), "--queries", space["queries"],
                   "--corpus", str(bad), "--out", str(tmp_path / "r"), "--tfidf-candidates", "0"], capsys)
    assert "no sequences to score" in err and "bad.jsonl" in err and "2 bad rows" in err
    assert not (tmp_path / "r" / "topk.parquet").exists()


def test_query_ids_with_the_old_separator_round_trip(tmp_path):
    """Ids are stored as a JSON list: an id holding \\x1f (the old join byte) or any other character survives."""
    ids = ["a\x1fb", "plain", 'quote"s', "日本"]
    header = QueriesHeader(ids, ["layer.0", "layer\x1f1"], 4)
    assert QueriesHeader.of(header.to_metadata()) == header
    old_file = {"query_ids": "a\x1fb", "layers": "x\x1fy", "rank": "full"}  # written before the JSON lists
    assert QueriesHeader.of(old_file) == QueriesHeader(["a", "b"], ["x", "y"], "full")


def test_query_id_with_a_control_character_loads(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a\x1fb", "prompt": "The", "completion": " whale"}) + "\n")
    assert load_queries(path)[0].id == "a\x1fb"


def test_token_pieces_keep_cjk_and_emoji_whole():
    text = "The whale 鲸鱼 swam 🐋 far, 東京は晴れ 👍🏽 done"
    tokenizer = train_bpe_tokenizer(TEXTS * 4 + [text[:20]], 260)  # CJK and emoji split over byte tokens
    ids = tokenizer(text)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # the old per-token decode breaks them
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    assert not any("\ufffd" in piece for piece in pieces)
    for character in ("鲸", "🐋", "東", "👍"):
        assert character in pieces  # a whole character on the token that completes it


def test_token_pieces_where_the_text_has_a_replacement_character():
    tokenizer = train_bpe_tokenizer(TEXTS * 4, 260)
    ids = tokenizer("broken \ufffd byte")["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, clean_up_tokenization_spaces=False)


class FlakyRay:
    """ray.init failing `failures` times as Ray does when its node does not come up in time."""

    def __init__(self, failures: int):
        self.failures, self.inits, self.shutdowns = failures, 0, 0

    def init(self, **options):
        self.inits += 1
        if self.inits <= self.failures:
            raise Exception("The current node timed out during startup. This could happen because some of the "
                            "raylet failed to startup or the GCS has become overloaded.")

    def shutdown(self):
        self.shutdowns += 1


def test_ray_start_up_timeout_is_retried_once_then_a_clear_error():
    from flows.cluster import START_ATTEMPTS, _init_with_retry
    from whence.errors import ClusterError

    once = FlakyRay(failures=1)
    _init_with_retry(once, {"address": "auto"})
    assert (once.inits, once.shutdowns) == (2, 1)
    always = FlakyRay(failures=START_ATTEMPTS)
    with pytest.raises(ClusterError, match=r"could not start or join Ray at auto after 2 attempts.*timed out"):
        _init_with_retry(always, {"address": "auto"})
    assert always.shutdowns == START_ATTEMPTS


def test_other_ray_errors_are_not_retried():
    from flows.cluster import _init_with_retry

    class Broken(FlakyRay):
        def init(self, **options):
            self.inits += 1
            raise ValueError("bad runtime_env")

    broken = Broken(0)
    with pytest.raises(ValueError, match="bad runtime_env"):
        _init_with_retry(broken, {"address": "auto"})
    assert broken.inits == 1
