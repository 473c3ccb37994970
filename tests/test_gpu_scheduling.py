"""On a cluster with fewer GPUs than actors (one GPU, two workers, two shards), every actor and task still gets
scheduled: workers, stages and the eigendecompositions share the GPU instead of waiting for GPUs that a fixed
cluster never gets. Runs its own Ray in a subprocess that advertises one GPU (Ray sets CUDA_VISIBLE_DEVICES for
the actors; without a real GPU torch runs them on the CPU, so only the scheduling is under test here; the
GPU computation itself is tests/test_cuda.py's)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import ray
    from flows.cluster import ClusterSettings
    from flows.fit import fit_corpus
    from flows.score import score_corpus
    from tests.pipeline_fixtures import write_workspace
    from whence import FitConfig, ScoreConfig

    root = Path(sys.argv[1])
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    # Four documents a fragment (131 sequences): every worker and stage still gets fragments and batches.
    space = write_workspace(root, per_fragment=4)
    factors = str(root / "factors")
    plain, sharded = ClusterSettings(workers=2, dtype="float64"), ClusterSettings(workers=2, shards=2, dtype="float64")
    fit_corpus(space["model"], [space["corpus"]], factors, FitConfig(seq_len=16, batch_size=4), plain)
    fit_corpus(space["model"], [space["corpus"]], str(root / "factors_sharded"), FitConfig(seq_len=16, batch_size=4),
               sharded)
    # Scoring with 2 pipelines of 2 stages: every sequence the fit read is scored (no TF-IDF filter).
    config = ScoreConfig(top_k=3, tfidf_candidates=0, query_rank=4, batch_size=4)
    counts = {"sharded": score_corpus(space["model"], factors, space["queries"], [space["corpus"]],
                                      str(root / "sharded"), config, sharded)["sequences_scored"],
              "fitted": json.loads((Path(factors) / "manifest.json").read_text())["sequences"]}
    # Two pipelines of two stages: each stage owned its layers, and the parts crossed between the pipelines' stages.
    from whence.factors import Factors
    import torch
    one, two = Factors.load(factors), Factors.load(root / "factors_sharded")
    counts["sharded_factors_equal"] = all(torch.allclose(one.eigenvalues[n], two.eigenvalues[n], rtol=1e-9, atol=1e-12)
                                          for n in one.layer_names)
    # Through a file, not stdout: on a loaded machine Ray's memory-pressure warnings can be the last line printed.
    (root / "counts.json").write_text(json.dumps(counts))
""")


def test_one_gpu_is_shared_by_two_workers_and_two_stages(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)  # a scheduling deadlock would hang: the timeout turns it into a failure
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["sharded"] == counts["fitted"] > 0
    assert counts["sharded_factors_equal"], "2 workers x 2 stages fit the factors 2 workers fit"
