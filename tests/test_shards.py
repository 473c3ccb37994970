"""Model shards: factors and scores from a model split into pipeline stages equal the unsharded ones (float64).

In-process (whence.shards.ShardedPipeline) for every family and 1, 2, 3 stages; on Ray for one family: the
ShardedWorker (actors.sharded_worker), including a stage actor killed in the middle of a pass, and the sharded Ray
Data scoring stage (actors.scorer.ShardedSequenceScorer) against the unsharded one.
"""

import time

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2Model,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.tiny import TEXTS, make_model
from whence import ModelError
from whence.api import sequence_batches
from whence.factors import LayerBasis
from whence.fitting import FactorFitter, eigendecompose
from whence.model import find_tracked_layers
from whence.queries import factorise, query_gradients
from whence.refine import FisherVectorProduct
from whence.scoring import QueryScorer
from whence.shards import (
    BACKWARD,
    FORWARD,
    ShardedPipeline,
    balance_blocks,
    pipeline_schedule,
    plan_stages,
    select_layers,
    split_model,
    stage_order,
)
from whence.text import Query, iter_sequences

FLOAT64 = dict(atol=1e-10, rtol=1e-9)
NUM_BLOCKS = 3  # so that 1, 2 and 3 stages are all possible
QUERIES = [Query("whale", "The whale swam far", " beyond the harbour"), Query("fox", "A quick brown", " fox jumps"),
           Query("union", "The state of the union", " is strong")]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their spin-waits cost 10x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def batches_of(tokenizer, seq_len=12, batch_size=5, texts=TEXTS):
    sequences = list(iter_sequences(tokenizer, enumerate(texts), seq_len))
    return [batch for _, batch in sequence_batches(tokenizer, sequences, batch_size, seed=3)]


def fit_sums(fitter, batches):
    """(covariance, bases, corrections) from a FactorFitter-like object, EK-FAC recipe."""
    for batch in batches:
        fitter.covariance_step(batch)
    covariance = fitter.take_covariance()
    bases = eigendecompose(covariance)
    fitter.set_bases(bases)
    for batch in batches:
        fitter.correction_step(batch)
    return covariance, bases, fitter.take_corrections()


def assert_sums_equal(actual, expected):
    covariance, _, corrections = actual
    ref_covariance, _, ref_corrections = expected
    assert (covariance.tokens, covariance.sequences) == (ref_covariance.tokens, ref_covariance.sequences)
    assert list(covariance.activation) == list(ref_covariance.activation), "layers in model order"
    for name in ref_covariance.activation:
        for mine, theirs in zip(covariance.activation[name] + covariance.gradient[name],
                                ref_covariance.activation[name] + ref_covariance.gradient[name]):
            torch.testing.assert_close(mine, theirs, **FLOAT64)
    assert corrections.sequences == ref_corrections.sequences
    assert list(corrections.sums) == list(ref_corrections.sums)
    for name, theirs in ref_corrections.sums.items():
        torch.testing.assert_close(corrections.sums[name], theirs, **FLOAT64)


def prepared_queries(model, tokenizer, layers, rank="full"):
    """Raw query gradients stand in for preconditioned ones: the kernel is the same bilinear form."""
    gradients = query_gradients(model, tokenizer, layers, QUERIES)
    return factorise([q.id for q in QUERIES], gradients, rank)


def assert_scores_equal(actual, expected):
    torch.testing.assert_close(actual.total, expected.total, **FLOAT64)
    torch.testing.assert_close(actual.per_layer, expected.per_layer, **FLOAT64)
    if expected.per_token is not None:
        torch.testing.assert_close(actual.per_token, expected.per_token, **FLOAT64)


# ---------------------------------------------------------------------------------------------------------
# In-process


def test_factors_with_1_2_3_stages_equal_the_unsharded_fitter(family, tokenizer):
    model = make_model(family, len(tokenizer), layers=NUM_BLOCKS)
    layers = find_tracked_layers(model, "all")  # attention layers too: every block position is exercised
    batches = batches_of(tokenizer)
    assert any((b["attention_mask"] == 0).any() for b in batches), "some batches should be padded"
    expected = fit_sums(FactorFitter(model, layers), batches)
    for num_stages in (1, 2, 3):
        pipeline = ShardedPipeline(model, layers, num_stages, micro_batch_size=2)
        assert_sums_equal(fit_sums(pipeline, batches), expected)
    checkpointed = ShardedPipeline.checkpointed(model, layers)  # a stage per block, each recomputed at its backward
    assert [stage.block_range for stage in checkpointed.stages] == [(0, 1), (1, 2), (2, 3)]
    assert_sums_equal(fit_sums(checkpointed, batches), expected)
    assert all(p.grad is None for p in model.parameters()), "no weight gradient is ever computed"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad is restored"


@pytest.mark.parametrize("modules", ["mlp", r"(mlp\.|lm_head)"])
def test_the_last_stage_runs_its_head_one_sequence_at_a_time(tokenizer, monkeypatch, modules):
    """With room for one sequence's logits (HEAD_GROUP_BYTES), the last stage differentiates its LM head sequence by
    sequence, keeping the gradient at the final norm for the backward pass: the same sums and scores. A tracked
    head (its per-batch capture) runs on the whole batch."""
    import whence.shards.schedule

    monkeypatch.setattr(whence.shards.schedule, "HEAD_GROUP_BYTES", 1)
    model = make_model("llama", len(tokenizer), layers=2)
    layers = find_tracked_layers(model, modules)
    assert any("lm_head" in layer.name for layer in layers) == (modules != "mlp")
    batches = batches_of(tokenizer)[:3]
    expected = fit_sums(FactorFitter(model, layers), batches)
    queries = prepared_queries(model, tokenizer, layers)
    scorer = QueryScorer(model, layers, queries)
    for pipeline in (ShardedPipeline(model, layers, 2), ShardedPipeline.checkpointed(model, layers)):
        assert_sums_equal(fit_sums(pipeline, batches), expected)
        pipeline.set_queries(queries)
        for batch in batches:
            assert_scores_equal(pipeline.score(batch, per_token=True), scorer.score(batch, per_token=True))


@pytest.mark.parametrize("rank", [2, "full"])
def test_scores_with_1_2_3_stages_equal_the_query_scorer(family, tokenizer, rank):
    model = make_model(family, len(tokenizer), layers=NUM_BLOCKS)
    layers = find_tracked_layers(model, "mlp")
    queries = prepared_queries(model, tokenizer, layers, rank)
    scorer = QueryScorer(model, layers, queries)
    batches = batches_of(tokenizer, batch_size=4)
    expected = [scorer.score(batch, per_token=True) for batch in batches]
    pipelines = [ShardedPipeline(model, layers, num_stages, micro_batch_size=3) for num_stages in (1, 2, 3)]
    for pipeline in pipelines + [ShardedPipeline.checkpointed(model, layers, micro_batch_size=3)]:
        pipeline.set_queries(queries)
        for batch, reference in zip(batches, expected):
            assert_scores_equal(pipeline.score(batch, per_token=True), reference)
            assert pipeline.score(batch).per_token is None
            torch.testing.assert_close(pipeline.score(batch).total, reference.total, **FLOAT64)


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_llama_family_variants_with_sliding_windows(tokenizer, name):
    """Mistral (one sliding-window mask for all layers) and Qwen2 (per-layer full / sliding masks)."""
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=NUM_BLOCKS,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=0, sliding_window=4)
    if name == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, max_window_layers=1))
        assert "sliding_attention" in model.config.layer_types and "full_attention" in model.config.layer_types
    model = model.to(torch.float64).eval()
    layers = find_tracked_layers(model, "mlp")
    queries = prepared_queries(model, tokenizer, layers)
    batches = batches_of(tokenizer, batch_size=4)[:2]
    expected = [QueryScorer(model, layers, queries).score(b, per_token=True) for b in batches]
    pipeline = ShardedPipeline(model, layers, 3)
    pipeline.set_queries(queries)
    for batch, reference in zip(batches, expected):
        assert_scores_equal(pipeline.score(batch, per_token=True), reference)


def test_stages_without_tracked_layers_pass_gradients_through(tokenizer):
    """Only block 1 is tracked: stages 0 and 2 hold no tracked layer but still carry the pipeline."""
    model = make_model("gpt2", len(tokenizer), layers=NUM_BLOCKS)
    layers = find_tracked_layers(model, r"^transformer\.h\.1\.mlp\.")
    batches = batches_of(tokenizer)[:3]
    pipeline = ShardedPipeline(model, layers, 3)
    assert [len(stage.layers) for stage in pipeline.stages] == [0, 2, 0]
    assert_sums_equal(fit_sums(pipeline, batches), fit_sums(FactorFitter(model, layers), batches))
    queries = prepared_queries(model, tokenizer, layers)
    pipeline.set_queries(queries)
    scorer = QueryScorer(model, layers, queries)
    for batch in batches:
        assert_scores_equal(pipeline.score(batch, per_token=True), scorer.score(batch, per_token=True))


def test_stages_hold_contiguous_blocks_and_their_own_layers(tokenizer):
    model = make_model("llama", len(tokenizer), layers=4)
    layers = find_tracked_layers(model, "mlp")
    stages = split_model(model, 3, layers)
    assert [s.block_range for s in stages] == plan_stages(model, 3)
    assert [s.block_range[0] for s in stages[1:]] == [s.block_range[1] for s in stages[:-1]]
    assert [s.positions for s in stages] == [[i for i, layer in enumerate(layers) if layer in s.layers] for s in stages]
    assert sum((s.positions for s in stages), []) == list(range(len(layers)))
    assert "embed" in stages[0].parts and "embed" not in stages[1].parts and "head" in stages[-1].parts
    first, last = stages[0].memory_report(), stages[-1].memory_report()
    assert first["weights"] > 0 and last["weights"] > 0 and first["queries"] == 0
    # A pass's sums are allocated at its first micro-batch, and handed over whole: none before, none after.
    assert first["factors"] == 0
    pipeline = ShardedPipeline(model, layers, 3)
    pipeline.covariance_step(batches_of(tokenizer)[0])
    assert all(stage.memory_report()["factors"] > 0 for stage in pipeline.stages if stage.layers)
    pipeline.take_covariance()
    assert all(stage.memory_report()["factors"] == 0 for stage in pipeline.stages)


def test_balanced_split():
    assert balance_blocks([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balance_blocks([1, 1, 1, 1], 2, first_extra=2) == [(0, 1), (1, 4)]
    assert balance_blocks([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert balance_blocks([1, 2, 3], 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError):
        balance_blocks([1, 2], 3)


def test_unsplittable_models_raise_model_error(tokenizer):
    model = make_model("gpt2", len(tokenizer), layers=2)
    with pytest.raises(ModelError, match="3 stages.*2 transformer blocks"):
        split_model(model, 3)
    headless = GPT2Model(GPT2Config(vocab_size=50, n_embd=8, n_layer=2, n_head=2))
    with pytest.raises(ModelError, match="GPT2Model"):
        split_model(headless, 2)
    with pytest.raises(ModelError, match="Sequential"):
        split_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1)


def test_a_family_registers_itself_by_subclassing_architecture(tokenizer):
    """Adding a family is one Architecture subclass: defining it makes its model types splittable."""
    from whence.shards import ARCHITECTURES, MODEL_TYPES, architecture_of
    from whence.shards.families.gpt2 import GPT2

    assert {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "mistral": "llama", "qwen2": "llama",
            "qwen3": "llama"}.items() <= MODEL_TYPES.items()
    model = make_model("gpt2", len(tokenizer), layers=2)
    model.config.model_type = "renamed_gpt2"
    with pytest.raises(ModelError, match="renamed_gpt2"):
        architecture_of(model)
    try:
        class RenamedGPT2(GPT2, family="renamed_gpt2", model_types=("renamed_gpt2",)):
            pass

        assert architecture_of(model) is ARCHITECTURES["renamed_gpt2"]
        assert [s.block_range for s in split_model(model, 2)] == [(0, 1), (1, 2)]
    finally:
        ARCHITECTURES.pop("renamed_gpt2", None)
        MODEL_TYPES.pop("renamed_gpt2", None)


def test_schedule_is_one_forward_one_backward_and_respects_dependencies():
    ids = list(range(6))
    assert stage_order(ids, 2, 3) == [(FORWARD, 0), (BACKWARD, 0), (FORWARD, 1), (BACKWARD, 1), (FORWARD, 2),
                                      (BACKWARD, 2), (FORWARD, 3), (BACKWARD, 3), (FORWARD, 4), (BACKWARD, 4),
                                      (FORWARD, 5), (BACKWARD, 5)]
    assert stage_order(ids, 0, 3)[:4] == [(FORWARD, 0), (FORWARD, 1), (FORWARD, 2), (BACKWARD, 0)]
    schedule = pipeline_schedule(ids, 3)
    position = {op: i for i, op in enumerate(schedule)}
    for kind, k, mb in schedule:
        if kind == FORWARD and k > 0:
            assert position[FORWARD, k - 1, mb] < position[kind, k, mb]
        if kind == BACKWARD:
            assert position[FORWARD, k, mb] < position[kind, k, mb]
            if k < 2:
                assert position[BACKWARD, k + 1, mb] < position[kind, k, mb]
    # micro-batch 1 enters stage 0 before micro-batch 0 leaves the pipeline: stages overlap
    assert position[FORWARD, 0, 1] < position[BACKWARD, 0, 0]


def test_select_layers_keeps_the_named_layers(tokenizer):
    model = make_model("gpt2", len(tokenizer), layers=2)
    layers = find_tracked_layers(model, "mlp")
    queries = prepared_queries(model, tokenizer, layers, rank=2)
    names = [layers[2].name, layers[3].name]
    subset = select_layers(queries, names)
    assert subset.layer_names == names and subset.query_ids == queries.query_ids
    assert subset.left[names[0]] is queries.left[names[0]] and set(subset.left) == set(names)


# ---------------------------------------------------------------------------------------------------------
# Ray


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("sharded") / "model"
    make_model("llama", len(tokenizer), layers=NUM_BLOCKS).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_stage_actors_on_ray_survive_a_killed_stage(ray_cluster, saved_model, tokenizer):
    ray = ray_cluster
    from actors.hosting import ModelSpec
    from actors.sharded_worker import ShardedWorker, ShardOptions
    from whence.model import load_causal_lm

    model, _ = load_causal_lm(saved_model, device="cpu", dtype="float64")
    layers = find_tracked_layers(model, "mlp")
    batches = batches_of(tokenizer, batch_size=3)[:4]
    expected = fit_sums(FactorFitter(model, layers), batches)
    queries = prepared_queries(model, tokenizer, layers, rank=2)
    expected_scores = [QueryScorer(model, layers, queries).score(b, per_token=True) for b in batches]

    worker = ShardedWorker(ModelSpec(saved_model, "mlp", "float64"), 3,
                           options=ShardOptions(micro_batch_size=2, max_in_flight=3, checkpoint_every=3,
                                                num_threads=1))
    assert [layer["name"] for layer in worker.layers] == [layer.name for layer in layers]
    assert len(worker.memory_reports) == 3 and all(r["weights"] > 0 for r in worker.memory_reports)
    worker.reset_timing()

    # Covariance in two calls: the sums are collected from the stages in between (checkpoint_every).
    worker.covariance_steps(batches[:2])
    worker.covariance_steps(batches[2:])
    covariance = worker.take_covariance()
    bases: dict[str, LayerBasis] = eigendecompose(covariance)
    worker.set_bases(bases)

    # Stage 2 dies once the correction pass's first micro-batch is in and the others are in flight: it loses
    # its bases, its sums and its graphs.
    def kill_once(kind, micro_batch_id):
        if kind == "correction" and worker.on_micro_batch is kill_once:
            worker.on_micro_batch = None
            ray.kill(worker.stages[2], no_restart=False)

    worker.on_micro_batch = kill_once
    worker.correction_steps(batches)
    corrections = worker.take_corrections()
    assert worker.restarts_seen == 1, "the kill was noticed and recovered from"
    assert_sums_equal((covariance, bases, corrections), expected)

    worker.set_queries(queries)
    ray.kill(worker.stages[0], no_restart=False)  # the restarted stage gets its queries again
    scores = worker.score_batches(batches, per_token=True)
    for actual, reference in zip(scores, expected_scores):
        assert_scores_equal(actual, reference)
    assert worker.restarts_seen == 2

    # ekfac-cg's Fisher-vector product over the stages (whence.refine); stage 1 dies once the pass's first
    # micro-batch is in: its product sums are lost, so the pass runs again from the start.
    generator = torch.Generator().manual_seed(4)
    v = {layer.name: torch.randn(2, layer.d_out, layer.d_in, generator=generator, dtype=torch.float64)
         for layer in layers}
    expected_product = FisherVectorProduct(model, layers, lambda: iter(batches))(v)

    def kill_in_product(kind, micro_batch_id):
        if kind == "product" and worker.on_micro_batch is kill_in_product:
            worker.on_micro_batch = None
            ray.kill(worker.stages[1], no_restart=False)

    worker.on_micro_batch = kill_in_product
    product = worker.fisher_vector_product(lambda: iter(batches), v)
    assert worker.restarts_seen == 3
    assert list(product) == list(expected_product)
    for name, theirs in expected_product.items():
        torch.testing.assert_close(product[name], theirs, **FLOAT64)
    timings = worker.stage_timings()
    assert [t["stage"] for t in timings] == [0, 1, 2]
    assert all(t["idle_s"] >= 0 and t["busy_s"] > 0 for t in timings)
    assert worker.describe()["fingerprint"] == worker.fingerprint
    worker.shutdown()


def test_sharded_ray_data_stage_equals_the_unsharded_one(ray_cluster, saved_model, tokenizer, tmp_path):
    """actors.scorer: ShardedSequenceScorer (the model over 2 stage actors) gives the columns SequenceScorer
    gives, marker rows included."""
    import numpy as np

    from actors.hosting import ModelSpec
    from actors.scorer import SequenceScorer, ShardedSequenceScorer
    from actors.sharded_worker import ShardOptions
    from whence.model import load_causal_lm

    model, _ = load_causal_lm(saved_model, device="cpu", dtype="float64")
    layers = find_tracked_layers(model, "mlp")
    queries_path = tmp_path / "queries.safetensors"
    prepared_queries(model, tokenizer, layers, rank=2).save(queries_path)
    sequences = list(iter_sequences(tokenizer, enumerate(TEXTS), 12))[:7]
    rows = len(sequences) + 1  # the last row marks the end of the fragment: no tokens, marker_total >= 0
    input_ids = np.empty(rows, dtype=object)
    input_ids[:] = [np.asarray(s.input_ids, dtype=np.int64) for s in sequences] + [np.zeros(0, dtype=np.int64)]
    batch = {"input_ids": input_ids, "doc_id": np.asarray([str(s.doc_id) for s in sequences] + [""], dtype=object),
             "chunk": np.asarray([s.chunk for s in sequences] + [-1]), "fragment": np.zeros(rows, dtype=np.int64),
             "marker_total": np.asarray([-1] * len(sequences) + [len(sequences)])}

    spec = ModelSpec(saved_model, "mlp", "float64")
    expected = SequenceScorer(spec, str(queries_path), per_token=True, batch_size=3, num_threads=1)(batch)
    sharded = ShardedSequenceScorer(spec, str(queries_path), per_token=True, shards=2, batch_size=2,
                                    options=ShardOptions(micro_batch_size=2, num_threads=1))
    actual = sharded(batch)
    sharded.worker.shutdown()
    assert set(actual) == set(expected)
    for name in ("scores", "layer_scores"):
        np.testing.assert_allclose(actual[name], expected[name], **FLOAT64)
    for mine, theirs in zip(actual["token_scores"], expected["token_scores"]):
        np.testing.assert_allclose(mine, theirs, **FLOAT64)
    for name in ("fragment", "doc_id", "chunk", "marker_total", "num_tokens"):
        assert list(actual[name]) == list(expected[name])


def test_stages_own_their_layers_sums_and_a_restarted_stage_loses_none_silently(ray_cluster, saved_model, tokenizer,
                                                                               tmp_path):
    """`whence fit --shards`: after a pass each stage holds its layers' sums (the pipeline's worker none) and
    finishes them as their owner, writing the layers' files; a stage that restarts after the pass has lost its
    sums, which is an error the fit reruns the pass for (actors.owner.SumsLost), never a silent gap."""
    import numpy as np

    from actors.hosting import ModelSpec, pad_id_of, rows_to_batch
    from actors.owner import SumsLost
    from actors.sharded_worker import ShardedWorker, ShardOptions
    from whence.factor_files import read_basis
    from whence.factor_owners import COVARIANCE, FinishJob
    from whence.model import load_causal_lm

    ray = ray_cluster
    sequences = list(iter_sequences(tokenizer, enumerate(TEXTS), 12))[:7]
    rows = [{"input_ids": np.asarray(s.input_ids, dtype=np.int64), "doc_id": str(s.doc_id), "chunk": s.chunk,
             "fragment": 0, "marker_total": -1} for s in sequences]
    dataset = ray.data.from_items(rows)
    model, _ = load_causal_lm(saved_model, device="cpu", dtype="float64")
    layers = find_tracked_layers(model, "mlp")
    fitter = FactorFitter(model, layers)
    for batch in dataset.iter_batches(batch_size=3, batch_format="numpy"):  # as the worker cuts its split
        fitter.covariance_step(rows_to_batch(batch, np.ones(len(batch["chunk"]), bool), pad_id_of(tokenizer), 0))
    expected = eigendecompose(fitter.take_covariance())

    worker = ShardedWorker(ModelSpec(saved_model, "mlp", "float64"), 2, batch_size=3,
                           options=ShardOptions(micro_batch_size=2, num_threads=1))
    names = [layer.name for layer in layers]
    job = lambda counts: FinishJob(str(tmp_path), "ekfac", "float64", counts["tokens"], counts["sequences"])  # noqa: E731
    counts = worker.covariance_pass(dataset)
    assert counts["sequences"] == len(sequences) and worker.held == {}, "the sums stay on the stages"
    before = ray.get(worker.stages[1].state.remote())["incarnation"]
    ray.kill(worker.stages[1], no_restart=False)
    for _ in range(600):  # until the restarted stage answers (a call meanwhile is a RayActorError: the pass reruns
        try:             # too); the old process may still answer just after the kill, hence the incarnation
            if ray.get(worker.stages[1].state.remote())["incarnation"] != before:
                break
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.5)
    with pytest.raises(SumsLost):
        worker.finish(COVARIANCE, names, 0, [None], job(counts))
    counts = worker.covariance_pass(dataset)  # what FitterPool.step does on SumsLost: the pass again
    records = worker.finish(COVARIANCE, names, 0, [None], job(counts))
    assert sorted(records) == sorted(names)
    for name in names:
        torch.testing.assert_close(read_basis(tmp_path, name).activation_values, expected[name].activation_values,
                                   **FLOAT64)
        torch.testing.assert_close(read_basis(tmp_path, name).gradient_values, expected[name].gradient_values,
                                   **FLOAT64)
    peaks = worker.stage_peaks()
    assert [p["stage"] for p in peaks] == [0, 1] and all("covariance finish" in p["phases"] for p in peaks)
    worker.shutdown()
