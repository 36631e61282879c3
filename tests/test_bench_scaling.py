"""`sarformer bench scaling`: the plan of runs and the summary (the runs themselves need GPUs;
the equivalence of the sharded step on 8 CPU devices is tests/test_train.py's)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from sarformer_jax.benchmarks import scaling


def _args(**kw):
    parser = argparse.ArgumentParser()
    scaling.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_plan_covers_every_count_and_both_references():
    runs = scaling.plan_runs(_args(), num_visible=4)
    by_name = {r["name"]: r for r in runs}
    assert list(by_name) == ["n1", "n2", "n4", "n1_b8", "n1_b8_accum4"]
    assert [by_name[f"n{n}"]["global_batch"] for n in (1, 2, 4)] == [2, 4, 8]
    assert by_name["n4"]["trajectory"] and not by_name["n2"]["trajectory"]
    assert by_name["n1_b8_accum4"]["accum"] == 4 and by_name["n1_b8_accum4"]["devices"] == 1
    assert all(r["fsdp"] == 1 for r in runs)
    fsdp = {r["name"]: r for r in scaling.plan_runs(_args(fsdp=True, devices="2"), 2)}
    assert fsdp["n2"]["fsdp"] == 2 and fsdp["n1"]["fsdp"] == 1 and fsdp["n1_b4"]["fsdp"] == 1
    # one device: nothing to compare with
    assert [r["name"] for r in scaling.plan_runs(_args(), num_visible=1)] == ["n1"]
    with pytest.raises(SystemExit, match="2 device"):
        scaling.plan_runs(_args(devices="1,4"), num_visible=2)
    with pytest.raises(SystemExit, match="unknown"):
        scaling.plan_runs(_args(references="exact,bogus"), num_visible=2)


def test_run_config_sets_batch_accumulation_and_mesh():
    args = _args(model="sarformer_b")
    run = dict(name="n1_b4_accum2", devices=1, global_batch=4, accum=2, fsdp=1)
    cfg = scaling.run_config(args, run)
    assert cfg.train.batch_size == 4 and cfg.train.grad_accum == 2
    assert cfg.guidance.source == "cached" and cfg.train.mesh.fsdp == 1


def test_summary_efficiency_and_distances(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.normal(size=1000).astype(np.float32)
    files = {}
    for name, noise in (("n2", 0.0), ("n1_b4", 1e-7), ("n1_b4_accum2", 1e-3)):
        files[name] = str(tmp_path / f"{name}.npy")
        np.save(files[name], p + noise * rng.normal(size=p.shape).astype(np.float32))
    results = [
        dict(name="n1", devices=1, global_batch=2, accum=1, step_s=0.100, images_per_s=20.0,
             pipelined_step_s=0.080, pipelined_images_per_s=25.0),
        dict(name="n2", devices=2, global_batch=4, accum=1, step_s=0.110, images_per_s=4 / 0.11,
             pipelined_step_s=0.085, pipelined_images_per_s=4 / 0.085,
             losses=[3.0, 2.5], params_file=files["n2"]),
        dict(name="n1_b4", devices=1, global_batch=4, accum=1, step_s=0.2, images_per_s=20.0,
             losses=[3.0, 2.5], params_file=files["n1_b4"]),
        dict(name="n1_b4_accum2", devices=1, global_batch=4, accum=2, step_s=0.21,
             images_per_s=4 / 0.21, losses=[3.1, 2.4], params_file=files["n1_b4_accum2"]),
        dict(name="n4", devices=4, failed=True),
    ]
    s = scaling.summarize(results)
    assert [w["devices"] for w in s["weak_scaling"]] == [1, 2]
    assert s["weak_scaling"][1]["efficiency"] == pytest.approx((4 / 0.11) / 40.0)
    assert s["weak_scaling"][1]["pipelined_efficiency"] == pytest.approx(0.080 / 0.085)
    assert s["weak_scaling"][1]["pipelined_step_ms"] == pytest.approx(85.0)
    assert s["reference"] == "n2"
    eq = {e["run"]: e for e in s["equivalence"]}
    assert eq["n1_b4"]["max_abs_loss_diff"] == 0.0
    assert eq["n1_b4"]["params_rel_l2"] < 1e-6
    assert eq["n1_b4_accum2"]["max_abs_loss_diff"] == pytest.approx(0.1)
    assert eq["n1_b4_accum2"]["max_rel_loss_diff"] == pytest.approx(0.1 / 2.5)
    assert 1e-4 < eq["n1_b4_accum2"]["params_rel_l2"] < 1e-2


def test_run_subsets_and_merge(tmp_path, capsys):
    runs = scaling.plan_runs(_args(), num_visible=2)
    assert [r["name"] for r in scaling.select_runs(runs, "n2,n1")] == ["n1", "n2"]
    with pytest.raises(SystemExit, match="not planned"):
        scaling.select_runs(runs, "n3")
    # two calls' outputs merge into one summary; parameter distances are then unavailable
    import json

    a = dict(results=[dict(name="n2", devices=2, global_batch=4, accum=1, step_s=0.12,
                           images_per_s=4 / 0.12, losses=[2.0, 1.5], params_file="/gone.npy",
                           config="c", device_kind="d", jax="j", date="x")])
    b = dict(results=[dict(name="n1", devices=1, global_batch=2, accum=1, step_s=0.1,
                           images_per_s=20.0),
                      dict(name="n1_b4_accum2", devices=1, global_batch=4, accum=2, step_s=0.2,
                           images_per_s=20.0, losses=[2.1, 1.5])])
    paths = []
    for i, d in enumerate((a, b)):
        paths.append(str(tmp_path / f"{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(d, f)
    out = tmp_path / "merged.json"
    assert scaling.run(_args(merge=paths, out=str(out))) == 0
    merged = json.loads(out.read_text())["summary"]
    assert merged["weak_scaling"][1]["efficiency"] == pytest.approx((4 / 0.12) / 40.0)
    (e,) = merged["equivalence"]
    assert e["max_abs_loss_diff"] == pytest.approx(0.1) and e["params_rel_l2"] is None
    assert "not available" in capsys.readouterr().out
