"""A jax without Pallas' Triton backend (deprecated in jax 0.11): the package still imports,
every default takes its XLA path, and a kernel asked for by name fails with a one-line error."""

import ast
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from sarformer_jax.kernels import triton_backend

# Run in a fresh interpreter whose import system refuses jax.experimental.pallas.triton.
_WITHOUT_TRITON = textwrap.dedent('''
    import importlib.abc, sys, warnings

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "jax.experimental.pallas.triton":
                raise ImportError("No module named 'jax.experimental.pallas.triton'")
            return None

    sys.meta_path.insert(0, NoTriton())
    import jax, jax.numpy as jnp, numpy as np
    import sarformer_jax.cli, sarformer_jax.train, sarformer_jax.guidance
    import sarformer_jax.sam.automatic_mask_generator
    from flax import nnx
    from sarformer_jax import matcher
    from sarformer_jax.kernels import ms_deform_attn, msda, triton_backend
    import sarformer_jax.sam.amg, sarformer_jax.sam.predictor, sarformer_jax.evaluate
    import sarformer_jax.bench, sarformer_jax.benchmarks.msda
    from sarformer_jax.sam.transformer import TwoWayTransformer
    assert triton_backend.plgpu is None and not triton_backend.available()

    shapes = ((3, 4), (2, 2))
    rng = np.random.default_rng(0)
    value = jnp.asarray(rng.normal(size=(1, 16, 2, 16)), jnp.float32)
    loc = jnp.asarray(rng.uniform(size=(1, 5, 2, 2, 2, 2)), jnp.float32)
    att = jnp.asarray(rng.uniform(size=(1, 5, 2, 2, 2)), jnp.float32)
    assert ms_deform_attn(value, shapes, loc, att).shape == (1, 5, 32)  # the CPU default, XLA
    try:
        ms_deform_attn(value, shapes, loc, att, implementation="pallas_interpret")
    except RuntimeError as err:
        print("ERROR:", err)
    else:
        raise AssertionError("the interpreter ran without the Triton backend")

    # on a GPU, every default falls back to XLA, with one warning
    jax.default_backend = lambda: "gpu"
    tr = TwoWayTransformer(depth=1, embedding_dim=32, num_heads=2, mlp_dim=16, rngs=nnx.Rngs(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [msda.default_implementation(), matcher.default_implementation(),
               tr.resolved_implementation(jnp.bfloat16, 4096)]
    print("DEFAULTS:", got)
    print("WARNINGS:", [str(w.message) for w in caught if w.category is RuntimeWarning])
''')


def test_package_runs_without_the_triton_backend(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    err = out["ERROR"]
    assert "msda_fwd" in err and "Triton" in err and jax.__version__ in err, err
    assert out["DEFAULTS"] == "['xla', 'xla', 'absorbed']"
    warned = ast.literal_eval(out["WARNINGS"])  # a list printed by the child
    assert len(warned) == 1 and "XLA" in warned[0], warned


def test_gpu_defaults_with_the_triton_backend(monkeypatch):
    """With the backend present (this jax), the defaults pick the kernels on a GPU only."""
    from sarformer_jax import matcher
    from sarformer_jax.kernels import msda

    assert triton_backend.available()
    triton_backend.require("anything")  # no error
    assert not triton_backend.gpu_kernels()  # the CPU here
    assert (msda.default_implementation(), matcher.default_implementation()) == ("xla", "xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert triton_backend.gpu_kernels()
    assert (msda.default_implementation(), matcher.default_implementation()) == ("pallas",
                                                                                 "pallas")


def test_require_names_the_kernel_and_the_jax_version(monkeypatch):
    monkeypatch.setattr(triton_backend, "plgpu", None)
    monkeypatch.setattr(triton_backend, "_IMPORT_ERROR", "ImportError: gone")
    with pytest.raises(RuntimeError, match=rf"sam_mask_stats .*jax {jax.__version__}.*gone"):
        triton_backend.require("sam_mask_stats")
    from sarformer_jax.kernels.hungarian_pallas import lsap_rows_pallas
    with pytest.raises(RuntimeError, match="hungarian"):
        lsap_rows_pallas(jnp.zeros((3, 3)), jnp.ones(3, bool), jnp.ones(3, bool), interpret=True)
