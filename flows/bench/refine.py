"""`whence bench` measurement "refine": what ekfac-cg (whence.refine) costs over EK-FAC, in process.

    refine_vs_ekfac_preparation     seconds of ekfac-cg query preparation (DEFAULT_REFINE_STEPS PCG steps over
                                    REFINE_BATCHES fit batches)  /  seconds of EK-FAC query preparation
    refine_product_vs_training      seconds of one Fisher-vector product pass (all queries)  /  seconds of plain
                                    training steps over the same batches
    refine_scoring_vs_ekfac_scoring scoring tokens/s with ekfac-cg's prepared queries / with EK-FAC's: the stored
                                    format is the same (rank r), so this should be 1 up to timing noise

Preparation grows by about K forward and backward passes over the M fitting sequences; scoring does not change.
"""

from __future__ import annotations

from collections.abc import Callable

from flows.bench.configs import QUERIES
from flows.bench.timing import best_times, time_call, training_step

RANK = 32  # the default query rank: both methods' queries are stored this way
REFINE_BATCHES = 2  # of the config's fit batches: ekfac-cg's M fitting sequences (K passes over them)


def refine_cost(bench, report: Callable[[str], None] = print) -> tuple[dict, dict]:
    """(figures, details) of the three ratios above, on the bench model with its factors and fit batches."""
    from whence.queries import HostedModel, prepare_queries
    from whence.refine import DEFAULT_REFINE_STEPS, FisherVectorProduct, RefineSettings
    from whence.scoring import QueryScorer

    bench.ensure_factors()
    bench.ensure_tokenizer()
    hosted, factors, device, batches = (HostedModel(bench.model, bench.tokenizer, bench.layers), bench.factors,
                                        bench.device, bench.batches[:REFINE_BATCHES])
    repeats = bench.config.repeats
    settings = RefineSettings(DEFAULT_REFINE_STEPS, tolerance=0.0)  # every step, as a run that does not converge
    result = {}

    def ekfac():
        result["ekfac"] = prepare_queries(hosted, factors, QUERIES, RANK)

    def refined():
        result["ekfac-cg"] = prepare_queries(hosted, factors, QUERIES, RANK, method="ekfac-cg",
                                             fitting=lambda: iter(batches), refine=settings)

    ekfac_s = best_times({"ekfac": ekfac}, repeats, device)["ekfac"]
    refine_s = time_call(refined, device)  # K passes over the batches: long enough to time once
    product = FisherVectorProduct(bench.model, bench.layers, lambda: iter(batches))
    directions = {n: result["ekfac"].matrices(n) for n in result["ekfac"].layer_names}  # (Q, d_out, d_in)
    times = best_times({"product": lambda: product(directions),
                        "train": lambda: [training_step(bench.model, b) for b in batches]}, repeats, device)
    scorers = {name: QueryScorer(bench.model, bench.layers, prepared) for name, prepared in result.items()}
    for scorer in scorers.values():
        scorer.score(batches[0])  # warm-up, as in the scoring measurement
    scoring = best_times({name: (lambda s=scorer: s.score(batches[0])) for name, scorer in scorers.items()},
                         repeats, device)
    figures = {"refine_vs_ekfac_preparation": refine_s / ekfac_s,
               "refine_product_vs_training": times["product"] / times["train"],
               "refine_scoring_vs_ekfac_scoring": scoring["ekfac"] / scoring["ekfac-cg"]}
    sequences = sum(int(b["input_ids"].shape[0]) for b in batches)
    details = {"steps": DEFAULT_REFINE_STEPS, "sequences": sequences, "queries": len(QUERIES), "rank": RANK,
               "ekfac_prepare_s": ekfac_s, "refine_prepare_s": refine_s, "product_s": times["product"],
               "train_s": times["train"], "score_ekfac_s": scoring["ekfac"], "score_refine_s": scoring["ekfac-cg"],
               "max_relative_residual": result["ekfac-cg"].diagnostics["max_relative_residual"]}
    report(f"  refine_vs_ekfac_preparation: {figures['refine_vs_ekfac_preparation']:.1f} (ekfac-cg {refine_s:.2f}s = "
           f"{DEFAULT_REFINE_STEPS} steps over {sequences} sequences, EK-FAC {ekfac_s:.3f}s); one product "
           f"{figures['refine_product_vs_training']:.2f}x training over the batches; scoring "
           f"{figures['refine_scoring_vs_ekfac_scoring']:.2f}x EK-FAC's")
    return figures, details
