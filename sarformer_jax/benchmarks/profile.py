"""Where a compiled step spends its GPU time: a jax.profiler trace of a few steps, its device
kernels summed by name and attributed to the model's named scopes (`jax.named_scope` in the
model, loss and step: backbone, pixel_decoder, hungarian, loss, optimizer, ...) through the HLO
instruction metadata of the compiled program.  Used by `sarformer bench train --profile DIR`."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

# most specific first: a kernel is attributed to the first scope its op name contains
SCOPES = ("hungarian", "sam_encoder", "sam_mask_decoder", "sam_postprocess", "sam_nms", "guidance",
          "pixel_decoder_second_pass", "pixel_decoder",
          "auxiliary_head", "loss", "optimizer", "backbone", "decode_head")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"", re.M)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """instruction name -> metadata op_name (the jax name stack) from optimized HLO text."""
    return {m.group(1).lstrip("%"): m.group(2) for m in _INSTR.finditer(hlo_text)}


def _op_name(args: dict, kernel: str, ops: dict[str, str]) -> str:
    """The jax name stack of a kernel event, through the HLO instruction it came from: the
    event's `hlo_op` when that is an instruction (inside a CUDA-graph command buffer it names the
    command buffer instead), else the kernel's name (XLA names a fusion's kernel after the
    instruction, `loop_add_fusion.173` -> `loop_add_fusion_173`); last, the trace's own `tf_op`
    when it is a name stack (on the GPU it is usually just "XlaModule:")."""
    for key in ("hlo_op", "long_name", "name"):
        v = str(args.get(key, "") or "")
        if v in ops:
            return ops[v]
    for cand in (kernel, re.sub(r"_(\d+)$", r".\1", kernel), kernel.split("__")[0]):
        if cand in ops:
            return ops[cand]
    tf_op = str(args.get("tf_op", "") or "")
    return tf_op if "/" in tf_op else ""


def op_key(op_name: str, depth: int = 5) -> str:
    """A kernel's jax name stack shortened to group like ops: layer indices become `*`
    (`blocks_3` and `blocks_7` are one op), and the last `depth` parts are kept."""
    parts = [re.sub(r"(?<=[A-Za-z])[_.]?\d+$", "*", p) for p in op_name.split("/") if p]
    return "/".join(parts[-depth:])


def _scope(op_name: str, kernel: str = "") -> str:
    if "nccl" in kernel.lower():  # NCCL's kernels carry no HLO name: the collectives
        return "collectives (nccl)"
    return next((s for s in SCOPES if s in op_name), "other")


def _covered(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans (kernels of several streams overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _gaps(spans: list[tuple[float, float, str, str]], min_gap_us: float = 2.0):
    """(name of the last kernel before, the span after, gap length) for every stretch of at
    least `min_gap_us` with no kernel running (spans of several streams merged)."""
    end, last = None, None
    for span in sorted(spans):
        if end is not None and span[0] - end >= min_gap_us:
            yield last, span, span[0] - end
        if end is None or span[1] > end:
            end, last = span[1], span[2]


# Kernel classes, by the GPU kernel's name (the first rule that matches wins).  "matrix" is what
# runs on the tensor cores at a GEMM's rate: cuBLAS / cuBLASLt (nvjet, xmma, cutlass), cuDNN
# convolutions (implicit GEMM) and XLA's Triton GEMM fusions; "attention" is cuDNN's fused
# attention; "pallas" our kernels (msda_*, sam_*); the rest is XLA's elementwise / reduction
# fusions, copies, sorts and collectives.
KERNEL_CLASSES = (
    ("collective", ("nccl",)),
    ("attention", ("fmha", "flash", "sdpa", "mha_")),
    ("matrix", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk", "implicit_convolve", "wgrad",
                "dgrad", "fprop")),
    ("pallas", ("msda_", "sam_image_to_tokens", "sam_upscale")),
    ("sort", ("sort", "radix", "cub::", "topk", "top_k")),
    ("copy", ("memcpy", "memset", "copy")),
    ("reduction", ("reduce",)),
)


def kernel_class(name: str) -> str:
    """The class of a GPU kernel by its name (KERNEL_CLASSES); "elementwise" otherwise."""
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "elementwise"


def summarize(trace_dir: str, hlo_text: str, steps: int, top: int = 25) -> dict:
    """Kernel time per step and device (summed over the GPUs in the trace, divided by their
    number), by scope and by kernel."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not paths:
        return {"error": f"no *.trace.json.gz under {trace_dir}"}
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    pnames = {e["pid"]: e.get("args", {}).get("name", "") for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in pnames.items() if "/device:GPU" in n or "GPU" in n.upper() and "CPU" not in n.upper()}
    ops = hlo_op_names(hlo_text)
    by_scope, by_kernel, kernel_scope = collections.Counter(), collections.Counter(), {}
    by_class = collections.Counter()
    by_op = collections.Counter()  # (class, shortened name stack) -> time, named kernels only
    total = 0.0
    samples = []  # a few raw kernel events, to check the attribution against
    intervals = collections.defaultdict(list)  # pid -> [(start, end)] of kernels
    named = collections.defaultdict(list)  # pid -> [(start, end, kernel name, scope)]
    inferred = 0.0  # kernel time attributed through the kernel before it (see below)
    last_scope: dict = {}
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu),
                     key=lambda e: (e["pid"], e.get("tid"), float(e.get("ts", 0.0))))
    for e in kernels:
        dur = float(e.get("dur", 0.0))
        intervals[e["pid"]].append((float(e.get("ts", 0.0)), float(e.get("ts", 0.0)) + dur))
        args = e.get("args", {}) or {}
        name = e.get("name", "?")
        op_name = _op_name(args, name, ops)
        scope = _scope(op_name, name)
        stream = (e["pid"], e.get("tid"))
        if op_name:
            last_scope[stream] = scope
        elif scope == "other" and stream in last_scope:
            # library kernels (cuDNN, cuBLAS, Pallas custom calls, copies) launched from a
            # CUDA-graph command buffer carry no instruction name: they take the scope of the
            # kernel before them on their stream
            scope = last_scope[stream]
            inferred += dur
        if len(samples) < 8:
            samples.append({"name": e.get("name"), "args": args, "op_name": op_name})
        named[e["pid"]].append((float(e.get("ts", 0.0)), float(e.get("ts", 0.0)) + dur, name,
                                scope))
        by_scope[scope] += dur
        by_class[kernel_class(name)] += dur
        if op_name:
            by_op[(kernel_class(name), op_key(op_name))] += dur
        by_kernel[name] += dur
        kernel_scope.setdefault(name, scope)
        total += dur
    n_gpu = max(len({e.get("pid") for e in events if e.get("ph") == "X" and e.get("pid") in gpu}), 1)
    ms = lambda us: us / 1e3 / max(steps, 1) / n_gpu  # noqa: E731  per step and device
    gap_pairs, gap_next_scope, gap_count = collections.Counter(), collections.Counter(), 0
    for spans in named.values():
        for prev, nxt, gap in _gaps(spans):
            gap_pairs[f"{prev[:60]} -> {nxt[2][:60]}"] += gap
            gap_next_scope[nxt[3]] += gap
            gap_count += 1
    return {"trace": paths[-1], "gpus": n_gpu, "gpu_kernel_ms_per_step": ms(total),
            "gpu_busy_ms_per_step": ms(sum(_covered(v) for v in intervals.values())),
            # time with no kernel running on a GPU, by the kernel that ends the gap
            "gaps_per_step": gap_count / max(steps, 1) / n_gpu,
            "gap_ms_by_next_scope": {k: ms(v) for k, v in gap_next_scope.most_common()},
            "top_gaps_ms": [(k, ms(v)) for k, v in gap_pairs.most_common(top)],
            "sample_events": samples,
            "scope_from_previous_kernel_ms": ms(inferred),
            "hlo_instructions_with_op_name": len(ops),
            "by_scope_ms": {k: ms(v) for k, v in by_scope.most_common()},
            "by_class_ms": {k: ms(v) for k, v in by_class.most_common()},
            "top_kernels_ms": [(k, kernel_scope[k], ms(v)) for k, v in by_kernel.most_common(top)],
            "top_ops_ms": [(cls, key, ms(v)) for (cls, key), v in by_op.most_common(top)]}


def print_summary(s: dict, tag: str) -> None:
    if "error" in s:
        print(f"[{tag}] profile: {s['error']}", flush=True)
        return
    idle = s.get("idle_ms_per_step")
    print(f"[{tag}] profile: {s['gpu_kernel_ms_per_step']:.1f} ms of GPU kernels per step and "
          f"device, {s['gpu_busy_ms_per_step']:.1f} ms with a kernel running"
          + (f" ({idle:.1f} ms without)" if idle is not None else ""), flush=True)
    if s.get("scope_from_previous_kernel_ms"):
        print(f"[{tag}]   ({s['scope_from_previous_kernel_ms']:.1f} ms of library kernels with no "
              "HLO name take the scope of the kernel before them)", flush=True)
    for k, v in s["by_scope_ms"].items():
        print(f"[{tag}]   scope {k:28s} {v:8.2f} ms", flush=True)
    for k, v in s.get("by_class_ms", {}).items():
        print(f"[{tag}]   class {k:28s} {v:8.2f} ms", flush=True)
    for name, scope, v in s["top_kernels_ms"]:
        print(f"[{tag}]   kernel {v:8.2f} ms  [{scope}] {name[:110]}", flush=True)
    for cls, key, v in s.get("top_ops_ms", []):
        print(f"[{tag}]   op {v:8.2f} ms  [{cls}] {key[-110:]}", flush=True)
    if s.get("top_gaps_ms"):
        print(f"[{tag}]   {s['gaps_per_step']:.0f} gaps per step and device with no kernel "
              "running; the largest totals, by the kernels around them:", flush=True)
        for pair, v in s["top_gaps_ms"][:15]:
            print(f"[{tag}]   gap {v:8.2f} ms  {pair}", flush=True)


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1,
                "pred": 1, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|f64|s8|u8|pred|s64|u64)\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start|-done)?\(")


def _bytes(type_text: str) -> int:
    total = 0
    for dt, dims in _SHAPE.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dt]
    return total


def collective_schedule(hlo_text: str) -> list[dict]:
    """Where the collectives sit in the scheduled entry computation of a compiled module.

    One row per collective in program order: its kind, its result bytes, its position (as a
    fraction of the entry computation's instructions) and, for an async pair, the position of
    its `-done` and how many fusions / custom calls run between the start and the done (the
    compute it can overlap).  Loop bodies and other computations are not walked: a collective
    inside a loop shows as that loop's `while`."""
    entry = re.search(r"^ENTRY [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S)
    if not entry:
        return []
    lines = [ln for ln in entry.group(1).splitlines() if "=" in ln]
    n = max(len(lines), 1)
    rows, open_starts = [], {}
    compute = [0]
    for i, ln in enumerate(lines):
        name = ln.split("=", 1)[0].strip().removeprefix("ROOT ").strip().lstrip("%")
        rhs = ln.split("=", 1)[1]
        m = _COLLECTIVE.search(rhs)
        if m:
            kind, phase = m.group(1), m.group(2) or ""
            type_text = rhs[:m.start()]
            if phase == "-done":
                inside = re.search(r"-done\(([^)]*)\)", rhs)
                operand = inside.group(1).split()[-1].lstrip("%") if inside else ""
                start = open_starts.pop(operand, None)
                if start is not None:
                    start.update(done_at=i / n, compute_between=compute[0] - start.pop("_c"))
                continue
            row = dict(kind=kind, name=name, bytes=_bytes(type_text), at=i / n,
                       asynchronous=phase == "-start")
            if phase == "-start":
                row["_c"] = compute[0]
                open_starts[name] = row
            rows.append(row)
        elif re.search(r"\b(fusion|custom-call|convolution|dot)\(", rhs):
            compute[0] += 1
    for row in rows:
        row.pop("_c", None)
    return rows


def print_collective_schedule(rows: list[dict], tag: str, top: int = 20) -> None:
    big = sorted(rows, key=lambda r: -r["bytes"])[:top]
    total = sum(r["bytes"] for r in rows)
    print(f"[{tag}] {len(rows)} collectives in the entry computation, {total / 2**20:.1f} MiB; "
          f"the largest (position in the schedule 0..1; fusions between start and done):",
          flush=True)
    for r in sorted(big, key=lambda r: r["at"]):
        extra = (f" done at {r['done_at']:.3f}, {r['compute_between']} compute ops between"
                 if "done_at" in r else (" (async, done not found)" if r["asynchronous"] else
                                         " (synchronous)"))
        print(f"[{tag}]   {r['kind']:18s} {r['bytes'] / 2**20:9.2f} MiB at {r['at']:.3f}{extra}",
              flush=True)
