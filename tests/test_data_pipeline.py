"""The grain training loader (batches, determinism, exact resume, workers, sharding, bad input),
the evaluation dataset, and host batches -> sharded jax.Arrays."""

import logging
import shutil

import numpy as np
import pytest

from sarformer_jax.configs import tiny
from sarformer_jax.data import pipeline, synthetic
from sarformer_jax.data.sources import DataError

SIZE = (96, 112)
Q = 20


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    synthetic.generate(out, num_train=24, num_val=4, image_size=SIZE, num_classes=8, seed=0)
    return out


@pytest.fixture(autouse=True)
def _close_loaders(monkeypatch):
    # Every loader a test opens is closed after it: read-ahead threads left running into the
    # next tests (or pytest's exit) only cost time and make failures harder to read.
    opened = []
    build = pipeline.build_train_loader

    def tracked(*args, **kwargs):
        opened.append(build(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(pipeline, "build_train_loader", tracked)
    yield
    for loader in opened:
        loader.close()


def _cfg(root, **data):
    cfg = tiny.get_config()
    cfg.data.update(root=str(root), crop_size=(64, 64), scale=(256, 64), **data)
    cfg.guidance.cache_dir = str(root / "proposals")
    cfg.train.batch_size = 4
    return cfg


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batches(root):
    cfg = _cfg(root)
    batch = next(pipeline.build_train_loader(cfg, seed=0))
    assert pipeline.describe(batch) == {
        "image": ((4, 64, 64, 3), "uint8"), "image_hw": ((4, 2), "int32"),
        "label": ((4, 64, 64), "uint8"), "proposals_packed": ((4, Q, 64, 8), "uint8"),
        "num_proposals": ((4,), "int32")}
    # bit-packed to the device; the step unpacks exactly what the host would
    import jax.numpy as jnp

    from sarformer_jax.guidance import cached_masks

    on_device, _ = cached_masks({k: jnp.asarray(v) for k, v in batch.items()}, Q)
    batch = pipeline.unpack_proposals(dict(batch), 64)
    np.testing.assert_array_equal(np.asarray(on_device), batch["proposals"])
    assert set(np.unique(batch["label"])) <= set(range(8)) | {255}
    assert set(np.unique(batch["proposals"])) <= {0, 1}
    for p, n in zip(batch["proposals"], batch["num_proposals"]):
        assert 0 < n <= Q and p[:n].reshape(n, -1).any(-1).all() and not p[n:].any()
    assert (batch["image_hw"] <= 64).all() and (batch["image_hw"] > 0).all()
    cfg.guidance.source = "none"
    assert set(next(pipeline.build_train_loader(cfg, seed=0))) == {"image", "image_hw", "label"}


def test_device_inputs_equal_the_host_transform(root):
    # The loader ships uint8 images and normalises on the device: the model must see exactly
    # what transforms.train_transform computes on the host (normalised, 0 in the padding).
    import jax.numpy as jnp

    from sarformer_jax.data import transforms as T

    cfg = _cfg(root)
    cfg.data.scale = (48, 24)  # images smaller than the crop: padded on both axes
    source = pipeline.build_source(cfg, "training")
    compact = pipeline.TrainRecord(source, cfg, normalize_image=False, compact_label=True)
    host = pipeline.TrainRecord(source, cfg)
    a, b = (fn(3, np.random.default_rng(11)) for fn in (compact, host))
    assert a["image"].dtype == np.uint8 and a["label"].dtype == np.uint8
    assert (a["image_hw"] < 64).all() and not a["image"][a["image_hw"][0]:].any()
    got = pipeline.device_inputs({k: jnp.asarray(v)[None] for k, v in a.items()},
                                 cfg.data.mean, cfg.data.std)
    assert "image_hw" not in got and got["label"].dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(got["image"][0]), b["image"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["label"][0]), b["label"])
    # float images (benchmarks, callers' own batches) pass through unchanged
    x = jnp.ones((1, 4, 4, 3))
    assert pipeline.device_inputs({"image": x}, cfg.data.mean, cfg.data.std)["image"] is x
    # a label that does not fit uint8 stays int32
    cfg.model.head.num_classes = 300
    assert pipeline.label_dtype(cfg) == np.int32


def test_more_proposals_than_queries_are_subsampled(root):
    cfg = _cfg(root)
    cfg.model.head.num_queries = 2
    batch = pipeline.unpack_proposals(next(pipeline.build_train_loader(cfg, seed=0)), 64)
    assert batch["proposals"].shape[1] == 2 and batch["num_proposals"].max() == 2


def test_deterministic_and_resume_in_process(root):
    cfg = _cfg(root)
    a = pipeline.build_train_loader(cfg, seed=7)
    first = _take(a, 3)
    state = a.get_state()
    rest = _take(a, 8)  # crosses the epoch boundary (24 records / batch 4 = 6 per epoch)
    assert _same(first, _take(pipeline.build_train_loader(cfg, seed=7), 3))
    assert not _same(first, _take(pipeline.build_train_loader(cfg, seed=8), 3))
    resumed = pipeline.build_train_loader(cfg, seed=7, start_state=state)
    assert _same(rest, _take(resumed, 8))
    with pytest.raises(ValueError, match="version"):
        pipeline.build_train_loader(cfg, seed=7, start_state={"version": 0})


def test_epochs_and_process_shards():
    seen = []
    for pi in range(3):
        idx = pipeline.train_indices(10, seed=1, process_index=pi, process_count=3)
        epoch0 = [idx[i] for i in range(len(range(pi, 10, 3)))]
        epoch1 = [idx[i + len(epoch0)] for i in range(len(epoch0))]
        assert sorted(epoch0) == sorted(epoch1) == list(range(pi, 10, 3))
        seen += epoch0
    assert sorted(seen) == list(range(10))
    with pytest.raises(DataError, match="no training records"):
        pipeline.train_indices(2, seed=0, process_index=2, process_count=3)


def test_local_batch_per_process(root):
    cfg = _cfg(root)
    cfg.train.batch_size = 8
    b0 = next(pipeline.build_train_loader(cfg, seed=0, process_index=0, process_count=2))
    b1 = next(pipeline.build_train_loader(cfg, seed=0, process_index=1, process_count=2))
    assert b0["image"].shape[0] == b1["image"].shape[0] == 4
    assert not np.array_equal(b0["label"], b1["label"])
    with pytest.raises(ValueError, match="divisible"):
        pipeline.build_train_loader(cfg, seed=0, process_count=3)


def test_skipped_record_is_replaced_by_the_next_readable_one(root, tmp_path, caplog):
    data = tmp_path / "d"
    shutil.copytree(root, data)
    (data / "images" / "training" / "ADE_train_00000006.jpg").write_bytes(b"\xff\xd8junk")
    cfg = _cfg(data, on_error="skip")
    source = pipeline.build_source(cfg, "training")
    assert source.stems[5] == "ADE_train_00000006"
    make = pipeline.TrainBatch(pipeline.TrainRecord(source, cfg, normalize_image=False),
                               len(source))
    with caplog.at_level(logging.WARNING):
        got = make(np.array([4, 5]), np.random.default_rng(0))
    assert "ADE_train_00000006.jpg" in caplog.text
    # slot 1 takes record 6 instead, with slot 1's own random draws
    want = make(np.array([4, 6]), np.random.default_rng(0))
    assert set(got) == set(want)
    for k in got:
        np.testing.assert_array_equal(got[k], want[k])
    assert not np.array_equal(got["label"][0], got["label"][1])


def test_workers_match_in_process_and_resume(root, tmp_path):
    # One corrupt record, skipped: the stream still does not depend on the worker count.
    data = tmp_path / "d"
    shutil.copytree(root, data)
    (data / "images" / "training" / "ADE_train_00000005.jpg").write_bytes(b"\xff\xd8junk")
    cfg = _cfg(data, on_error="skip")
    ref = _take(pipeline.build_train_loader(cfg, seed=3), 10)
    cfg.data.num_workers = 2
    loader = pipeline.build_train_loader(cfg, seed=3)
    got = _take(loader, 4)
    state = loader.get_state()
    got += _take(loader, 6)
    assert _same(ref, got)
    assert _same(ref[4:], _take(pipeline.build_train_loader(cfg, seed=3, start_state=state), 6))


def test_error_propagates_from_workers(root, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(root, data)
    (data / "images" / "training" / "ADE_train_00000002.jpg").write_bytes(b"\xff\xd8junk")
    cfg = _cfg(data, num_workers=2)
    loader = pipeline.build_train_loader(cfg, seed=0)
    with pytest.raises(Exception, match="ADE_train_00000002.jpg"):
        _take(loader, 12)  # two epochs: the bad record comes up


def test_skip_in_process_logs_and_all_bad_stops(root, tmp_path, caplog):
    data = tmp_path / "d"
    shutil.copytree(root, data)
    bad = data / "images" / "training" / "ADE_train_00000003.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    cfg = _cfg(data, on_error="skip")
    with caplog.at_level(logging.WARNING):
        _take(pipeline.build_train_loader(cfg, seed=0), 7)
    assert "truncated JPEG" in caplog.text and bad.name in caplog.text
    for p in (data / "images" / "training").glob("*.jpg"):
        p.write_bytes(b"")
    with pytest.raises(DataError, match="in a row failed"):
        next(pipeline.build_train_loader(cfg, seed=0))


def test_eval_dataset_and_preprocess(root):
    cfg = _cfg(root)
    ds = pipeline.build_eval_dataset(cfg)
    assert len(ds) == 4
    rec = ds[0]
    assert rec["image"].shape == SIZE + (3,) and rec["image"].dtype == np.uint8
    assert rec["label"].shape == SIZE and rec["label"].dtype == np.int32
    assert rec["proposals"].shape[1:] == SIZE and rec["name"].endswith("ADE_val_00000001.jpg")
    x = pipeline.eval_preprocess(rec["image"], cfg)
    # (96, 112) into (512, 128): factor min(512/112, 128/96) = 4/3 -> (128, 149)
    assert x.shape == (128, 149, 3) and x.dtype == np.float32


def test_synthetic_written_on_first_use(tmp_path):
    cfg = tiny.get_config()
    cfg.data.root = str(tmp_path / "synth")
    cfg.guidance.cache_dir = str(tmp_path / "synth" / "proposals")
    cfg.data_gen.update(num_train=3, num_val=1, image_size=(48, 64))
    assert len(pipeline.build_source(cfg, "training")) == 3
    assert len(pipeline.build_eval_dataset(cfg)) == 1


def test_to_global_batch(root):
    import jax
    from jax.sharding import Mesh, PartitionSpec as P

    cfg = _cfg(root)
    cfg.train.batch_size = 8
    batch = next(pipeline.build_train_loader(cfg, seed=0))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    out = pipeline.to_global_batch(batch, mesh, P("data"))
    for k, v in batch.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        assert len(out[k].sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(out[k]), v)
    assert out["image"].addressable_shards[1].data.shape == (1, 64, 64, 3)
