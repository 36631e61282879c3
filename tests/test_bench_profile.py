"""The profile summary of `sarformer bench train --profile` attributes GPU kernels to the named
scopes through the compiled HLO's op_name metadata."""

import gzip
import json

import pytest

from sarformer_jax.benchmarks.profile import hlo_op_names, kernel_class, summarize

HLO = """
HloModule jit_step
ENTRY %main {
  %fusion.1 = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, calls=%fc, metadata={op_type="add" op_name="jit(step)/jvp(backbone)/add" source_file="x.py" source_line=3}
  %fusion.2 = f32[8]{0} fusion(f32[8]{0} %fusion.1), kind=kLoop, calls=%fd, metadata={op_type="while" op_name="jit(step)/loss/hungarian/while"}
  ROOT %copy.3 = f32[8]{0} copy(%fusion.2), metadata={op_name="jit(step)/optimizer/copy"}
}
"""


def test_hlo_metadata_and_scope_attribution(tmp_path):
    names = hlo_op_names(HLO)
    assert names["fusion.1"] == "jit(step)/jvp(backbone)/add"
    assert names["copy.3"] == "jit(step)/optimizer/copy"
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "loop_fusion_1", "dur": 3000.0, "args": {"hlo_op": "fusion.1"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "loop_fusion_2", "dur": 1000.0, "args": {"hlo_op": "fusion.2"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "loop_fusion_1", "dur": 3000.0, "args": {"hlo_op": "fusion.1"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "copy_3", "dur": 500.0, "args": {"hlo_op": "copy.3"}},
        {"ph": "X", "pid": 2, "tid": 1, "name": "host work", "dur": 99000.0, "args": {}},
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarize(str(tmp_path), HLO, steps=2)
    assert s["gpu_kernel_ms_per_step"] == pytest.approx(3.75)
    assert s["by_scope_ms"] == pytest.approx({"backbone": 3.0, "hungarian": 0.5, "optimizer": 0.25})
    assert s["top_kernels_ms"][0] == ("loop_fusion_1", "backbone", pytest.approx(3.0))


@pytest.mark.parametrize("name, cls", [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matrix"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas", "matrix"),
    ("cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x128x64", "matrix"),
    ("gemm_fusion_dot_123", "matrix"),
    ("splitKreduce_kernel", "matrix"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "matrix"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("msda_bwd", "pallas"),
    ("DeviceSegmentedRadixSortKernel", "sort"),
    ("input_reduce_fusion_1", "reduction"),
    ("loop_multiply_fusion_7", "elementwise"),
    ("wrapped_convert", "elementwise"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
])
def test_kernel_classes(name, cls):
    assert kernel_class(name) == cls


def test_kernel_classes_sum_to_the_kernel_time(tmp_path):
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 1, "name": "nvjet_tst_128x256", "dur": 3000.0, "args": {}},
              {"ph": "X", "pid": 1, "name": "msda_fwd", "dur": 1000.0, "args": {}},
              {"ph": "X", "pid": 1, "name": "loop_add_fusion", "dur": 500.0, "args": {}}]
    d = tmp_path / "t"
    d.mkdir()
    with gzip.open(d / "x.trace.json.gz", "wt") as f:
        json.dump(events, f)
    s = summarize(str(tmp_path), "", steps=1)
    assert s["by_class_ms"] == pytest.approx({"matrix": 3.0, "pallas": 1.0, "elementwise": 0.5})


def test_kernel_names_map_to_fusion_instructions(tmp_path):
    hlo = ('  %loop_add_fusion.173 = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, '
           'metadata={op_type="add" op_name="jit(step)/transpose(jvp(decode_head))/pixel_decoder/add"}\n')
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 1, "name": "loop_add_fusion_173", "dur": 2000.0, "args": {}}]
    d = tmp_path / "t"
    d.mkdir()
    with gzip.open(d / "x.trace.json.gz", "wt") as f:
        json.dump(events, f)
    s = summarize(str(tmp_path), hlo, steps=1)
    assert s["by_scope_ms"] == pytest.approx({"pixel_decoder": 2.0})


def test_median_time_runs_warmups_untimed_then_times_each_call():
    from sarformer_jax.benchmarks.timing import median_time

    calls = []
    med, times = median_time(lambda: calls.append(1), steps=5, warmup=2)
    assert len(calls) == 7 and len(times) == 5
    assert med == sorted(times)[2]


def test_two_gpus_overlapping_streams_and_nccl(tmp_path):
    """Per-device figures over two GPUs; kernels overlapping on two streams count once in the busy
    time; NCCL kernels are their own scope."""
    hlo = ('  %fusion.1 = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, '
           'metadata={op_name="jit(step)/jvp(backbone)/add"}\n')
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:1"}}]
    for pid in (1, 2):
        events += [
            {"ph": "X", "pid": pid, "tid": 1, "name": "fusion_1", "ts": 0.0, "dur": 4000.0,
             "args": {"hlo_op": "fusion.1"}},
            # all-reduce on a second stream, half of it under the fusion
            {"ph": "X", "pid": pid, "tid": 2, "name": "ncclDevKernel_AllReduce_Sum_f32_RING_LL",
             "ts": 2000.0, "dur": 4000.0, "args": {}},
        ]
    d = tmp_path / "t"
    d.mkdir()
    with gzip.open(d / "x.trace.json.gz", "wt") as f:
        json.dump(events, f)
    s = summarize(str(tmp_path), hlo, steps=2)
    assert s["gpus"] == 2
    assert s["gpu_kernel_ms_per_step"] == pytest.approx(4.0)  # (4 + 4) ms per device / 2 steps
    assert s["gpu_busy_ms_per_step"] == pytest.approx(3.0)  # [0, 6) ms covered / 2 steps
    assert s["by_scope_ms"] == pytest.approx({"backbone": 2.0, "collectives (nccl)": 2.0})


def test_gaps_are_attributed_to_the_kernels_around_them(tmp_path):
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}}]
    spans = [("a", 0, 10), ("b", 10, 5), ("c", 40, 10), ("d", 45, 20), ("a", 100, 10)]
    for name, ts, dur in spans:  # gaps: b->c 25 us, d->a 35 us (c and d overlap: no gap)
        events.append({"ph": "X", "pid": 1, "tid": 1 if name != "d" else 2, "name": name,
                       "ts": float(ts), "dur": float(dur), "args": {}})
    d = tmp_path / "t"
    d.mkdir()
    with gzip.open(d / "x.trace.json.gz", "wt") as f:
        json.dump(events, f)
    s = summarize(str(tmp_path), "", steps=1)
    assert s["gaps_per_step"] == 2
    assert dict(s["top_gaps_ms"]) == pytest.approx({"d -> a": 0.035, "b -> c": 0.025})
    assert s["gap_ms_by_next_scope"] == pytest.approx({"other": 0.060})
    assert s["gpu_busy_ms_per_step"] == pytest.approx(0.015 + 0.025 + 0.010)


def test_command_buffer_kernels_and_library_kernels(tmp_path):
    """As traced on an H200 (jax 0.11.2): kernels launched from a CUDA-graph command buffer carry
    `hlo_op` = the command buffer and `tf_op` = "XlaModule:"; the kernel's own name still maps to
    its fusion.  Library kernels (cuDNN, Pallas) map to nothing and take the scope of the kernel
    before them on the same stream; one with no kernel before it stays "other"."""
    hlo = ('  %wrapped_concatenate.1 = bf16[768,144]{1,0} fusion(%a, %b), kind=kLoop, calls=%c, '
           'metadata={op_name="jit(step)/jvp(backbone)/convert_element_type" '
           'scheduling_name="wrapped_concatenate.1" stack_frame_id=827}\n'
           '  %loop_slice_fusion.75 = f32[8]{0} fusion(%p), kind=kLoop, calls=%d, '
           'metadata={op_name="jit(step)/transpose(jvp(loss))/slice"}\n')
    cb = {"hlo_module": "jit_step", "hlo_op": "command_buffer_89", "tf_op": "XlaModule:"}
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}}]
    for i, (name, dur) in enumerate([("msda_fwd", 500.0), ("wrapped_concatenate_1", 1000.0),
                                     ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 3000.0),
                                     ("loop_slice_fusion_75", 2000.0), ("msda_bwd", 4000.0)]):
        events.append({"ph": "X", "pid": 1, "tid": 14, "ts": 10000.0 * i, "dur": dur,
                       "name": name, "args": cb})
    d = tmp_path / "t"
    d.mkdir()
    with gzip.open(d / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarize(str(tmp_path), hlo, steps=1)
    assert s["by_scope_ms"] == pytest.approx({"backbone": 4.0, "loss": 6.0, "other": 0.5})
    assert s["scope_from_previous_kernel_ms"] == pytest.approx(7.0)


def test_pipelined_time_is_the_median_window_of_back_to_back_dispatches():
    import time

    from sarformer_jax.benchmarks.timing import pipelined_time

    log = []
    slow = iter([0.0, 0.0, 0.2] + [0.0] * 100)  # one slow step, in the first window

    def dispatch():
        log.append("d")
        time.sleep(next(slow))

    def wait():
        log.append("w")

    sec, windows = pipelined_time(dispatch, wait, steps=4, windows=3)
    assert "".join(log) == "ddddw" * 3  # one wait per window, after its dispatches
    assert len(windows) == 3 and windows[0] >= 0.05  # 0.2 s over 4 steps
    assert sec == sorted(windows)[1] and sec < 0.02  # the slow window does not set the figure
    marks = []
    pipelined_time(dispatch, wait, steps=2, windows=2, after_window=lambda: marks.append(len(log)))
    assert marks == [len(log) - 3, len(log)]  # after each window's wait, outside its timing


def test_gc_clock_times_collections_by_generation():
    import gc

    from sarformer_jax.benchmarks.timing import GcClock

    with GcClock() as clock:
        before = clock.snapshot()
        cycles = []
        for _ in range(20000):  # reference cycles only the collector frees
            a = []
            a.append(a)
            cycles.append(a)
        del cycles, a
        gc.collect()
        after = clock.snapshot()
    assert after["counts"][2] == before["counts"][2] + 1 and after["seconds"][2] > 0
    assert clock._callback not in gc.callbacks  # removed on exit
    gc.collect()
    assert clock.snapshot() == after


def test_measuring_turn_waits_for_every_run_ready_or_failed(tmp_path):
    """Runs compiled at once measure one at a time: a run's turn comes only once every run is
    ready (or its driver marked it failed), and the lock is exclusive between processes."""
    import fcntl
    import threading

    from sarformer_jax.benchmarks.timing import measuring_turn, wait_for_all

    with pytest.raises(TimeoutError, match="b"):
        wait_for_all(str(tmp_path), ["a", "b"], timeout=0.0)
    got = []
    t = threading.Thread(target=lambda: got.append(
        measuring_turn(str(tmp_path), "a", ["a", "b", "c"], timeout=30)))
    t.start()
    t.join(1.0)
    assert t.is_alive() and not got  # b and c are not ready yet
    (tmp_path / "ready.b").touch()
    (tmp_path / "failed.c").touch()
    t.join(30)
    assert got and (tmp_path / "ready.a").exists()
    other = open(tmp_path / "lock", "w")
    with pytest.raises(BlockingIOError):  # a holds the turn
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    got[0].close()
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # now free
    other.close()


def test_measuring_turn_also_takes_the_shared_lock_named_by_the_environment(tmp_path, monkeypatch):
    """Two benches started side by side share SARFORMER_MEASURE_LOCK: a turn holds that lock
    too, and releases both when closed."""
    import fcntl

    from sarformer_jax.benchmarks.timing import MEASURE_LOCK_ENV, measuring_turn

    shared = tmp_path / "shared.lock"
    monkeypatch.setenv(MEASURE_LOCK_ENV, str(shared))
    (tmp_path / "one").mkdir()
    with measuring_turn(str(tmp_path / "one"), "a", ["a"], timeout=5):
        other = open(shared, "a")
        with pytest.raises(BlockingIOError):  # the other bench must wait for this turn
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on leaving the block
    other.close()


ASYNC_HLO = """HloModule jit_step, is_scheduled=true

ENTRY %main (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %all-reduce-start.1 = bf16[1024,64]{1,0} all-reduce-start(bf16[1024,64]{1,0} %g), replica_groups={{0,1}}
  %fusion.1 = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, calls=%fc
  %custom-call.2 = f32[8]{0} custom-call(f32[8]{0} %fusion.1), custom_call_target="x"
  %all-reduce-done.1 = bf16[1024,64]{1,0} all-reduce-done(bf16[1024,64]{1,0} %all-reduce-start.1)
  %all-reduce.2 = (f32[16]{0}, f32[4]{0}) all-reduce(f32[16]{0} %a, f32[4]{0} %b), replica_groups={{0,1}}
  ROOT %r = f32[8]{0} add(%custom-call.2, %p)
}
"""


def test_collective_schedule_reads_async_pairs_and_bytes():
    from sarformer_jax.benchmarks.profile import collective_schedule

    rows = collective_schedule(ASYNC_HLO)
    assert [r["kind"] for r in rows] == ["all-reduce", "all-reduce"]
    first, second = rows
    assert first["asynchronous"] and first["bytes"] == 1024 * 64 * 2
    assert first["compute_between"] == 2 and first["done_at"] > first["at"]
    assert not second["asynchronous"] and second["bytes"] == (16 + 4) * 4


def test_collective_schedule_of_a_compiled_two_device_reduction():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sarformer_jax.benchmarks.profile import collective_schedule

    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    x = jax.device_put(np.ones((4, 256), np.float32), NamedSharding(mesh, P("data")))
    f = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))
    rows = collective_schedule(f.lower(x).compile().as_text())
    assert any(r["kind"] == "all-reduce" and r["bytes"] >= 256 * 4 for r in rows), rows


def test_ops_grouped_across_layers(tmp_path):
    """Kernels of the same op in different layers add up under one shortened name stack."""
    from sarformer_jax.benchmarks.profile import op_key

    assert op_key("jit(step)/jit(main)/jvp(m)/backbone/blocks_11/attn/mul") == "jvp(m)/backbone/blocks*/attn/mul"
    assert op_key("a/pixel_decoder/layers.3/msda/add_any", depth=3) == "layers*/msda/add_any"
    hlo = "".join(f'  %loop_mul_fusion.{i} = f32[8]{{0}} fusion(%p), kind=kLoop, calls=%c, '
                  f'metadata={{op_type="mul" op_name="jit(step)/backbone/blocks_{i}/mlp/mul"}}\n' for i in (1, 2))
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 1, "name": "loop_mul_fusion_1", "dur": 2000.0, "args": {}},
              {"ph": "X", "pid": 1, "name": "loop_mul_fusion_2", "dur": 1000.0, "args": {}},
              {"ph": "X", "pid": 1, "name": "nvjet_tst_128x256", "dur": 500.0, "args": {}}]
    d = tmp_path / "t"
    d.mkdir()
    with gzip.open(d / "x.trace.json.gz", "wt") as f:
        json.dump(events, f)
    s = summarize(str(tmp_path), hlo, steps=1)
    assert s["top_ops_ms"] == [("elementwise", "jit(step)/backbone/blocks*/mlp/mul", pytest.approx(3.0))]
