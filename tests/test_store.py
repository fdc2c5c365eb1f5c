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
