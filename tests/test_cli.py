"""The command line as a user runs it: help, clear errors with exit status 2, and `ray job submit`."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tests.pipeline_fixtures import QUERIES, write_workspace

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "score", "report", "pretrain", "bench", "demo"):
        assert command in out


def test_score_help_names_the_contract_options(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    for option in ("--top-k", "--tfidf-candidates", "--query-rank", "--damping", "--method", "--per-token",
                   "--save-all-scores", "--shards", "--workers", "--strict", "--overwrite"):
        assert option in out


def test_user_errors_exit_2_with_a_message(tmp_path, capsys, ray_cluster):
    space = write_workspace(tmp_path)
    code = main(["fit", "--model", space["model"], "--corpus", space["corpus"], "--out", str(tmp_path / "f"),
                 "--seq-len", "16", "--strict"])
    assert code == 2
    assert "a.jsonl:11: invalid JSON" in capsys.readouterr().err
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"")
    code = main(["fit", "--model", str(not_a_model), "--corpus", space["corpus"], "--out", str(tmp_path / "g"),
                 "--seq-len", "16"])
    assert code == 2
    assert "no config.json" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jobs_api_answers(address: str) -> bool:
    """Whether the head's dashboard serves its jobs API (GET /api/jobs/ on a local port; no proxy) yet."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{address}/api/jobs/", timeout=5) as response:
            return response.status == 200
    except OSError:  # refused while the dashboard starts; HTTP errors while its job module loads
        return False


def test_ray_job_submit_to_a_local_head(tmp_path):
    """`ray start --head`, then `ray job submit -- whence fit ... && whence score ...`, as cluster/README.md says."""
    space = write_workspace(tmp_path)
    bin_dir = Path(sys.executable).parent
    ray_cli = shutil.which("ray", path=str(bin_dir)) or "ray"
    # No drain on SIGTERM: the stop below signals the whole group, GCS included, so Ray 2.60's drain request
    # would only wait out its 30 s timeout before the same teardown.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    dashboard_port = free_port()
    # Every port of its own: the test session's Ray (and any other) already holds the defaults, and a job
    # agent that cannot bind its port leaves `ray job submit` waiting forever for "an available agent".
    ports = {"--port": free_port(), "--dashboard-port": dashboard_port, "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--metrics-export-port": free_port(), "--ray-client-server-port": free_port()}
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
                             "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 120
        while not jobs_api_answers(address):  # what `ray job list` asks, without a CLI start-up per try
            assert time.monotonic() < deadline, "the local head did not come up"
            assert head.poll() is None, head.stdout.read().decode()
            time.sleep(0.5)
        out = tmp_path / "results"
        entrypoint = (f"whence fit --model {space['model']} --corpus {space['corpus']} --out {tmp_path / 'factors'} "
                      f"--seq-len 16 && whence score --model {space['model']} --factors {tmp_path / 'factors'} "
                      f"--queries {space['queries']} --corpus {space['corpus']} --out {out} --top-k 3 "
                      # No TF-IDF selection: it would scan the corpus again for its document frequencies
                      # (TF-IDF on Ray: test_pipeline.py); the job's cluster serves both commands as is.
                      "--tfidf-candidates 0")
        submit = [ray_cli, "job", "submit", "--address", address, "--working-dir", str(tmp_path / "corpus"),
                  "--", "bash", "-c", entrypoint]
        while True:  # the head's job agent comes up a little after its dashboard
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
        assert len(pq.read_table(out / "topk.parquet")) == 3 * len(QUERIES)
    finally:
        os.killpg(head.pid, 15)
        head.wait(timeout=60)


def test_healthy_run_keeps_ray_chatter_out_of_stderr(tmp_path):
    """A healthy fit and score (one local cluster, as `whence` starts it) print no ERROR line and none of Ray's
    notices: no core_worker "constructor arguments in the object store", no "Progress bars disabled"."""
    space = write_workspace(tmp_path)
    factors, out = tmp_path / "factors", tmp_path / "results"
    script = (
        "import sys\nfrom flows.cli import main\n"
        f"assert main(['fit', '--model', {space['model']!r}, '--corpus', {space['corpus']!r}, '--out', "
        f"{str(factors)!r}, '--seq-len', '16', '--max-sequences', '24']) == 0\n"
        f"sys.exit(main(['score', '--model', {space['model']!r}, '--factors', {str(factors)!r}, '--queries', "
        f"{space['queries']!r}, '--corpus', {space['corpus']!r}, '--out', {str(out)!r}, '--top-k', '2', "
        "'--tfidf-candidates', '0', '--per-token']))\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    noisy = [line for line in run.stderr.splitlines()
             if "ERROR" in line or "core_worker" in line or "Progress bars" in line or "Traceback" in line
             or "Set ray log level" in line]
    assert not noisy, "\n".join(noisy)
    assert len(pq.read_table(out / "topk.parquet")) == 2 * len(QUERIES)
    pieces = pq.read_table(out / "tokens.parquet").column("tokens").to_pylist()
    assert pieces and not any("\ufffd" in piece for row in pieces for piece in row)
