"""LayerOwner: the part of a fitting actor (FitterActor, or a ShardedWorker's pipeline) that owns layers.

After a pass an actor keeps its partial sums (`held[kind]`) instead of returning them. The driver then asks each
actor for its parts of the layers other actors own (`export`: an ObjectRef per layer, which the driver only
passes on) and each owner for its layers (`finish`): the owner fetches the parts from the object store one layer
at a time, adds them in worker order, eigendecomposes or normalises, and writes the layer's files itself
(whence.factor_owners). Bases for the correction pass go out the same way: `load_bases` returns an owner's
layers' bases, read back from the files it wrote, as objects every actor fetches (one per layer, as numpy arrays
already in the actors' compute dtype: the object store hands numpy arrays to every reader without a copy, where a
torch tensor is pickled, so a process that wrote and read the bases held them four times, float64).

A mixin: the actor class sets `self.held = {}` and fills it at the end of each pass. `phase(name)` records the
process's peak resident memory during each phase (covariance pass, covariance finish, bases, correction pass,
correction finish) for the manifest, beside whence.memory_estimate's prediction.
"""

from __future__ import annotations

from contextlib import contextmanager

from whence.factor_files import read_basis
from whence.factor_owners import COVARIANCE, FinishJob, finish_layers
from whence.factors import CovarianceSums, LambdaSums, LayerBasis
from whence.storage import Location


def pop_layer(sums: CovarianceSums | LambdaSums, name: str) -> CovarianceSums | LambdaSums:
    """One layer's sums, removed from `sums` (so this process stops holding them once they are handed over)."""
    if isinstance(sums, CovarianceSums):
        return CovarianceSums({name: sums.activation.pop(name)}, {name: sums.gradient.pop(name)},
                              sums.tokens, sums.sequences)
    return LambdaSums({name: sums.sums.pop(name)}, sums.sequences)


class SumsLost(RuntimeError):
    """An owner no longer holds its sums of a pass (its process restarted after the pass): the pass runs again
    (flows.fit_pool.FitterPool.step)."""


class LayerOwner:
    held: dict[str, CovarianceSums | LambdaSums]

    def export(self, kind: str, name: str) -> CovarianceSums | LambdaSums:
        """This actor's part of layer `name` from its last `kind` pass, handed over (dropped here)."""
        return pop_layer(self._held(kind), name)

    def _held(self, kind: str) -> CovarianceSums | LambdaSums:
        if kind not in self.held:
            raise SumsLost(f"this process holds no {kind} sums (it restarted after the pass)")
        return self.held[kind]

    def finish(self, kind: str, names: list[str], position: int, parts: list, job: FinishJob) -> dict[str, dict]:
        """Reduce, finish and write the layers `names` this actor owns. parts[w]: {name: ObjectRef of worker w's
        part} (None at this actor's own `position`). Returns the layers' manifest records."""
        import ray

        def fetch(worker: int, name: str):
            if worker == position:
                return pop_layer(self._held(kind), name)
            part = ray.get(parts[worker][name])
            # A pipeline's part comes from the stage holding the layer: its export answers with that stage's ref.
            return ray.get(part) if isinstance(part, ray.ObjectRef) else part

        with self.phase(f"{kind} finish"):
            return finish_layers(kind, names, len(parts), fetch, job,
                                 self.eigh_device() if kind == COVARIANCE else None)

    def load_bases(self, directory: str | Location, names: list[str], dtype: str | None = None) -> dict[str, dict]:
        """The bases of `names` as this owner wrote them (checksums verified), for every actor's correction pass:
        {name: basis_for_transfer(basis, dtype)}, read one layer at a time."""
        with self.phase("bases"):
            return {name: basis_for_transfer(read_basis(directory, name), dtype) for name in names}

    def eigh_device(self):
        """Where the owner's eigendecompositions run (default: the CPU, where its sums are)."""
        return None

    def drop_held(self) -> None:
        self.held = {}
        release_free_memory()

    def peak_rss(self) -> int:
        """This process's peak resident memory so far, in bytes (over every phase, and since the last one)."""
        return max(peak_rss(), getattr(self, "earlier_peak", 0))

    def phase_peaks(self) -> dict[str, int]:
        """{phase: peak resident bytes during its last run} (this process's runs only: a restart starts over)."""
        return dict(getattr(self, "phase_peaks_seen", {}))

    @contextmanager
    def phase(self, name: str):
        """Record the peak resident memory while the block runs as phase `name` (begin_phase, end_phase)."""
        self.begin_phase()
        try:
            yield
        finally:
            self.end_phase(name)

    def begin_phase(self) -> None:
        """A phase starts: the kernel's high-water mark is reset (where Linux allows it; elsewhere the phase's
        peak is the peak so far, an upper bound), the peak before it kept for peak_rss."""
        self.earlier_peak = self.peak_rss()
        reset_peak_rss()

    def end_phase(self, name: str) -> None:
        """Record the peak since begin_phase as phase `name`'s."""
        self.phase_peaks_seen = {**self.phase_peaks(), name: peak_rss()}


def basis_for_transfer(basis: LayerBasis, dtype: str | None = None) -> dict:
    """A basis as numpy arrays, its eigenvectors cast to `dtype` (default: as stored; the cast is the one
    FactorFitter.set_bases makes, so the rotations see the same numbers) and its eigenvalues as stored."""
    import torch

    def vectors(blocks):
        return [q.to(getattr(torch, dtype) if dtype else q.dtype).numpy() for q in blocks]

    return {"activation_vectors": vectors(basis.activation_vectors), "activation_values": basis.activation_values.numpy(),
            "gradient_vectors": vectors(basis.gradient_vectors), "gradient_values": basis.gradient_values.numpy()}


def basis_from_transfer(arrays: dict) -> LayerBasis:
    """The LayerBasis of basis_for_transfer's arrays, sharing their memory (the object store's, read-only: the
    rotations only read them)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy
        return LayerBasis([tensor(q) for q in arrays["activation_vectors"]], tensor(arrays["activation_values"]),
                          [tensor(q) for q in arrays["gradient_vectors"]], tensor(arrays["gradient_values"]))


def peak_rss() -> int:
    """This process's peak resident bytes since it started or since reset_peak_rss: the kernel's high-water mark
    (VmHWM in /proc/self/status, KiB) on Linux. Not getrusage's ru_maxrss, which for a process started by fork
    and exec also holds the parent's resident size at the fork, and which clear_refs does not reset: a `whence fit`
    launched by a 1 GiB process reported a 1 GiB peak of its own. Elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def release_free_memory() -> bool:
    """Hand the C allocator's free pages back to the system (glibc's malloc_trim; elsewhere nothing happens).

    An actor with max_concurrency=2 runs each pass on one of two threads, and glibc gives each thread its own
    arena: memory a pass freed stays resident in its arena while the next pass, on the other thread, allocates
    its own (measured: +1.1 GiB on a 6-block SmolLM2-shaped fit). Called between passes; results do not change.
    """
    import ctypes
    import ctypes.util

    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
