"""SAM's mask post-processing kernel (kernels/sam_mask_stats.py) compiled for the GPU (marker
gpu) at the generator's size (128 prompts x 3 masks, 256² logits, 640² images, and a portrait
image), against PyTorch's `F.interpolate` pipeline in float32: logits rel err <= 1e-5, and the
masks, counts and boxes of the thresholded logits up to pixels within rounding of a threshold.
Run on the device: `JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_sam_mask_stats_gpu.py`."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RTOL, rel_err
from sarformer_jax.kernels.sam_mask_stats import postprocess_stats

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("inp,out", [((1024, 1024), (640, 640)), ((1024, 683), (900, 600))])
def test_kernel_on_gpu_matches_torch(inp, out):
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    low = (rng.normal(size=(128, 3, 256, 256)) * 4).astype(np.float32)
    t = F.interpolate(torch.from_numpy(low).cuda(), (1024, 1024), mode="bilinear", align_corners=False)
    want = F.interpolate(t[..., : inp[0], : inp[1]], out, mode="bilinear", align_corners=False).cpu().numpy()
    kw = dict(img_size=1024, input_size=inp, original_size=out, thresholds=(1.0, -1.0, 0.0))
    x = jnp.asarray(low)
    logits = np.asarray(postprocess_stats(x, mode="logits", **kw))
    assert np.isfinite(logits).all() and rel_err(logits, want) <= RTOL["float32"]
    st = {k: np.asarray(v) for k, v in postprocess_stats(x, mode="stats", **kw).items()}
    masks = np.asarray(postprocess_stats(x, mode="mask", **kw))
    near = lambda thr: np.abs(want - thr) <= 1e-5 * np.abs(want).max()
    for name, thr in (("high", 1.0), ("low", -1.0)):
        assert (np.abs(st[name] - (want > thr).sum((-2, -1))) <= near(thr).sum((-2, -1))).all(), name
    on, unsure = want > 0.0, near(0.0)
    assert not (masks != on)[~unsure].any()
    sure = ~unsure.any(-1)
    assert np.array_equal(st["rows"][sure], on.any(-1)[sure])
    sure = ~unsure.any(-2)
    assert np.array_equal(st["cols"][sure], on.any(-2)[sure])
