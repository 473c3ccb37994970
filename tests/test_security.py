"""A local cluster Whence starts listens on the loopback interface only and stops with its process; credentials in
a corpus URI never reach what Whence writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.run_state import RunDirectory
from whence.corpus import CorpusSource
from whence.redact import REDACTED, redact_text, redact_uri, redact_value

REPO = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI-K7MDENG"
KEY = "AKIAIOSFODNN7EXAMPLE"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
STOP_WAIT_S = 90


def listening_sockets() -> tuple[list[dict], list[int]]:
    """Every listening TCP socket of this process and of the processes it started (the local cluster: GCS,
    raylet, agents, workers), and their pids."""
    import psutil

    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    sockets = []
    for process in processes:
        try:
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    sockets.append({"process": process.name(), "ip": connection.laddr.ip,
                                    "port": connection.laddr.port})
        except psutil.Error:  # a worker that exited meanwhile
            continue
    return sockets, [p.pid for p in processes[1:]]


def worker_pid() -> int:
    return os.getpid()


def probe(out: str) -> None:
    """Start a local cluster as `whence` does, run one task (a worker), write the sockets, then wait."""
    from flows.cluster import connect

    ray = connect()
    ray.get(ray.remote(worker_pid).remote())
    sockets, pids = listening_sockets()
    Path(out).write_text(json.dumps({"sockets": sockets, "pids": pids,
                                     "address": ray.get_runtime_context().gcs_address}))
    while True:
        time.sleep(1)


JOIN = """
import sys
from flows.cluster import connect
ray = connect(sys.argv[1])
print(ray.get(ray.remote(lambda: "joined").remote()))
"""


def test_local_cluster_listens_on_loopback_and_stops_on_sigterm(tmp_path):
    pytest.importorskip("psutil")
    import psutil

    out = tmp_path / "sockets.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "tests.test_security", str(out)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not out.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the local cluster did not come up"
            time.sleep(1)
        time.sleep(0.5)  # the file is written in one call; let it land
        found = json.loads(out.read_text())
        processes = {s["process"] for s in found["sockets"]}
        assert {"gcs_server", "raylet"} <= processes, processes
        exposed = [s for s in found["sockets"] if s["ip"] not in LOOPBACK]
        assert not exposed, exposed
        # Another process joins it by that loopback address, as `whence fit --address 127.0.0.1:PORT` (and
        # `whence bench --only memory`) do: Ray must not rewrite the address to the machine's external one.
        assert found["address"].startswith("127.0.0.1:"), found["address"]
        joined = subprocess.run([sys.executable, "-c", JOIN, found["address"]], cwd=REPO, env=env, timeout=180,
                                capture_output=True, text=True)
        assert joined.returncode == 0 and joined.stdout.split()[-1:] == ["joined"], joined.stderr[-3000:]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_WAIT_S) != 0
        deadline = time.monotonic() + STOP_WAIT_S
        alive = [pid for pid in found["pids"] if psutil.pid_exists(pid)]
        while alive and time.monotonic() < deadline:
            time.sleep(1)
            alive = [pid for pid in alive if psutil.pid_exists(pid) and
                     psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not alive, [psutil.Process(pid).name() for pid in alive if psutil.pid_exists(pid)]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_redact_uri_hides_user_info_and_secret_parameters():
    assert redact_uri(f"s3://{KEY}:{SECRET}@bucket/corpus/a.jsonl") == f"s3://{REDACTED}@bucket/corpus/a.jsonl"
    redacted = redact_uri(f"s3://bucket/a.jsonl?access_key={KEY}&secret_key={SECRET}&region=eu-west-1")
    assert KEY not in redacted and SECRET not in redacted and "region=eu-west-1" in redacted
    assert redact_uri("https://acct.blob.core.windows.net/c/a.parquet?sv=2022&sig=" + SECRET).endswith(
        "sig=" + REDACTED)
    for unchanged in ("/data/corpus", "relative/a.jsonl", "s3://bucket/a.jsonl", "gs://b/p?endpoint_override=x"):
        assert redact_uri(unchanged) == unchanged
    message = f"cannot open corpus location s3://{KEY}:{SECRET}@bucket/x: access denied"
    assert SECRET not in redact_text(message) and "bucket/x: access denied" in redact_text(message)
    assert redact_value({"corpus": [f"s3://k:{SECRET}@b/p"], "n": 3}) == {"corpus": [f"s3://{REDACTED}@b/p"], "n": 3}


def test_run_arguments_and_run_json_never_hold_the_secret(tmp_path):
    corpus = CorpusSource([f"s3://{KEY}:{SECRET}@bucket/corpus", f"s3://bucket/b.jsonl?secret_key={SECRET}",
                           str(tmp_path / "local.jsonl")])
    arguments = corpus.to_arguments()
    text = json.dumps(arguments)
    assert SECRET not in text and KEY not in text
    assert arguments["corpus"][2] == str(tmp_path / "local.jsonl")
    assert corpus.paths[0].startswith(f"s3://{KEY}:{SECRET}@")  # reading still uses the credentials
    state = RunDirectory(tmp_path / "run", "fit", {"model": "m", **arguments})
    state.open(overwrite=False)
    state.finish({"sequences": 1})
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    # The same corpus with other credentials is the same run: a resume is not refused for a rotated key.
    rotated = CorpusSource([f"s3://{KEY}:other@bucket/corpus", "s3://bucket/b.jsonl?secret_key=other",
                            str(tmp_path / "local.jsonl")])
    assert rotated.to_arguments() == arguments


def test_report_hides_credentials_of_an_older_run(monkeypatch):
    """A manifest written before redaction may hold a secret: the report's arguments table does not show it."""
    import whence.report.page as page

    class Results:
        manifest = {"arguments": {"corpus": [f"s3://{KEY}:{SECRET}@bucket/c"]}, "versions": {}}
        layers = []

    monkeypatch.setattr(page, "summary_rows", lambda results: [])
    html = page._summary_section(Results())
    assert SECRET not in html and "bucket/c" in html


if __name__ == "__main__":
    probe(sys.argv[1])
