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


def _write_trace(tmp_path, events) -> None:
    """A gzipped trace (a list of events or {"traceEvents": [...]}) under `tmp_path`, where
    jax.profiler would put one."""
    d = tmp_path / "t"
    d.mkdir()
    with gzip.open(d / "x.trace.json.gz", "wt") as f:
        json.dump(events, f)


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
    ("void cudnn::fusion::matmul_dq<true, 64>(void const*, void const*, void*)", "attention"),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)", "attention"),
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
    _write_trace(tmp_path, events)
    s = summarize(str(tmp_path), "", steps=1)
    assert s["by_class_ms"] == pytest.approx({"matrix": 3.0, "pallas": 1.0, "elementwise": 0.5})


def test_kernel_names_map_to_fusion_instructions(tmp_path):
    hlo = ('  %loop_add_fusion.173 = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, '
           'metadata={op_type="add" op_name="jit(step)/transpose(jvp(decode_head))/pixel_decoder/add"}\n')
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 1, "name": "loop_add_fusion_173", "dur": 2000.0, "args": {}}]
    _write_trace(tmp_path, events)
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
    _write_trace(tmp_path, events)
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
    _write_trace(tmp_path, events)
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
    _write_trace(tmp_path, {"traceEvents": events})
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

    enabled = gc.isenabled()
    gc.disable()  # only the explicit collection below: 20000 allocations can trigger a full one
    try:
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
    finally:
        if enabled:
            gc.enable()
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
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

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
    _write_trace(tmp_path, events)
    s = summarize(str(tmp_path), hlo, steps=1)
    assert s["top_ops_ms"] == [("elementwise", "jit(step)/backbone/blocks*/mlp/mul", pytest.approx(3.0))]


# A compiled module's header tables as XLA prints them: a frame's caller is frame
# `parent_frame_id - 1` (0: none).  Frames 1-4 are the entry (runpy, cli, the bench, the train
# step); 5 and 6 the model's layers, 7 flax inside layer line 367; 8 a sibling of 6 (line 369)
# and 10 a lambda on that same line under it; 9 code of the train step itself.
BW_HLO = """HloModule jit_step, is_scheduled=true

FileNames
1 "<frozen runpy>"
2 "/work/main/sarformer_jax/cli.py"
3 "/work/main/sarformer_jax/benchmarks/train.py"
4 "/work/main/sarformer_jax/train.py"
5 "/work/main/sarformer_jax/models/beit.py"
6 "/venv/lib/python3.12/site-packages/flax/nnx/nn/linear.py"

FunctionNames
1 "_run_code"
2 "main"
3 "bench_model"
4 "step"
5 "BEiT.run_layers"
6 "BEiTLayer.__call__"
7 "Linear.__call__"
8 "_tree_where"
9 "BEiTLayer.__call__.<locals>.<lambda>"

FileLocations
1 {file_name_id=1 function_name_id=1 line=88 end_line=88 column=4 end_column=27}
2 {file_name_id=2 function_name_id=2 line=118 end_line=118 column=15 end_column=44}
3 {file_name_id=3 function_name_id=3 line=256 end_line=256 column=14 end_column=67}
4 {file_name_id=4 function_name_id=4 line=284 end_line=284 column=48 end_column=94}
5 {file_name_id=5 function_name_id=5 line=460 end_line=460 column=8 end_column=40}
6 {file_name_id=5 function_name_id=6 line=367 end_line=367 column=8 end_column=30}
7 {file_name_id=6 function_name_id=7 line=90 end_line=90 column=8 end_column=30}
8 {file_name_id=5 function_name_id=6 line=369 end_line=369 column=8 end_column=30}
9 {file_name_id=4 function_name_id=8 line=222 end_line=222 column=8 end_column=30}
10 {file_name_id=5 function_name_id=9 line=369 end_line=369 column=20 end_column=30}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}
4 {file_location_id=4 parent_frame_id=4}
5 {file_location_id=5 parent_frame_id=5}
6 {file_location_id=6 parent_frame_id=6}
7 {file_location_id=7 parent_frame_id=7}
8 {file_location_id=8 parent_frame_id=6}
9 {file_location_id=9 parent_frame_id=5}
10 {file_location_id=10 parent_frame_id=9}

%fused_reduce.1 (param_0: bf16[2,1024,768]) -> bf16[768] {
  %param_0 = bf16[2,1024,768]{2,1,0} parameter(0)
  %c = bf16[] constant(0)
  ROOT %r = bf16[768]{0} reduce(bf16[2,1024,768]{2,1,0} %param_0, bf16[] %c), dimensions={0,1}, to_apply=%add
}

ENTRY %main (p0: bf16[2,1024,768], p1: f32[768], t: (f32[4], s32[4])) -> (f32[768], bf16[768]) {
  %p0 = bf16[2,1024,768]{2,1,0} parameter(0)
  %p1 = f32[768]{0} parameter(1)
  %t = (f32[4]{0}, s32[4]{0}) parameter(2)
  %input_reduce_fusion.246 = bf16[768]{0} fusion(%p0), kind=kInput, calls=%fused_reduce.1, metadata={op_name="jit(step)/transpose(jvp(backbone))/reduce_sum" stack_frame_id=7}
  %loop_add_fusion.3 = (f32[768]{0}, bf16[768]{0}) fusion(f32[768]{0} %p1, bf16[768]{0} %input_reduce_fusion.246, f32[768]{0} %p1, (f32[4]{0}, s32[4]{0}) %t), kind=kLoop, calls=%fused_add.3, metadata={op_name="jit(step)/optimizer/add" stack_frame_id=9}
  %loop_mul_fusion.4 = f32[768]{0} fusion(%p1), kind=kLoop, calls=%fused_mul.4, metadata={op_name="jit(step)/backbone/mul" stack_frame_id=10}
  ROOT %out = (f32[768]{0}, bf16[768]{0}) tuple(%loop_add_fusion.3)
}
"""

REDUCE_BYTES = 768 * 2 + 2 * 1024 * 768 * 2  # bf16 result + the bf16 operand
ADD_BYTES = 768 * (4 + 2) + 768 * 4 + 768 * 2 + 4 * (4 + 4)  # result tuple + %p1 once, reduce, %t


def _bandwidth_trace(directory, gpus=1):
    """Two steps: the reduction twice a step (10 us, found by its kernel name inside a command
    buffer), the add once (1 us, by its `hlo_op`), a cuDNN kernel with no instruction, and host
    work that is no GPU kernel."""
    events = [{"ph": "M", "name": "process_name", "pid": 9, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 9, "tid": 1, "name": "loop_add_fusion_3", "ts": 0.0,
               "dur": 5000.0, "args": {"hlo_op": "loop_add_fusion.3"}}]
    for pid in range(1, gpus + 1):
        events.append({"ph": "M", "name": "process_name", "pid": pid,
                       "args": {"name": f"/device:GPU:{pid - 1}"}})
        for i in range(4):
            events.append({"ph": "X", "pid": pid, "tid": 1, "ts": 100.0 * i, "dur": 10.0,
                           "name": "input_reduce_fusion_246",
                           "args": {"hlo_op": "command_buffer_1", "tf_op": "XlaModule:"}})
        for i in range(2):
            events.append({"ph": "X", "pid": pid, "tid": 1, "ts": 100.0 * i + 50, "dur": 1.0,
                           "name": "loop_add_fusion_3", "args": {"hlo_op": "loop_add_fusion.3"}})
            events.append({"ph": "X", "pid": pid, "tid": 2, "ts": 100.0 * i + 60, "dur": 250.0,
                           "name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
                           "args": {"hlo_op": "command_buffer_1"}})
    d = directory / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_hlo_source_lines_walk_the_stack_innermost_first():
    from sarformer_jax.benchmarks.profile import hlo_source_lines

    src = hlo_source_lines(BW_HLO)
    assert src[7] == "beit.py:367 < beit.py:460"  # flax's frame skipped, then up to the caller
    assert src[6] == "beit.py:367 < beit.py:460"
    assert src[5] == "beit.py:460"
    assert src[8] == "beit.py:369 < beit.py:460"  # parent_frame_id=6: frame 5
    assert src[10] == "beit.py:369 < beit.py:460"  # the lambda's line once
    assert src[9] == "train.py:222 < train.py:284"  # only the train step on the stack
    assert src[4] == "train.py:284"
    assert 1 not in src and 2 not in src and 3 not in src  # runpy, cli, the benchmark
    assert hlo_source_lines(BW_HLO, depth=1)[7] == "beit.py:367"
    assert hlo_source_lines(HLO) == {}  # no tables


def test_kernel_bandwidth_bytes_rate_and_source(tmp_path):
    from sarformer_jax.benchmarks.profile import kernel_bandwidth

    _bandwidth_trace(tmp_path)
    rows = kernel_bandwidth(str(tmp_path), BW_HLO, steps=2)
    assert [r["kernel"] for r in rows] == ["cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
                                           "input_reduce_fusion_246", "loop_add_fusion_3"]
    cudnn, red, add = rows
    assert red["instruction"] == "input_reduce_fusion.246" and red["cls"] == "reduction"
    assert red["bytes_per_call"] == REDUCE_BYTES
    assert red["calls_per_step"] == pytest.approx(2.0)
    assert red["ms_per_step"] == pytest.approx(0.020)
    assert red["gb_per_s"] == pytest.approx(REDUCE_BYTES / 10e-6 / 1e9)  # 314.7 GB/s
    assert red["result_type"] == "bf16[768]{0}"
    assert red["source"] == "beit.py:367 < beit.py:460"
    assert red["op_name"] == "jit(step)/transpose(jvp(backbone))/reduce_sum"
    assert add["instruction"] == "loop_add_fusion.3" and add["cls"] == "elementwise"
    assert add["bytes_per_call"] == ADD_BYTES
    assert add["calls_per_step"] == pytest.approx(1.0) and add["ms_per_step"] == pytest.approx(0.001)
    assert add["gb_per_s"] == pytest.approx(ADD_BYTES / 1e-6 / 1e9)
    assert add["source"] == "train.py:222 < train.py:284"
    assert cudnn["instruction"] == "" and cudnn["cls"] == "attention"
    assert cudnn["bytes_per_call"] == 0 and cudnn["gb_per_s"] is None
    assert cudnn["ms_per_step"] == pytest.approx(0.25)
    json.dumps(rows)  # stored in the bench's results


def test_kernel_bandwidth_class_filter_top_and_two_gpus(tmp_path):
    from sarformer_jax.benchmarks.profile import kernel_bandwidth

    _bandwidth_trace(tmp_path)
    rows = kernel_bandwidth(str(tmp_path), BW_HLO, steps=2, classes={"reduction"})
    assert [r["kernel"] for r in rows] == ["input_reduce_fusion_246"]
    rows = kernel_bandwidth(str(tmp_path), BW_HLO, steps=2, classes={"elementwise", "reduction"})
    assert [r["cls"] for r in rows] == ["reduction", "elementwise"]
    assert [r["kernel"] for r in kernel_bandwidth(str(tmp_path), BW_HLO, steps=2, top=1)] == [
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]
    assert kernel_bandwidth(str(tmp_path / "none"), BW_HLO, steps=2) == []
    two = tmp_path / "two"
    _bandwidth_trace(two, gpus=2)  # per step and device: as on one GPU
    red = kernel_bandwidth(str(two), BW_HLO, steps=2, classes={"reduction"})[0]
    assert red["calls_per_step"] == pytest.approx(2.0) and red["ms_per_step"] == pytest.approx(0.02)
    assert red["gb_per_s"] == pytest.approx(REDUCE_BYTES / 10e-6 / 1e9)


def test_kernel_bandwidth_command_line(tmp_path, capsys):
    from sarformer_jax.benchmarks.profile import main

    _bandwidth_trace(tmp_path)
    assert main([str(tmp_path), "--steps", "2"]) == 1  # no HLO yet
    assert "step.hlo.txt" in capsys.readouterr().err
    with gzip.open(tmp_path / "step.hlo.txt.gz", "wt") as f:
        f.write(BW_HLO)
    assert main([str(tmp_path), "--steps", "2", "--classes", "elementwise,reduction"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [ln for ln in out if " bw " in ln]
    assert len(rows) == 2 and "cudnn" not in "".join(out)
    assert "input_reduce_fusion_246" in rows[0] and "loop_add_fusion_3" in rows[1]
    assert f"{REDUCE_BYTES / 1e6:.1f} MB" in rows[0] and " 315 GB/s" in rows[0]
    assert "beit.py:367 < beit.py:460" in rows[0] and "x2 " in rows[0]
    assert main([str(tmp_path), "--steps", "1", "--top", "1"]) == 0  # all classes, one row
    rows = [ln for ln in capsys.readouterr().out.splitlines() if " bw " in ln]
    assert len(rows) == 1 and "cudnn" in rows[0] and "0.500 ms" in rows[0]


MM_HLO = """HloModule jit_step, is_scheduled=true

%gemm_fusion_dot.7_computation (parameter_0: bf16[64,32], parameter_1: bf16[32,16]) -> bf16[64,16] {
  %parameter_0 = bf16[64,32]{1,0} parameter(0)
  %parameter_1 = bf16[32,16]{1,0} parameter(1)
  %nested = bf16[32,16]{1,0} fusion(%parameter_1), kind=kCustom, calls=%inner.1
  ROOT %dot.3 = bf16[64,16]{1,0} dot(%parameter_0, %nested), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%inner.1 (p: bf16[32,16]) -> bf16[32,16] {
  ROOT %p = bf16[32,16]{1,0} parameter(0)
}

ENTRY %main (a: bf16[128,256], b: bf16[256,512], x: bf16[2,8,8,4], w: bf16[3,3,4,6], q: bf16[2,10,3,8]) -> bf16[128,512] {
  %a = bf16[128,256]{1,0} parameter(0)
  %b = bf16[256,512]{1,0} parameter(1)
  %x = bf16[2,8,8,4]{3,2,1,0} parameter(2)
  %w = bf16[3,3,4,6]{3,2,1,0} parameter(3)
  %q = bf16[2,10,3,8]{3,2,1,0} parameter(4)
  %custom-call.5 = (bf16[128,512]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(backbone)/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["0"]}}}
  %gemm_fusion_dot.7 = bf16[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.7_computation, metadata={op_name="jit(step)/jvp(loss)/dot_general"}
  %cudnn-conv.2 = (bf16[2,8,8,6]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/jvp(backbone)/conv_general_dilated"}
  %cudnn-conv-bw-filter.4 = (bf16[3,3,4,6]{3,2,1,0}, u8[0]{0}) custom-call(%x, %cudnn-conv.2), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(step)/transpose(jvp(backbone))/conv_general_dilated"}
  %fmha.1 = (bf16[2,3,10,8]{3,1,2,0}, f32[2,3,10]{2,1,0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(backbone)/dot_product_attention_fwd"}
  %fmha-bwd.1 = (bf16[2,10,3,8]{3,2,1,0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmaxBackward", metadata={op_name="jit(step)/transpose(jvp(backbone))/dot_product_attention_bwd"}
  %loop_add_fusion.1 = bf16[128,256]{1,0} add(%a, %a)
  ROOT %r = bf16[128,512]{1,0} get-tuple-element(%custom-call.5), index=0
}
"""
MM_FLOPS = {"custom-call.5": 2 * 128 * 512 * 256, "gemm_fusion_dot.7": 2 * 64 * 16 * 32,
            "cudnn-conv.2": 2 * (2 * 8 * 8 * 6) * (3 * 3 * 4),
            "cudnn-conv-bw-filter.4": 2 * (2 * 8 * 8 * 6) * (3 * 3 * 4),
            "fmha.1": 2 * 2 * 3 * 10 * 10 * (8 + 8), "fmha-bwd.1": int(2.5 * 2 * 2 * 3 * 10 * 10 * 16)}


def test_hlo_matrix_flops_counts_each_kernel_once():
    from sarformer_jax.benchmarks.profile import hlo_matrix_flops

    # the dot inside the gemm fusion counts in the fusion, not on its own; the add is no matrix work
    assert hlo_matrix_flops(MM_HLO) == MM_FLOPS


def test_matrix_efficiency_rates_and_unmatched_library_kernels(tmp_path, capsys):
    from sarformer_jax.benchmarks.profile import main, matrix_efficiency

    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}}]
    for step in range(2):
        t = 1000.0 * step
        events += [
            {"ph": "X", "pid": 1, "tid": 1, "ts": t, "dur": 2.0, "name": "nvjet_sm90_tst_128x128",
             "args": {"hlo_op": "custom-call.5"}},
            {"ph": "X", "pid": 1, "tid": 1, "ts": t + 10, "dur": 1.0, "name": "gemm_fusion_dot_7",
             "args": {"hlo_op": "command_buffer_1"}},  # matched by its kernel name
            {"ph": "X", "pid": 1, "tid": 1, "ts": t + 20, "dur": 4.0,
             "name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
             "args": {"hlo_op": "command_buffer_1"}},  # a library kernel in a command buffer
            {"ph": "X", "pid": 1, "tid": 1, "ts": t + 30, "dur": 3.0, "name": "loop_add_fusion_1",
             "args": {}}]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    res = matrix_efficiency(str(tmp_path), MM_HLO, steps=2)
    assert [r["instruction"] for r in res["rows"]] == ["custom-call.5", "gemm_fusion_dot.7"]
    gemm = res["rows"][0]
    assert gemm["ms_per_step"] == pytest.approx(0.002) and gemm["calls_per_step"] == pytest.approx(1)
    assert gemm["tflop_per_s"] == pytest.approx(MM_FLOPS["custom-call.5"] / 2e-6 / 1e12)
    assert gemm["op_name"] == "jit(step)/jvp(backbone)/dot_general"
    assert res["matched_ms"] == pytest.approx(0.003)
    assert res["matched_tflop"] == pytest.approx(
        (MM_FLOPS["custom-call.5"] + MM_FLOPS["gemm_fusion_dot.7"]) / 1e12)
    assert res["unmatched_ms"] == pytest.approx(0.004)  # the attention kernel; the add is no matrix kernel
    assert res["program_tflop"] == pytest.approx(sum(MM_FLOPS.values()) / 1e12)
    json.dumps(res)
    with gzip.open(tmp_path / "step.hlo.txt.gz", "wt") as f:
        f.write(MM_HLO)
    assert main([str(tmp_path), "--steps", "2", "--matrix"]) == 0
    out = capsys.readouterr().out
    assert "ms of matrix/attention kernels matched none" in out
    assert len([ln for ln in out.splitlines() if "   mm " in ln]) == 2


def test_time_by_source_sums_rows_per_class_and_line():
    from sarformer_jax.benchmarks.profile import time_by_source

    rows = [{"cls": "elementwise", "source": "beit.py:1", "ms_per_step": 0.5},
            {"cls": "elementwise", "source": "beit.py:1", "ms_per_step": 0.25},
            {"cls": "reduction", "source": "beit.py:1", "ms_per_step": 0.5},
            {"cls": "copy", "source": "", "ms_per_step": 0.1}]
    assert time_by_source(rows) == [("elementwise", "beit.py:1", 0.75, 2),
                                    ("reduction", "beit.py:1", 0.5, 1), ("copy", "?", 0.1, 1)]
    assert time_by_source(rows, top=1) == [("elementwise", "beit.py:1", 0.75, 2)]


def test_matrix_flops_by_kind_and_the_hlo_only_command_line(tmp_path, capsys):
    from sarformer_jax.benchmarks.profile import main, matrix_flops_by_kind

    rows = {(k, dt): (n, tf) for k, dt, n, tf in matrix_flops_by_kind(MM_HLO)}
    assert rows[("cublas", "bf16")] == (1, pytest.approx(MM_FLOPS["custom-call.5"] / 1e12))
    assert rows[("gemm_fusion", "bf16")] == (1, pytest.approx(MM_FLOPS["gemm_fusion_dot.7"] / 1e12))
    assert rows[("cudnn_conv", "bf16")][0] == 2
    assert rows[("cudnn_attention", "bf16")] == (2, pytest.approx(
        (MM_FLOPS["fmha.1"] + MM_FLOPS["fmha-bwd.1"]) / 1e12))
    assert main([str(tmp_path), "--matrix"]) == 1  # no HLO
    with gzip.open(tmp_path / "step.hlo.txt.gz", "wt") as f:
        f.write(MM_HLO)
    assert main([str(tmp_path), "--matrix"]) == 0  # the HLO alone: the program's table only
    out = capsys.readouterr().out
    assert "the program's matrix work" in out and "cudnn_attention" in out and "   mm " not in out
