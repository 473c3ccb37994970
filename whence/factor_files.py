"""Factors on disk: one file per layer and kind of factor, each with a SHA-256 checksum beside it.

Layout of a factors directory (format 2):
    manifest.json                         strategy, tracked layers, FACTOR_FILES (layer -> kind -> file, sha256)
    layers/{layer}.basis.safetensors      Q_A / Q_S blocks and l_A / l_S          (ekfac, kfac)
    layers/{layer}.lambda.safetensors     the corrected eigenvalues Lambda        (ekfac, kfac, diagonal)
    layers/{...}.safetensors.sha256       the hex SHA-256 of the file beside it
Each file is written by the process that owns the layer (a fitting actor or pipeline stage) as soon as it is
computed, atomically (whence.storage: a .partial file and a rename locally, one upload on an object store: a
factors directory may be on any pyarrow filesystem), its checksum last: a file with a checksum is finished, so an
interrupted fit resumes per layer. Older directories hold one factors.safetensors (format 1): still read.

Every read verifies the checksum and names the damaged file (FactorsDamagedError), so a truncated or overwritten
file is an error, never a traceback or silently different rankings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from whence.checksums import sidecar, write_checksum
from whence.errors import FactorsMismatchError, StorageError
from whence.storage import Location

LAYERS_DIR = "layers"
BASIS, LAMBDA = "basis", "lambda"  # the kinds of per-layer file
FACTOR_FILES = "factor_files"  # manifest key: {layer: {kind: {"file": relative path, "sha256": hex}}}
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class FactorsDamagedError(FactorsMismatchError):
    """A factors file is missing, truncated, or does not match its checksum."""


def kinds_for(strategy: str) -> tuple[str, ...]:
    """The per-layer files a strategy writes."""
    return {"ekfac": (BASIS, LAMBDA), "kfac": (BASIS, LAMBDA), "diagonal": (LAMBDA,), "identity": ()}[strategy]


def layer_file(name: str, kind: str) -> str:
    """The file of one layer's factors of one kind, relative to the factors directory (layer names hold dots,
    never slashes)."""
    return f"{LAYERS_DIR}/{name}.{kind}.safetensors"


def write_checked(path: str | Path | Location, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically (whence.storage: .partial + rename locally, one upload on an object
    store), then its checksum beside it; returns the checksum."""
    from safetensors.torch import save_file

    path = Location.of(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    checksum = path.write_through(lambda local: save_file(tensors, local, metadata=metadata))
    write_checksum(path, checksum)
    return checksum


def _expected_checksum(path: Location, expected: str | None) -> str:
    """The checksum `path` must have: `expected` (the manifest's) or its sidecar's."""
    if not path.is_file():
        raise FactorsDamagedError(f"{path}: factors file missing")
    if expected is None:
        recorded = sidecar(path)
        if not recorded.is_file():
            raise FactorsDamagedError(f"{path}: no checksum file {recorded.name}: the file was never finished")
        expected = recorded.read_text().strip()
    return expected


def _check(path: Location, expected: str, actual: str) -> str:
    if actual != expected:
        raise FactorsDamagedError(f"{path}: checksum mismatch (the file is truncated or overwritten; refit with "
                                  f"--overwrite, or restore it): expected sha256 {expected[:16]}..., got {actual[:16]}...")
    return actual


def verify(path: str | Path | Location, expected: str | None = None) -> str:
    """The file's checksum, after checking it against `expected` (the manifest's) or the sidecar file;
    FactorsDamagedError naming the file when it is missing or does not match."""
    path = Location.of(path)
    expected = _expected_checksum(path, expected)
    return _check(path, expected, path.sha256())


def finished(directory: str | Path | Location, name: str, kind: str) -> dict | None:
    """{"file", "sha256"} of a layer file that was written completely and is intact, else None (a damaged one
    is recomputed by a resumed fit)."""
    relative = layer_file(name, kind)
    try:
        return {"file": relative, "sha256": verify(Location.of(directory) / relative)}
    except FactorsDamagedError:
        return None


def read_checked(path: str | Path | Location, expected: str | None = None, device="cpu", check: bool = True
                 ) -> dict[str, torch.Tensor]:
    """The tensors of a verified safetensors file (check=False: read only, for files written without one).

    A local file is hashed as a stream and then mapped by safetensors; a remote one is read once into memory,
    hashed and parsed from those bytes (so it briefly costs its size twice)."""
    from safetensors.torch import load, load_file

    path = Location.of(path)
    if check:
        expected = _expected_checksum(path, expected)
    elif not path.is_file():
        raise FactorsDamagedError(f"{path}: factors file missing; is this a directory written by `whence fit`?")
    try:
        if path.is_local:
            if check:
                _check(path, expected, path.sha256())
            return load_file(path.path, device=str(device))
        data = path.read_bytes()
        if check:
            _check(path, expected, hashlib.sha256(data).hexdigest())
        tensors = load(data)
        del data
        return {k: v.to(device) for k, v in tensors.items()}
    except (FactorsDamagedError, StorageError):
        raise
    except Exception as error:  # the checksum matched an unreadable file: written that way, never finished
        raise FactorsDamagedError(f"{path}: not a readable safetensors file ({error})") from None


def stored(tensor: torch.Tensor, factor_dtype: str) -> torch.Tensor:
    """A tensor as stored: `factor_dtype` for floating point (float32 halves the bytes of the float64 factors)."""
    return tensor.to(FACTOR_DTYPES[factor_dtype]) if tensor.is_floating_point() else tensor


def read_manifest(directory: str | Path | Location) -> dict:
    directory = Location.of(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise FactorsDamagedError(f"{directory}: no manifest.json; is this a directory written by `whence fit`?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FactorsDamagedError(f"{path}: not valid JSON ({error})") from None


# ---------------------------------------------------------------------------------------------------------
# One layer's factors <-> tensors (keys f"{layer}/{NAME}" and f"{layer}/{NAME}/{block}", as in format 1)


def basis_tensors(name: str, basis, factor_dtype: str = "float64") -> dict[str, torch.Tensor]:
    """The stored tensors of one layer's LayerBasis, in `factor_dtype`."""
    from whence.factors import (
        ACTIVATION_EIGENVALUES,
        ACTIVATION_EIGENVECTORS,
        GRADIENT_EIGENVALUES,
        GRADIENT_EIGENVECTORS,
    )

    tensors = {f"{name}/{ACTIVATION_EIGENVECTORS}/{i}": q for i, q in enumerate(basis.activation_vectors)}
    tensors |= {f"{name}/{GRADIENT_EIGENVECTORS}/{i}": q for i, q in enumerate(basis.gradient_vectors)}
    tensors[f"{name}/{ACTIVATION_EIGENVALUES}"] = basis.activation_values
    tensors[f"{name}/{GRADIENT_EIGENVALUES}"] = basis.gradient_values
    return {k: stored(v, factor_dtype) for k, v in tensors.items()}


def basis_of(tensors: dict[str, torch.Tensor], name: str):
    """The LayerBasis of `name` in `tensors` (None when they hold none: diagonal, identity)."""
    from whence.factors import (
        ACTIVATION_EIGENVALUES,
        ACTIVATION_EIGENVECTORS,
        GRADIENT_EIGENVALUES,
        GRADIENT_EIGENVECTORS,
        LayerBasis,
    )

    if f"{name}/{ACTIVATION_EIGENVALUES}" not in tensors:
        return None
    return LayerBasis(_blocks(tensors, name, ACTIVATION_EIGENVECTORS), tensors[f"{name}/{ACTIVATION_EIGENVALUES}"],
                      _blocks(tensors, name, GRADIENT_EIGENVECTORS), tensors[f"{name}/{GRADIENT_EIGENVALUES}"])


def _blocks(tensors: dict[str, torch.Tensor], layer: str, kind: str) -> list[torch.Tensor]:
    """The blocks f"{layer}/{kind}/{i}" in order of i."""
    keys = [k for k in tensors if k.startswith(f"{layer}/{kind}/")]
    return [tensors[k] for k in sorted(keys, key=lambda k: int(k.rsplit("/", 1)[1]))]


def write_basis(directory: str | Path | Location, name: str, basis, factor_dtype: str = "float64") -> dict:
    """Write one layer's eigenbases; returns its manifest record {"file", "sha256"}."""
    relative = layer_file(name, BASIS)
    tensors = basis_tensors(name, basis, factor_dtype)
    return {"file": relative, "sha256": write_checked(Location.of(directory) / relative, tensors)}


def write_lambda(directory: str | Path | Location, name: str, eigenvalues: torch.Tensor, factor_dtype: str = "float64") -> dict:
    """Write one layer's corrected eigenvalues Lambda (d_out, d_in); returns its manifest record."""
    from whence.factors import CORRECTED_EIGENVALUES

    relative = layer_file(name, LAMBDA)
    tensors = {f"{name}/{CORRECTED_EIGENVALUES}": stored(eigenvalues, factor_dtype)}
    return {"file": relative, "sha256": write_checked(Location.of(directory) / relative, tensors)}


def read_basis(directory: str | Path | Location, name: str, record: dict | None = None, device="cpu"):
    record = record or {"file": layer_file(name, BASIS), "sha256": None}
    return basis_of(read_checked(Location.of(directory) / record["file"], record.get("sha256"), device), name)


def read_lambda(directory: str | Path | Location, name: str, record: dict | None = None, device="cpu") -> torch.Tensor:
    from whence.factors import CORRECTED_EIGENVALUES

    record = record or {"file": layer_file(name, LAMBDA), "sha256": None}
    tensors = read_checked(Location.of(directory) / record["file"], record.get("sha256"), device)
    return tensors[f"{name}/{CORRECTED_EIGENVALUES}"]


# ---------------------------------------------------------------------------------------------------------
# Whole directories (Factors.save and Factors.load)


def save_factors(factors, directory: str | Path | Location, manifest: dict | None = None,
                 factor_dtype: str = "float64") -> Path | Location:
    """Every layer's files, then the manifest listing them (format 2). Returns the directory (a Path when it
    is local)."""
    directory = Location.of(directory)
    records = {}
    for name in factors.layer_names:
        records[name] = {}
        if factors.bases.get(name) is not None:
            records[name][BASIS] = write_basis(directory, name, factors.bases[name], factor_dtype)
        if factors.eigenvalues.get(name) is not None:
            records[name][LAMBDA] = write_lambda(directory, name, factors.eigenvalues[name], factor_dtype)
    write_factors_manifest(directory, factors.strategy, factors.layers, records,
                           {**(manifest or {}), **factors.metadata, "factor_dtype": factor_dtype})
    return directory.local if directory.is_local else directory


def write_factors_manifest(directory: str | Path | Location, strategy: str, layers: list[dict], records: dict,
                           body: dict) -> None:
    from whence.factors import MANIFEST_FILE

    body = {**body, "strategy": strategy, "layers": layers, "format": 2, FACTOR_FILES: records}
    (Location.of(directory) / MANIFEST_FILE).write_text(json.dumps(body, indent=2, default=str))


def load_factors(cls, directory: str | Path | Location, device="cpu", layers: list[str] | None = None):
    """Factors from a directory of either format; with `layers`, those layers' factors only (the manifest's
    layer list is kept whole, so compatibility checks still see every tracked layer)."""
    from whence.factors import CORRECTED_EIGENVALUES, FACTORS_FILE

    directory = Location.of(directory)
    manifest = read_manifest(directory)
    names = [layer["name"] for layer in manifest["layers"]]
    unknown = sorted(set(layers or ()) - set(names))
    if unknown:
        raise FactorsMismatchError(f"{directory}: no factors for {', '.join(unknown[:8])}")
    wanted = names if layers is None else [n for n in names if n in set(layers)]
    if FACTOR_FILES in manifest:
        bases, eigenvalues = {}, {}
        for name in wanted:
            record = manifest[FACTOR_FILES].get(name, {})
            bases[name] = read_basis(directory, name, record[BASIS], device) if BASIS in record else None
            eigenvalues[name] = read_lambda(directory, name, record[LAMBDA], device) if LAMBDA in record else None
    else:  # format 1: one factors.safetensors
        path = directory / FACTORS_FILE
        # Format 1 had no checksum: verified when a sidecar was added, else only read (errors name the file).
        tensors = read_checked(path, None, device, check=sidecar(path).is_file())
        bases = {n: basis_of(tensors, n) for n in wanted}
        eigenvalues = {n: tensors.get(f"{n}/{CORRECTED_EIGENVALUES}") for n in wanted}
    metadata = {k: v for k, v in manifest.items() if k not in ("strategy", "layers", FACTOR_FILES)}
    return cls(manifest["strategy"], manifest["layers"], bases, eigenvalues, metadata)

