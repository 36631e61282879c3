"""`Sam.inference_state()`: the image encoder's Linear / Conv weights held in the compute dtype
for frozen use (the predictor, the generators and the online guidance run on it)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import rel_err
from sarformer_jax.models.layers import init_rngs, state_with_compute_dtype_weights
from sarformer_jax.sam import SamPredictor, build_sam


def _leaves(state):
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def test_encoder_weights_held_in_bf16_everything_else_kept():
    sam = build_sam("vit_b", rngs=init_rngs(0), dtype=jnp.bfloat16, encoder_depth=2,
                    global_attn_indexes=(1,))
    before = _leaves(nnx.state(sam))
    held = _leaves(sam.inference_state())
    assert set(held) == set(before)
    changed = {k for k in held if held[k].dtype != before[k].dtype}
    # exactly the encoder's Linear / Conv kernels and biases: patch embedding, qkv, proj, the
    # MLPs, the neck's two convs (2 blocks x (qkv, proj, lin1, lin2) kernels + biases)
    assert changed and all(k.startswith("image_encoder/") for k in changed), changed
    assert all(k.endswith(("/kernel", "/bias")) for k in changed)
    assert not any("norm" in k or "rel_pos" in k or "pos_embed" in k for k in changed)
    assert len(changed) == 2 + 2 * 4 * 2 + 2, sorted(changed)
    for k in changed:
        assert held[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(held[k]), np.asarray(before[k].astype(jnp.bfloat16)))
    # the module itself is untouched
    assert all(v.dtype == before[k].dtype for k, v in _leaves(nnx.state(sam)).items())


def test_float32_model_is_left_alone():
    sam = build_sam("vit_b", rngs=init_rngs(0), encoder_depth=1, global_attn_indexes=(0,))
    assert all(v.dtype == jnp.float32 for v in _leaves(sam.inference_state()).values())
    assert all(v.dtype == jnp.float32 for v in _leaves(state_with_compute_dtype_weights(sam)).values())


def test_embedding_with_held_weights_matches_float32_model():
    """The predictor (which runs on the held state) against the float32 model: within bf16
    tolerance, like the float32-held bf16 model."""
    kw = dict(encoder_depth=2, global_attn_indexes=(1,))
    sam32 = build_sam("vit_b", rngs=init_rngs(0), **kw)
    sam16 = build_sam("vit_b", rngs=init_rngs(0), dtype=jnp.bfloat16, **kw)
    nnx.update(sam16, nnx.state(sam32))
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    embs = []
    for sam in (sam32, sam16):
        p = SamPredictor(sam)
        p.set_image(image)
        embs.append(np.asarray(p.get_image_embedding(), np.float32))
    graphdef, state = nnx.split(sam16)
    x = jax.jit(lambda st, im: nnx.merge(graphdef, st).image_encoder(im)[0])
    pre = jnp.asarray(np.random.default_rng(1).normal(size=(1, 1024, 1024, 3)), jnp.float32)
    cast_each_call = np.asarray(x(state, pre), np.float32)
    held = np.asarray(x(sam16.inference_state(), pre), np.float32)
    assert rel_err(embs[1], embs[0]) <= 1e-2
    assert rel_err(held, cast_each_call) <= 1e-2
