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
import sys

# most specific first: a kernel is attributed to the first scope its op name contains
SCOPES = ("hungarian", "sam_encoder", "sam_mask_decoder", "sam_postprocess", "sam_nms", "guidance",
          "pixel_decoder_second_pass", "pixel_decoder",
          "auxiliary_head", "loss", "optimizer", "backbone", "decode_head")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"", re.M)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """instruction name -> metadata op_name (the jax name stack) from optimized HLO text."""
    return {m.group(1).lstrip("%"): m.group(2) for m in _INSTR.finditer(hlo_text)}


def _instruction(args: dict, kernel: str, known) -> str:
    """The HLO instruction a kernel event came from, among the names in `known`; "" when none:
    the event's `hlo_op` when that is an instruction (inside a CUDA-graph command buffer it names
    the command buffer instead), else the kernel's name (XLA names a fusion's kernel after the
    instruction, `loop_add_fusion.173` -> `loop_add_fusion_173`)."""
    for key in ("hlo_op", "long_name", "name"):
        v = str(args.get(key, "") or "")
        if v and v in known:
            return v
    for cand in (kernel, re.sub(r"_(\d+)$", r".\1", kernel), kernel.split("__")[0]):
        if cand and cand in known:
            return cand
    return ""


def _op_name(args: dict, kernel: str, ops: dict[str, str]) -> str:
    """The jax name stack of a kernel event, through the HLO instruction it came from
    (`_instruction`); last, the trace's own `tf_op` when it is a name stack (on the GPU it is
    usually just "XlaModule:")."""
    inst = _instruction(args, kernel, ops)
    if inst:
        return ops[inst]
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
    # cuDNN fused attention and its backward helpers (cudnn::fusion::matmul_dq, fmha_dbias, ...)
    ("attention", ("fmha", "flash", "sdpa", "mha_", "cudnn::fusion::")),
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


def trace_path(trace_dir: str) -> str | None:
    """The last (by name) `*.trace.json.gz` under `trace_dir`, searched recursively (where
    jax.profiler writes it: plugins/profile/<run>/<host>.trace.json.gz); None when there is none."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    return paths[-1] if paths else None


def _load_trace(path: str) -> tuple[list[dict], set]:
    """The events of a gzipped trace and the pids of its GPU devices."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    pnames = {e["pid"]: e.get("args", {}).get("name", "") for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in pnames.items() if "/device:GPU" in n or "GPU" in n.upper() and "CPU" not in n.upper()}
    return events, gpu


def summarize(trace_dir: str, hlo_text: str, steps: int, top: int = 25) -> dict:
    """Kernel time per step and device (summed over the GPUs in the trace, divided by their
    number), by scope and by kernel."""
    path = trace_path(trace_dir)
    if path is None:
        return {"error": f"no *.trace.json.gz under {trace_dir}"}
    events, gpu = _load_trace(path)
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
    return {"trace": path, "gpus": n_gpu, "gpu_kernel_ms_per_step": ms(total),
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
                "pred": 1, "s64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1,
                "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
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


# ---------------------------------------------------------------------------------------------
# Per-kernel bandwidth: the bytes a kernel's HLO instruction moves against the time it takes.

_TABLE = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n((?:\d+ [^\n]*\n?)*)",
                    re.MULTILINE)
_DEF = re.compile(r"^[ \t]*(?:ROOT[ \t]+)?%([\w.\-]+)[ \t]*=[ \t]*(.*?)[ \t]([a-z][\w\-]*)\(",
                  re.MULTILINE)
_OPERAND = re.compile(r"%([\w.\-]+)")


def _package_frame(path: str) -> bool:
    """A source file of the model (sarformer_jax or kernels/), not the command-line entry
    points or the benchmarks that drive it."""
    return (("/sarformer_jax/" in path or "/kernels/" in path) and "/benchmarks/" not in path
            and not path.endswith(("/cli.py", "/bench.py")))


def hlo_source_lines(hlo_text: str, depth: int = 2) -> dict[int, str]:
    """Stack frame id -> the innermost `depth` source lines of the model under that frame,
    innermost first: "beit.py:367 < beit.py:460".

    Read from the tables XLA prints at the top of a compiled module (FileNames, FileLocations,
    StackFrames; an instruction's metadata names its frame by `stack_frame_id`).
    Frames are numbered from 1 and a frame's caller is frame `parent_frame_id - 1`, 0 meaning
    none (as printed by XLA: a root frame shows its own number, and on a compiled train step
    frame 4, `cli.py:118 main`, shows parent_frame_id=4 for its caller frame 3,
    `cli.py:122 <module>`).  Frames outside the model's files (jax, flax, optax, the CLI and the
    benchmarks) are skipped, and so is the train step (sarformer_jax/train.py) unless nothing
    else of the package is on the stack; a line repeated by nested frames (a lambda on the line
    of its caller) shows once.  Frames with no such line are left out."""
    tables = {m.group(1): m.group(2).splitlines() for m in _TABLE.finditer(hlo_text)}
    if "StackFrames" not in tables:
        return {}
    files = {int(i): n.strip().strip('"')
             for i, n in (ln.split(" ", 1) for ln in tables.get("FileNames", []))}
    locations, frames = {}, {}
    for ln in tables.get("FileLocations", []):
        fields = dict(re.findall(r"(\w+)=(\d+)", ln))
        path = files.get(int(fields.get("file_name_id", 0)), "")
        locations[int(ln.split(" ", 1)[0])] = (path, int(fields.get("line", 0)))
    for ln in tables["StackFrames"]:
        fields = dict(re.findall(r"(\w+)=(\d+)", ln))
        frames[int(ln.split(" ", 1)[0])] = (int(fields.get("file_location_id", 0)),
                                            int(fields.get("parent_frame_id", 0)) - 1)
    out = {}
    for fid in frames:
        model, driver = [], []
        f, seen = fid, 0
        while f in frames and seen < len(frames):
            loc, parent = frames[f]
            path, line = locations.get(loc, ("", 0))
            label = f"{path.rsplit('/', 1)[-1]}:{line}"
            if path.endswith("/train.py") and _package_frame(path):
                lines = driver
            else:
                lines = model if _package_frame(path) else None
            if lines is not None and len(lines) < depth and (not lines or lines[-1] != label):
                lines.append(label)
            if len(model) >= depth or parent >= f:  # a caller has a smaller number
                break
            f, seen = parent, seen + 1
        if model or driver:
            out[fid] = " < ".join(model or driver)
    return out


def _hlo_instructions(hlo_text: str) -> dict[str, tuple[str, list[str], str, int]]:
    """Instruction name -> (result type, operand names, metadata op_name, stack_frame_id or 0)
    for every instruction of a module's text (fused computations included)."""
    out = {}
    for m in _DEF.finditer(hlo_text):
        start = m.end()
        end = hlo_text.find("\n", start)
        line = hlo_text[start:end if end >= 0 else len(hlo_text)]
        close = line.find(")")
        if close < 0:
            close = len(line)
        elif "(" in line[:close]:  # operands with tuple types: find the matching parenthesis
            level = 1
            for close, ch in enumerate(line):
                level += (ch == "(") - (ch == ")")
                if level == 0:
                    break
        operands, attrs = line[:close], line[close:]
        op_name = re.search(r'op_name="([^"]*)"', attrs)
        frame = re.search(r"stack_frame_id=(\d+)", attrs)
        out[m.group(1)] = (m.group(2), _OPERAND.findall(operands),
                           op_name.group(1) if op_name else "", int(frame.group(1)) if frame else 0)
    return out


def _instruction_bytes(name: str, instrs: dict) -> int:
    """The bytes an instruction moves, as estimated here: its result written once plus each
    distinct operand read whole once.  Too high for a fusion that reads only a slice of an
    operand (a dynamic-slice of a stacked loop buffer) or updates one in place
    (dynamic-update-slice); too low for one that reads an operand several times."""
    typ, operands = instrs[name][:2]
    return _bytes(typ) + sum(_bytes(instrs[o][0]) for o in dict.fromkeys(operands) if o in instrs)


def _kernel_times(path: str, instrs: dict) -> tuple[collections.Counter, collections.Counter, int]:
    """(time in us, calls) of each (kernel name, HLO instruction) among the GPU kernel events
    of the trace at `path`, and the number of GPUs in it."""
    events, gpu = _load_trace(path)
    time_us, calls = collections.Counter(), collections.Counter()
    pids = set()
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu:
            continue
        name = e.get("name", "?")
        key = (name, _instruction(e.get("args", {}) or {}, name, instrs))
        time_us[key] += float(e.get("dur", 0.0))
        calls[key] += 1
        pids.add(e["pid"])
    return time_us, calls, len(pids)


def kernel_bandwidth(trace_dir: str, hlo_text: str, steps: int, top: int = 40,
                     classes: set[str] | None = None) -> list[dict]:
    """The GPU kernels of a profiled program with the bandwidth each achieves, by time.

    Each kernel event of the trace (the last `*.trace.json.gz` under `trace_dir`, of `steps`
    steps) is matched to the HLO instruction it runs (as for the scopes of `summarize`), whose
    bytes are estimated from the types in `hlo_text` (`_instruction_bytes`).  One row per kernel
    and instruction, with time and calls per step and device (over the GPUs in the trace):
    kernel, instruction ("" when none matches: library kernels, copies), cls (`kernel_class`),
    ms_per_step, calls_per_step, bytes_per_call, gb_per_s (None without bytes), result_type,
    source (`hlo_source_lines`) and op_name.  Only kernels of the `classes` given (all when
    None); the `top` by time.  A kernel far below the HBM bandwidth (about 4.8 TB/s on an H200)
    while moving many bytes is one to look at; a figure above it means the bytes are overcounted.
    """
    path = trace_path(trace_dir)
    if path is None:
        return []
    instrs = _hlo_instructions(hlo_text)
    sources = hlo_source_lines(hlo_text)
    time_us, calls, gpus = _kernel_times(path, instrs)
    per_step = max(steps, 1) * max(gpus, 1)  # per step and device
    rows = []
    for (kernel, inst), us in time_us.items():
        cls = kernel_class(kernel)
        if classes is not None and cls not in classes:
            continue
        typ, _, op_name, frame = instrs.get(inst, ("", [], "", 0))
        nbytes = _instruction_bytes(inst, instrs) if inst else 0
        n = calls[(kernel, inst)]
        rows.append({"kernel": kernel, "instruction": inst, "cls": cls,
                     "ms_per_step": us / 1e3 / per_step, "calls_per_step": n / per_step,
                     "bytes_per_call": nbytes,
                     # bytes per call x calls / time: B / us / 1e3 = GB/s
                     "gb_per_s": nbytes * n / (us * 1e3) if nbytes and us > 0 else None,
                     "result_type": typ, "source": sources.get(frame, ""), "op_name": op_name})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:top]


_COMPUTATION = re.compile(r"^(?:ENTRY[ \t]+)?%?([\w.\-]+)[ \t]+\(.*\{[ \t]*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def _dims(type_text: str) -> list[int]:
    m = _SHAPE.search(type_text)
    return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _int_list(text: str | None) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", text or "")]


def _instruction_flops(line: str, opcode: str, typ: str, operands: list[str], instrs: dict) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of one dot, GEMM library call, convolution or
    fused attention, from its HLO line; 0 for any other instruction.

    - dot / cuBLAS: 2 x result elements x the lhs's contracted size;
    - convolutions (forward, and cuDNN's backward-input / backward-filter calls):
      2 x forward-output elements x filter elements / output features;
    - cuDNN fused attention: q, k, v as [b, t, n, d] (jax's layout): 2·b·n·t·s·(d + dv) forward,
      2.5 times that for the backward (its five products against the forward's two)."""
    def shape(i):
        return _dims(instrs[operands[i]][0]) if len(operands) > i and operands[i] in instrs else []

    target = re.search(r'custom_call_target="([^"]*)"', line)
    target = target.group(1) if target else ""
    if opcode == "dot" or target.startswith("__cublas"):
        if opcode == "dot":
            contract = _int_list((re.search(r"lhs_contracting_dims=\{([^}]*)\}", line) or [None, ""])[1])
        else:
            m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
            contract = _int_list(m.group(1) if m else "")
        lhs = shape(0)
        if not lhs or any(c >= len(lhs) for c in contract):
            return 0
        return 2 * _prod(_dims(typ)) * _prod(lhs[c] for c in contract)
    if opcode == "convolution" or target.startswith("__cudnn$conv"):
        labels = re.search(r"dim_labels=\w+_(\w+)->\w+", line)
        if not labels:
            return 0
        if "BackwardFilter" in target:
            y, w = shape(1), _dims(typ)
        elif "BackwardInput" in target:
            y, w = shape(0), shape(1)
        else:
            y, w = _dims(typ), shape(1)
        o = labels.group(1).find("o")
        if not y or not w or o < 0 or o >= len(w) or not w[o]:
            return 0
        return 2 * _prod(y) * _prod(w) // w[o]
    if target.startswith("__cudnn$fmha"):
        q, k, v = shape(0), shape(1), shape(2)
        if len(q) != 4 or len(k) != 4 or len(v) != 4:
            return 0
        b, t, n, d = q
        fwd = 2 * b * n * t * k[1] * (d + v[3])
        return int(fwd * 2.5) if "Backward" in target else fwd
    return 0


def hlo_matrix_flops(hlo_text: str) -> dict[str, int]:
    """Instruction name -> FLOPs (`_instruction_flops`) for every instruction that runs as a
    kernel of its own and does matrix work: the library GEMMs, convolutions and fused attention
    calls, and each fusion whose computation (nested fusions included) holds dots (those dots
    count in their fusion only, so the values add up to the program's matrix work).  The GPU program's cost analysis
    counts library calls as nothing; this reads their shapes instead."""
    instrs = _hlo_instructions(hlo_text)
    own: dict[str, int] = {}
    members: dict[str, list[str]] = collections.defaultdict(list)
    calls: dict[str, str] = {}
    current = ""
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("(", 1)[0]:
            current = head.group(1)
            continue
        m = _DEF.match(line)
        if not m:
            continue
        name, typ, opcode = m.group(1), m.group(2), m.group(3)
        members[current].append(name)
        if opcode == "fusion":
            c = _CALLS.search(line)
            if c:
                calls[name] = c.group(1)
        else:
            f = _instruction_flops(line, opcode, typ, instrs.get(name, ("", []))[1], instrs)
            if f:
                own[name] = f
    memo: dict[str, int] = {}

    def computation(comp: str, depth: int = 0) -> int:
        if comp not in memo:
            memo[comp] = 0 if depth > 16 else sum(
                own.get(i, 0) + (computation(calls[i], depth + 1) if i in calls else 0)
                for i in members.get(comp, []))
        return memo[comp]

    fused = set(calls.values())
    out = {}
    for comp, names in members.items():
        if comp in fused:  # a fusion's body: counted in the fusion that runs it
            continue
        for name in names:
            f = own.get(name, 0) + (computation(calls[name]) if name in calls else 0)
            if f:
                out[name] = f
    return out


def matrix_efficiency(trace_dir: str, hlo_text: str, steps: int, top: int = 40) -> dict:
    """The matrix work of a profiled program, kernel by kernel: each GPU kernel event (as in
    `kernel_bandwidth`) whose HLO instruction does matrix work (`hlo_matrix_flops`) gives a row
    with its time and calls per step and device, GFLOP per call and the TFLOP/s it reached.
    Library kernels (cuBLAS, cuDNN) inside a CUDA-graph command buffer carry the buffer's name,
    not their instruction's, so only a program profiled with command buffers off
    (`XLA_FLAGS=--xla_gpu_enable_command_buffer=`) matches them all; `unmatched_ms` is the time
    of the matrix and attention kernels that matched no instruction.  Returns {"rows" (the `top`
    by time), "matched_ms", "matched_tflop" (per step), "unmatched_ms", "program_tflop" (all
    matrix work of the program as written, once per instruction)}."""
    path = trace_path(trace_dir)
    flops = hlo_matrix_flops(hlo_text)
    out = {"rows": [], "matched_ms": 0.0, "matched_tflop": 0.0, "unmatched_ms": 0.0,
           "program_tflop": sum(flops.values()) / 1e12}
    if path is None:
        return out
    instrs = _hlo_instructions(hlo_text)
    sources = hlo_source_lines(hlo_text)
    time_us, calls, gpus = _kernel_times(path, instrs)
    per_step = max(steps, 1) * max(gpus, 1)
    rows = []
    for (kernel, inst), us in time_us.items():
        f = flops.get(inst, 0)
        if not f:
            if kernel_class(kernel) in ("matrix", "attention"):
                out["unmatched_ms"] += us / 1e3 / per_step
            continue
        n = calls[(kernel, inst)]
        typ, _, op_name, frame = instrs[inst]
        rows.append({"kernel": kernel, "instruction": inst, "ms_per_step": us / 1e3 / per_step,
                     "calls_per_step": n / per_step, "gflop_per_call": f / 1e9,
                     "tflop_per_s": f * n / (us * 1e-6) / 1e12 if us > 0 else None,
                     "result_type": typ, "source": sources.get(frame, ""), "op_name": op_name})
        out["matched_ms"] += us / 1e3 / per_step
        out["matched_tflop"] += f * n / per_step / 1e12
    rows.sort(key=lambda r: -r["ms_per_step"])
    out["rows"] = rows[:top]
    return out


def matrix_flops_by_kind(hlo_text: str) -> list[tuple[str, str, int, float]]:
    """The program's matrix work (`hlo_matrix_flops`) by kind of kernel and operand type:
    [(kind, dtype, instructions, TFLOP)], largest first.  Kinds: "cublas" (library GEMMs),
    "gemm_fusion" (XLA's own GEMM kernels), "cudnn_conv", "cudnn_attention", "other"."""
    flops = hlo_matrix_flops(hlo_text)
    instrs = _hlo_instructions(hlo_text)
    kinds: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0, 0])
    targets = dict(re.findall(r'%([\w.\-]+) = [^\n]*custom_call_target="([^"]*)"', hlo_text))
    for name, f in flops.items():
        target = targets.get(name, "")
        if target.startswith("__cublas"):
            kind = "cublas"
        elif target.startswith("__cudnn$conv"):
            kind = "cudnn_conv"
        elif target.startswith("__cudnn$fmha"):
            kind = "cudnn_attention"
        elif "fusion" in name:
            kind = "gemm_fusion"
        else:
            kind = "other"
        ops = instrs.get(name, ("", []))[1]
        m = _SHAPE.search(instrs[ops[0]][0]) if ops and ops[0] in instrs else None
        entry = kinds[(kind, m.group(1) if m else "?")]
        entry[0] += 1
        entry[1] += f
    rows = [(k, dt, n, f / 1e12) for (k, dt), (n, f) in kinds.items()]
    return sorted(rows, key=lambda r: -r[3])


def print_matrix_by_kind(hlo_text: str, tag: str) -> None:
    rows = matrix_flops_by_kind(hlo_text)
    total = sum(r[3] for r in rows)
    print(f"[{tag}] the program's matrix work: {total:.3f} TFLOP (kind, operand type, "
          f"instructions, TFLOP):", flush=True)
    for kind, dt, n, tf in rows:
        print(f"[{tag}]   {kind:16s} {dt:5s} x{n:<5d} {tf:8.3f}", flush=True)


def print_matrix_efficiency(result: dict, tag: str) -> None:
    ms, tf = result["matched_ms"], result["matched_tflop"]
    rate = f"{tf / ms * 1e3:.0f} TFLOP/s" if ms > 0 else "-"
    print(f"[{tag}] matrix work: {tf:.3f} TFLOP a step in {ms:.2f} ms of kernels matched to their "
          f"instructions ({rate}); {result['unmatched_ms']:.2f} ms of matrix/attention kernels "
          f"matched none (library kernels inside command buffers); the program holds "
          f"{result['program_tflop']:.3f} TFLOP of matrix work", flush=True)
    for r in result["rows"]:
        rate = f"{r['tflop_per_s']:6.0f}" if r["tflop_per_s"] is not None else "     -"
        print(f"[{tag}]   mm {r['ms_per_step']:7.3f} ms x{r['calls_per_step']:<5.4g} "
              f"{r['gflop_per_call']:8.2f} GFLOP {rate} TFLOP/s  {r['kernel'][:40]:40s} "
              f"{r['result_type'][:40]:40s} {r['source']:44s} {r['op_name'][-70:]}", flush=True)


def time_by_source(rows: list[dict], top: int = 25) -> list[tuple[str, str, float, int]]:
    """`kernel_bandwidth` rows summed by (class, model source line): [(cls, source, ms per
    step, kernels)], the `top` by time.  Kernels with no source line sum under "?"."""
    total, count = collections.Counter(), collections.Counter()
    for r in rows:
        key = (r["cls"], r["source"] or "?")
        total[key] += r["ms_per_step"]
        count[key] += 1
    return [(c, src, ms, count[(c, src)]) for (c, src), ms in total.most_common(top)]


def print_kernel_bandwidth(rows: list[dict], tag: str) -> None:
    if not rows:
        print(f"[{tag}] kernel bandwidth: no kernels", flush=True)
        return
    print(f"[{tag}] kernel bandwidth (bytes: result + operands read once, an estimate), per step "
          f"and device: ms, class, calls, MB per call, GB/s, kernel, result type, source, op:",
          flush=True)
    for r in rows:
        gbs = f"{r['gb_per_s']:7.0f}" if r["gb_per_s"] is not None else "      -"
        print(f"[{tag}]   bw {r['ms_per_step']:7.3f} ms {r['cls'][:11]:11s} "
              f"x{r['calls_per_step']:<5.4g} {r['bytes_per_call'] / 1e6:9.1f} MB {gbs} GB/s  "
              f"{r['kernel'][:40]:40s} "
              f"{r['result_type'][:40]:40s} {r['source']:44s} {r['op_name'][-80:]}", flush=True)


def _find_hlo(directory: str) -> str | None:
    paths = sorted(glob.glob(os.path.join(directory, "**", "step.hlo.txt"), recursive=True)
                   + glob.glob(os.path.join(directory, "**", "step.hlo.txt.gz"), recursive=True))
    return paths[0] if paths else None


def main(argv: list[str] | None = None) -> int:
    """`python -m sarformer_jax.benchmarks.profile DIR`: the kernel bandwidth report of a saved
    profile: DIR holds the trace (`*.trace.json.gz`, searched recursively) and the compiled HLO
    (`step.hlo.txt` or `step.hlo.txt.gz`), as `sarformer bench train --profile` leaves them."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sarformer_jax.benchmarks.profile",
        description="Per-kernel bandwidth of a saved profile: DIR holds the trace "
                    "(*.trace.json.gz, searched recursively) and the compiled HLO "
                    "(step.hlo.txt or step.hlo.txt.gz).")
    parser.add_argument("dir")
    parser.add_argument("--steps", type=int, default=5, help="steps in the trace (default 5)")
    parser.add_argument("--classes", default="",
                        help="comma-separated kernel classes to show, e.g. elementwise,reduction "
                             "(default: all)")
    parser.add_argument("--top", type=int, default=40, help="kernels to show (default 40)")
    parser.add_argument("--matrix", action="store_true",
                        help="the matrix kernels' FLOP rates instead of the bandwidth table")
    args = parser.parse_args(argv)
    hlo = _find_hlo(args.dir)
    if hlo is None or (trace_path(args.dir) is None and not args.matrix):
        print(f"{args.dir}: needs a *.trace.json.gz and a step.hlo.txt[.gz] (--matrix: the HLO "
              "at least)", file=sys.stderr)
        return 1
    with (gzip.open(hlo, "rt") if hlo.endswith(".gz") else open(hlo)) as f:
        hlo_text = f.read()
    tag = os.path.basename(os.path.normpath(args.dir))
    if args.matrix:
        print_matrix_by_kind(hlo_text, tag)
        if trace_path(args.dir) is not None:
            print_matrix_efficiency(matrix_efficiency(args.dir, hlo_text, args.steps, args.top),
                                    tag)
        return 0
    classes = {c.strip() for c in args.classes.split(",") if c.strip()} or None
    rows = kernel_bandwidth(args.dir, hlo_text, args.steps, args.top, classes)
    print_kernel_bandwidth(rows, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
