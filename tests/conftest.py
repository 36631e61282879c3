"""Test setup: 8 fake CPU devices (set before jax is imported), full-precision matmuls, seeded
randomness.  Parity tests compare against independent oracles (PyTorch libraries) in fp32."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("SARFORMER_JAX_CACHE", "")  # no persistent XLA cache from CLI calls in tests


def _cpu_compile_flags() -> None:
    """On the CPU, compile without LLVM's optimisation passes (inherited by the CLI tests'
    subprocesses).  The suite's time is mostly XLA compiles of small programs: the micro model's
    train step compiles in 48 s instead of 83 s, its threefry initialisers in ~0.2 s instead of
    0.3-6 s, while the tests that run heavy arithmetic spend it in Eigen / oneDNN kernels that
    this does not touch (measured: 163 s vs 173 s for the two heaviest).  Not on a GPU, where
    it would slow the generated kernels.

    On jax 0.10 (CI's, on Python 3.11) also XLA:CPU's older emitters and whole-program runtime
    instead of the fusion emitters and the thunk runtime: the micro train step's compile took
    22 s instead of 40 s, and the whole suite 24 minutes instead of 33-38 on 2 cores, with the
    same results.  Only there, because an XLA that no longer knows a flag aborts the process."""
    if os.environ["JAX_PLATFORMS"] != "cpu":
        return
    from importlib.metadata import version

    wanted = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    if version("jax").startswith("0.10."):
        wanted += ["--xla_cpu_use_fusion_emitters=false", "--xla_cpu_use_thunk_runtime=false"]
    flags = os.environ["XLA_FLAGS"].split()
    for flag in wanted:
        if flag.split("=")[0] not in {f.split("=")[0] for f in flags}:
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)


_cpu_compile_flags()


def _drop_checkout_root_from_path() -> None:
    """`python -m pytest` in the checkout puts the checkout's root on sys.path, where our
    top-level folders `kernels/`, `convert/` and `configs/` would shadow installed packages of
    the same generic names: transformers >= 5 imports Hugging Face's `kernels` distribution, and
    would get ours.  The tests import our code as `sarformer_jax.*` (the install maps those
    folders under it), so the root is not needed on the path."""
    import sys

    root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]


_drop_checkout_root_from_path()

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Relative-error tolerances keyed by dtype (see STYLE.md §10).
RTOL = {"float32": 1e-5, "bfloat16": 1e-2}


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the whole run, shared by the xdist workers (their base
    temporary directories have one parent): a program that several tests (or both workers)
    compile, such as the micro model's train step, compiles once.  Fresh for every run, so a
    test never depends on an earlier run's programs."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "xla-cache"
    path.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield path


@pytest.fixture(autouse=True)
def _unfreeze_heap():
    """The training loop gc.freeze()s the heap after its first step; give the objects back to
    the collector after each test, so a long test session does not keep their cycles."""
    yield
    import gc

    gc.unfreeze()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The files that take minutes (compiles of the micro model's train step, full-size oracle runs),
# heaviest first.  With `-n 2 --dist loadfile` the files go to the two workers in collection
# order; xdist's default would reorder them by test count, which put these few-test files last
# and left one worker running them alone at the end.
HEAVY_FILES_FIRST = (
    "test_train.py", "test_vit_adapter.py", "test_sam_vs_segment_anything.py",
    "test_sam_amg.py", "test_guidance_online.py", "test_head.py", "test_eval_predict.py",
    "test_train_accum.py", "test_losses.py", "test_convert_mmseg.py", "test_amg_cli.py",
    "test_bench_backbone.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Heavy files first (above); GPU tests run only where a GPU is present (on the device
    machine)."""
    rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
    try:
        has_gpu = any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A small synthetic dataset (ADE20K layout, 8 classes, proposal cache) shared by tests."""
    from sarformer_jax.data import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, num_train=16, num_val=2, image_size=(64, 80), num_classes=8, seed=0)
    return root
