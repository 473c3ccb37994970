"""LayerOwner: the part of a fitting actor (FitterActor, or a ShardedWorker's pipeline) that owns layers.

After a pass an actor keeps its partial sums (`held[kind]`) instead of returning them. The driver then asks each
actor for its parts of the layers other actors own (`export`: an ObjectRef per layer, which the driver only
passes on) and each owner for its layers (`finish`): the owner fetches the parts from the object store one layer
at a time, adds them in worker order, eigendecomposes or normalises, and writes the layer's files itself
(whence.factor_owners). Bases for the correction pass go out the same way: `load_bases` returns an owner's
layers' bases, read back from the files it wrote, as one object every actor fetches.

A mixin: the actor class sets `self.held = {}` and fills it at the end of each pass.
"""

from __future__ import annotations

from whence.factor_files import read_basis
from whence.factor_owners import COVARIANCE, FinishJob, finish_layers
from whence.factors import CovarianceSums, LambdaSums, LayerBasis


def pop_layer(sums: CovarianceSums | LambdaSums, name: str) -> CovarianceSums | LambdaSums:
    """One layer's sums, removed from `sums` (so this process stops holding them once they are handed over)."""
    if isinstance(sums, CovarianceSums):
        return CovarianceSums({name: sums.activation.pop(name)}, {name: sums.gradient.pop(name)},
                              sums.tokens, sums.sequences)
    return LambdaSums({name: sums.sums.pop(name)}, sums.sequences)


class LayerOwner:
    held: dict[str, CovarianceSums | LambdaSums]

    def export(self, kind: str, name: str) -> CovarianceSums | LambdaSums:
        """This actor's part of layer `name` from its last `kind` pass, handed over (dropped here)."""
        return pop_layer(self.held[kind], name)

    def finish(self, kind: str, names: list[str], position: int, parts: list, job: FinishJob) -> dict[str, dict]:
        """Reduce, finish and write the layers `names` this actor owns. parts[w]: {name: ObjectRef of worker w's
        part} (None at this actor's own `position`). Returns the layers' manifest records."""
        import ray

        def fetch(worker: int, name: str):
            if worker == position:
                return pop_layer(self.held[kind], name)
            return ray.get(parts[worker][name])

        return finish_layers(kind, names, len(parts), fetch, job, self.eigh_device() if kind == COVARIANCE else None)

    def load_bases(self, directory: str, names: list[str]) -> dict[str, LayerBasis]:
        """The bases of `names` as this owner wrote them (checksums verified), for every actor's correction pass."""
        return {name: read_basis(directory, name) for name in names}

    def eigh_device(self):
        """Where the owner's eigendecompositions run (default: the CPU, where its sums are)."""
        return None

    def drop_held(self) -> None:
        self.held = {}

    def peak_rss(self) -> int:
        """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
        return peak_rss()


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
