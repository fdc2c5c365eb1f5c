import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from traitmon.store import chunks_for, open_dataset, write_dataset


def sample_dataset(dtype=np.float32):
    rng = np.random.default_rng(0)
    return xr.Dataset(
        {"response_mean": (("prompt", "layer", "hidden"), rng.normal(size=(10, 5, 16)).astype(dtype))},
        coords={"prompt": [f"p{i}" for i in range(10)], "layer": np.arange(5)},
        attrs={"model": "tiny", "step": 3},
    )


def test_zarr_v3_round_trip_keeps_names_values_and_attrs(tmp_path):
    ds = sample_dataset()
    path = write_dataset(ds, tmp_path / "cap.zarr")
    assert (path / "zarr.json").is_file()  # Zarr format 3 metadata
    back = open_dataset(path, load=True)
    assert back["response_mean"].dims == ("prompt", "layer", "hidden")
    np.testing.assert_array_equal(back["response_mean"].values, ds["response_mean"].values)
    assert list(back.prompt.values) == list(ds.prompt.values)
    assert back.attrs["model"] == "tiny" and "0 = embeddings" in back.attrs["layer_convention"]
    # no temporary siblings left behind
    assert [p.name for p in tmp_path.iterdir()] == ["cap.zarr"]


def test_rewrite_replaces_store_atomically(tmp_path):
    write_dataset(sample_dataset(), tmp_path / "s.zarr")
    write_dataset(sample_dataset(np.float16), tmp_path / "s.zarr")
    assert open_dataset(tmp_path / "s.zarr")["response_mean"].dtype == np.float16


def test_bfloat16_like_and_int_floats_are_refused(tmp_path):
    with pytest.raises(TypeError, match="float16/float32"):
        write_dataset(sample_dataset(np.float128) if hasattr(np, "float128") else
                      sample_dataset().astype("float128"), tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def test_chunks_are_near_target():
    chunks = chunks_for((64, 31, 576), 4, target=2 << 20)
    size = np.prod(chunks) * 4
    assert 0.5 * (2 << 20) <= size <= (2 << 20)
    assert chunks[-1] == 576


def test_open_sweep_is_lazy_and_named(tmp_path):
    from traitmon.store import open_sweep

    def store(path, value):
        ds = sample_dataset()
        write_dataset(ds.assign(response_mean=ds.response_mean * 0 + value), path)

    store(tmp_path / "capture/m/base.zarr", 0.0)
    for pert, offset in (("a", 10.0), ("b", 20.0)):
        for step in (5, 10):
            store(tmp_path / f"capture/m/{pert}/step-{step}.zarr", offset + step)
    sweep = open_sweep(tmp_path, ["m"], ["a", "b"], [5, 10], variables=("response_mean",))
    assert sweep["response_mean"].dims == ("model", "perturbation", "step", "prompt", "layer", "hidden")
    assert sweep["response_mean"].chunks is not None  # dask-backed: nothing read yet
    assert list(sweep.step.values) == [0, 5, 10]
    values = sweep["response_mean"].isel(prompt=0, layer=0, hidden=0).sel(model="m").values
    np.testing.assert_allclose(values, [[0, 15, 20], [0, 25, 30]])


def test_stale_temporaries_of_the_same_target_are_cleaned_on_the_next_write(tmp_path):
    # what a capture killed mid-write leaves behind, and a temporary that belongs to another target
    stale = tmp_path / ".tmp-cap.zarr-k1ll3d_x"
    (stale / "cap.zarr").mkdir(parents=True)
    (stale / "cap.zarr" / "zarr.json").write_text("{}")
    (tmp_path / ".old-cap.zarr-4242").mkdir()
    other = tmp_path / ".tmp-cap.zarr-b-abcd1234"  # a temporary of target "cap.zarr-b"
    other.mkdir()
    write_dataset(sample_dataset(), tmp_path / "cap.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-cap.zarr-b-abcd1234", "cap.zarr"]


def test_string_arrays_are_stored_with_a_zarr_v3_specified_dtype(tmp_path):
    # Several string coordinates on one dim, as a direction store has (question, split): converting one used
    # to bring the others back as fixed-width UTF-32, which zarr warns has no v3 specification.
    ds = sample_dataset().assign_coords(question=("prompt", [f"question {i} " * 9 for i in range(10)]),
                                        split=("prompt", ["train"] * 5 + ["heldout"] * 5))
    ds["label"] = ("prompt", np.array([f"é{i}" for i in range(10)]))
    ds["raw"] = ("prompt", np.array([b"x%d" % i for i in range(10)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr's UnstableSpecificationWarning included
        write_dataset(ds, tmp_path / "s.zarr")
        back = open_dataset(tmp_path / "s.zarr", load=True)
    assert zarr_data_types(tmp_path / "s.zarr") <= ZARR_V3_SPECIFIED
    assert list(back.question.values) == list(ds.question.values) and back.label.values[3] == "é3"
    assert list(back.raw.values) == [f"x{i}" for i in range(10)]


# data types with a Zarr v3 specification (core spec plus the registered variable-length string)
ZARR_V3_SPECIFIED = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                     "float16", "float32", "float64", "complex64", "complex128", "string"}


def zarr_data_types(store) -> set[str]:
    """The data_type of every array in a Zarr v3 store, read from its metadata."""
    types = set()
    for meta in Path(store).rglob("zarr.json"):
        node = json.loads(meta.read_text())
        if node.get("node_type") == "array":
            dtype = node["data_type"]
            types.add(dtype if isinstance(dtype, str) else dtype["name"])
    return types
