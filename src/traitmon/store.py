"""Zarr v3 stores of named xarray objects, written atomically.

Conventions: float16/float32 only (never bfloat16, which Zarr cannot hold portably), strings stored as
variable-length strings (numpy ``<U``/``S`` arrays have no Zarr v3 specification), chunks of about 1-4 MB.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from traitmon import LAYER_CONVENTION
from traitmon.io import atomic_path

ALLOWED_FLOATS = (np.float16, np.float32, np.float64)
TARGET_CHUNK_BYTES = 2 << 20


def chunks_for(shape: tuple[int, ...], itemsize: int, target: int = TARGET_CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk shape near ``target`` bytes: keep trailing dims whole, split the leading ones."""
    chunks = list(shape)
    for axis in range(len(shape)):
        size = int(np.prod(chunks)) * itemsize
        if size <= target:
            break
        rest = int(np.prod(chunks[axis + 1:])) * itemsize
        chunks[axis] = max(1, target // max(rest, 1))
    return tuple(max(1, c) for c in chunks)


def _variable_length_strings(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width numpy strings (``<U``; ``S`` bytes decoded) as object arrays: Zarr then stores them as
    variable-length strings, which have a Zarr v3 specification (fixed-width UTF-32 and bytes have none).

    Converted from the bare variables: an ``astype`` on a DataArray carries its own coordinates back along
    and would undo an earlier conversion of a sibling coordinate.
    """
    fixed = {name: var.astype(str).astype(object) for name, var in ds.variables.items() if var.dtype.kind in "US"}
    coords = {name: var for name, var in fixed.items() if name in ds.coords}
    data = {name: var for name, var in fixed.items() if name not in ds.coords}
    return ds.assign_coords(coords).assign(data)


def write_dataset(ds: xr.Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a Zarr v3 store at ``path`` atomically (temporary sibling, then rename)."""
    for name, var in ds.data_vars.items():
        if var.dtype.kind == "f" and var.dtype.type not in ALLOWED_FLOATS:
            raise TypeError(f"variable '{name}' has dtype {var.dtype}; cast to float16/float32 before writing")
        if str(var.dtype) == "bfloat16":
            raise TypeError(f"variable '{name}' is bfloat16; cast to float16/float32 before writing")
    ds = _variable_length_strings(ds)
    ds.attrs.setdefault("layer_convention", LAYER_CONVENTION)
    encoding = {name: {"chunks": chunks_for(var.shape, var.dtype.itemsize)}
                for name, var in ds.data_vars.items() if var.ndim and var.dtype.kind == "f"}
    # Variable-length strings: xarray would otherwise store fixed-width UTF-32, which has no Zarr v3 spec.
    encoding.update({name: {"dtype": object} for name, var in ds.variables.items() if var.dtype == object})
    with atomic_path(path) as tmp:
        ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    return Path(path)


def open_dataset(path: str | Path, load: bool = False, **kwargs) -> xr.Dataset:
    """Open a store written by ``write_dataset``; ``kwargs`` go to ``xr.open_zarr`` (e.g. ``chunks={}``)."""
    with warnings.catch_warnings():
        # Snakemake drops a .snakemake_timestamp file into directory outputs; zarr warns about the stranger.
        warnings.filterwarnings("ignore", message=".*snakemake_timestamp.*")
        ds = xr.open_zarr(path, zarr_format=3, consolidated=False, **kwargs)
    return ds.load() if load else ds


def open_sweep(results: str | Path, models: list[str], perturbations: list[str], steps: list[int],
               variables: tuple[str, ...] = ("response_mean", "last_prompt")) -> xr.Dataset:
    """All capture stores of a sweep as one lazy Dataset ``(model, perturbation, step, prompt, layer, hidden)``.

    Arrays stay dask-backed (nothing is read until computed). Step 0 is the base model's store
    (``capture/{model}/base.zarr``), shared by every perturbation of that model.
    """
    results = Path(results)
    per_model = []
    for model in models:
        base = _open_lazy(results / "capture" / model / "base.zarr", variables)
        per_pert = []
        for pert in perturbations:
            stores = [base] + [_open_lazy(results / "capture" / model / pert / f"step-{s}.zarr", variables)
                               for s in steps if s != 0]
            per_pert.append(xr.concat(stores, dim="step", coords="minimal", compat="override", join="exact")
                            .assign_coords(step=[0] + [s for s in steps if s != 0]))
        per_model.append(xr.concat(per_pert, dim="perturbation", coords="minimal", compat="override")
                         .assign_coords(perturbation=list(perturbations)))
    sweep = xr.concat(per_model, dim="model", coords="minimal", compat="override", join="exact")
    return sweep.assign_coords(model=list(models)).transpose("model", "perturbation", "step", "prompt", "layer",
                                                             "hidden")


def _open_lazy(path: Path, variables: tuple[str, ...]) -> xr.Dataset:
    ds = open_dataset(path, chunks={})
    return ds[[v for v in variables if v in ds]].drop_attrs()
