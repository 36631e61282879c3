"""Parity of sarformer_jax.sam against segment-anything (PyPI) in fp32 on the CPU: a reduced-depth
vit_b with random weights saved as a real .pth and converted by our converter; image embeddings,
intermediate stages, and low-res logits / IoU for point, box and mask prompts (rel err <= 1e-5)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

import jax
import jax.numpy as jnp
from flax import nnx
from conftest import RTOL, rel_err
from sam_oracle import natural_image, sam_pair, save_and_convert, torch_sam  # noqa: F401

from sarformer_jax.sam import SamPredictor


@pytest.fixture(scope="module")
def pair(sam_pair):
    from segment_anything import SamPredictor as TorchPredictor

    tsam, jsam, _ = sam_pair
    image = natural_image()
    tp = TorchPredictor(tsam)
    with torch.no_grad():
        tp.set_image(image)
    jp = SamPredictor(jsam)
    jp.set_image(image)
    return tsam, jsam, tp, jp, image


def test_image_embedding(pair):
    _, _, tp, jp, _ = pair
    ref = tp.get_image_embedding().numpy().transpose(0, 2, 3, 1)
    out = np.asarray(jp.get_image_embedding())
    assert out.shape == ref.shape == (1, 64, 64, 256)
    assert rel_err(out, ref) <= RTOL["float32"]


def test_encoder_stages(pair):
    """Patch embedding and each block against forward hooks on the torch encoder."""
    tsam, jsam, _, _, _ = pair
    x = np.random.default_rng(1).normal(size=(1, 1024, 1024, 3)).astype(np.float32)
    captured = {}
    hooks = [tsam.image_encoder.blocks[i].register_forward_hook(
        lambda m, a, o, i=i: captured.__setitem__(f"blocks.{i}", o.numpy())) for i in range(len(tsam.image_encoder.blocks))]
    with torch.no_grad():
        neck = tsam.image_encoder(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    for h in hooks:
        h.remove()
    out, inter = jax.jit(lambda m, x: m.image_encoder(x))(jsam, jnp.asarray(x))
    for name, ref in captured.items():
        assert rel_err(inter[name], ref) <= RTOL["float32"], name
    assert rel_err(out, neck) <= RTOL["float32"]


PROMPTS = {
    "one_point": dict(point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([1])),
    "points": dict(point_coords=np.array([[300.0, 200.0], [50.5, 380.0], [590.0, 10.0]]),
                   point_labels=np.array([1, 0, 1])),
    "box": dict(box=np.array([120.0, 60.0, 480.0, 350.0])),
    "box_and_point": dict(point_coords=np.array([[250.0, 220.0]]), point_labels=np.array([0]),
                          box=np.array([100.0, 50.0, 500.0, 390.0])),
}


@pytest.mark.parametrize("prompt,multimask", [(p, True) for p in sorted(PROMPTS)] + [("box", False)])
def test_predict(pair, prompt, multimask):
    _, _, tp, jp, image = pair
    kw = PROMPTS[prompt]
    with torch.no_grad():
        rm, riou, rlow = tp.predict(**kw, multimask_output=multimask, return_logits=True)
    m, iou, low = jp.predict(**kw, multimask_output=multimask, return_logits=True)
    assert low.shape == rlow.shape and m.shape == rm.shape == (len(riou),) + image.shape[:2]
    assert rel_err(low, rlow) <= RTOL["float32"]
    assert rel_err(iou, riou) <= RTOL["float32"]
    assert rel_err(m, rm) <= RTOL["float32"]
    if prompt == "box" and not multimask:
        bm, _, _ = jp.predict(**kw, multimask_output=multimask)
        assert bm.dtype == bool and np.mean(bm == (rm > 0)) > 0.9999


def test_mask_prompt(pair):
    """Low-res logits of a first call fed back as a mask prompt (with a point)."""
    _, _, tp, jp, _ = pair
    kw = PROMPTS["one_point"]
    with torch.no_grad():
        _, _, rlow = tp.predict(**kw, multimask_output=False)
        rm, riou, rlow2 = tp.predict(**kw, mask_input=rlow, multimask_output=True, return_logits=True)
    m, iou, low2 = jp.predict(**kw, mask_input=rlow, multimask_output=True, return_logits=True)
    assert rel_err(low2, rlow2) <= RTOL["float32"]
    assert rel_err(iou, riou) <= RTOL["float32"]
    with torch.no_grad():  # mask prompt alone
        _, riou3, rlow3 = tp.predict(mask_input=rlow, multimask_output=True)
    _, iou3, low3 = jp.predict(mask_input=rlow, multimask_output=True)
    assert rel_err(low3, rlow3) <= RTOL["float32"] and rel_err(iou3, riou3) <= RTOL["float32"]


@pytest.mark.parametrize("upscale,attention", [("upstream", "upstream"), ("blocks", "upstream"),
                                               ("upstream", "absorbed"), ("blocks", "absorbed"),
                                               ("pallas_interpret", "absorbed"),
                                               ("blocks_pallas_interpret", "absorbed"),
                                               ("blocks_pallas_interpret+norm", "absorbed"),
                                               ("blocks", "absorbed_pallas_interpret")])
@pytest.mark.parametrize("groups,per_image,with_masks", [(2, 3, False), (1, 4, False), (2, 2, True)],
                         ids=["2img_x3", "1img_x4", "2img_x2_mask_prompts"])
def test_decode_grouped_prompts(pair, groups, per_image, with_masks, upscale, attention):
    """Several images, several prompts each, in one call (each embedding passed once; its tokens
    shared by its prompts in the first two-way block) = upstream's decoder called per image;
    with every upscaling and two-way attention implementation of the mask decoder."""
    tsam, jsam, _, _, _ = pair
    jsam = nnx.clone(jsam)
    jsam.mask_decoder.upscale_implementation = upscale.removesuffix("+norm")
    jsam.mask_decoder.upscale_fuse_norm = upscale.endswith("+norm")  # LayerNorm and GELU in the kernel
    jsam.mask_decoder.transformer.attention_implementation = attention
    if upscale.endswith("+norm") and (groups, per_image, with_masks) != (2, 2, True):
        pytest.skip("the fused-norm kernel is checked on one grouping (the kernel sees only prompts)")
    rng = np.random.default_rng(5)
    b = groups * per_image
    emb = rng.normal(size=(groups, 64, 64, 256)).astype(np.float32)
    coords = rng.uniform(0, 1024, size=(b, 2, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=(b, 2)).astype(np.int32)
    masks = rng.normal(size=(b, 256, 256, 1)).astype(np.float32) * 4 if with_masks else None
    low, iou = jax.jit(lambda m, e, c, l, mk: m.decode(e, (c, l), mask_input=mk, multimask_output=True))(
        jsam, jnp.asarray(emb), jnp.asarray(coords), jnp.asarray(labels),
        None if masks is None else jnp.asarray(masks))
    with torch.no_grad():
        t_masks = None if masks is None else torch.from_numpy(masks.transpose(0, 3, 1, 2))
        sparse, dense = tsam.prompt_encoder(points=(torch.from_numpy(coords), torch.from_numpy(labels)),
                                            boxes=None, masks=t_masks)
        # upstream's decoder takes one image and repeats it for every prompt: call it per image
        outs = [tsam.mask_decoder(image_embeddings=torch.from_numpy(emb[i:i + 1].transpose(0, 3, 1, 2)),
                                  image_pe=tsam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse[i * per_image:(i + 1) * per_image],
                                  dense_prompt_embeddings=dense[i * per_image:(i + 1) * per_image],
                                  multimask_output=True) for i in range(groups)]
        rlow, riou = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    assert low.shape == tuple(rlow.shape) == (b, 3, 256, 256)
    assert rel_err(low, rlow.numpy()) <= RTOL["float32"]
    assert rel_err(iou, riou.numpy()) <= RTOL["float32"]


def test_decode_rejects_ungroupable_batch_and_unknown_implementations(pair):
    _, jsam, _, _, _ = pair
    emb = jnp.zeros((2, 64, 64, 256))
    pts = (jnp.zeros((3, 1, 2)), jnp.ones((3, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"\(2, 64, 64, 256\).*3 prompts"):
        jsam.decode(emb, pts)
    jsam = nnx.clone(jsam)
    jsam.mask_decoder.upscale_implementation = "nearest"
    with pytest.raises(ValueError, match="upscale_implementation.*'nearest'"):
        jsam.decode(emb[:1], pts)
    if jax.default_backend() != "gpu":
        jsam.mask_decoder.upscale_implementation = "pallas"
        with pytest.raises(ValueError, match="'pallas' is a GPU kernel.*'pallas_interpret'"):
            jsam.decode(emb[:1], pts)
        jsam.mask_decoder.upscale_implementation = "blocks_pallas"
        with pytest.raises(ValueError, match="'blocks_pallas' runs a GPU kernel.*'blocks_pallas_interpret'"):
            jsam.decode(emb[:1], pts)
    jsam.mask_decoder.upscale_implementation = "upstream"
    if jax.default_backend() != "gpu":
        jsam.mask_decoder.transformer.attention_implementation = "absorbed_pallas"
        with pytest.raises(ValueError, match="'absorbed_pallas' is a GPU kernel.*'absorbed_pallas_interpret'"):
            jsam.decode(emb[:1], pts)
    jsam.mask_decoder.transformer.attention_implementation = "flash"
    with pytest.raises(ValueError, match="attention_implementation.*'flash'"):
        jsam.decode(emb[:1], pts)


@pytest.mark.parametrize("length,size", [(27, 14), (127, 64), (27, 20), (127, 40), (15, 10)])
def test_get_rel_pos(length, size):
    from segment_anything.modeling.image_encoder import get_rel_pos as torch_get_rel_pos

    from sarformer_jax.sam.image_encoder import get_rel_pos

    table = np.random.default_rng(2).normal(size=(length, 16)).astype(np.float32)
    ref = torch_get_rel_pos(size, size, torch.from_numpy(table)).numpy()
    assert rel_err(get_rel_pos(size, size, jnp.asarray(table)), ref) <= RTOL["float32"]


def test_conv_transpose_layout():
    """convert.common.conv_transpose_kernel + nnx.ConvTranspose == torch ConvTranspose2d (k2 s2)."""
    from flax import nnx
    from sarformer_jax.convert.common import conv_transpose_kernel

    tconv = torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2)
    x = np.random.default_rng(3).normal(size=(2, 6, 5, 7)).astype(np.float32)
    with torch.no_grad():
        ref = tconv(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    jconv = nnx.ConvTranspose(6, 4, (2, 2), strides=(2, 2), padding="VALID", rngs=nnx.Rngs(0))
    jconv.kernel.set_value(jnp.asarray(conv_transpose_kernel(tconv.weight.detach().numpy())))
    jconv.bias.set_value(jnp.asarray(tconv.bias.detach().numpy()))
    assert rel_err(jconv(jnp.asarray(x.transpose(0, 2, 3, 1))), ref) <= RTOL["float32"]


@pytest.mark.slow
def test_full_vit_b_embedding(tmp_path):
    """The real vit_b depth (12 blocks, globals 2/5/8/11) on one image."""
    tsam = torch_sam(depth=12, global_attn_indexes=(2, 5, 8, 11), seed=4)
    jsam = save_and_convert(tsam, tmp_path / "sam_vit_b_full.pth", depth=12, global_attn_indexes=(2, 5, 8, 11))
    x = np.random.default_rng(5).integers(0, 256, size=(1, 1024, 1024, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tsam.image_encoder(tsam.preprocess(torch.from_numpy(x.transpose(0, 3, 1, 2)))).numpy()
    out = jax.jit(lambda m, x: m.embed_image(x))(jsam, jnp.asarray(x))
    assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref) <= RTOL["float32"]


@pytest.mark.parametrize("input_size,original_size", [((1024, 1024), (640, 640)),
                                                      ((768, 1024), (480, 640)),
                                                      ((1024, 683), (1024, 683))])
def test_postprocess_masks_both_implementations_match_torch(input_size, original_size):
    """Upstream's `Sam.postprocess_masks` (F.interpolate to 1024, crop, F.interpolate to the
    original size) against ours as dense matrices ("matmul") and as gathered taps ("taps")."""
    import torch
    import torch.nn.functional as F

    from sarformer_jax.sam.build import build_sam

    low = np.random.default_rng(0).normal(size=(2, 3, 256, 256)).astype(np.float32) * 4.0
    t = F.interpolate(torch.from_numpy(low), (1024, 1024), mode="bilinear", align_corners=False)
    t = t[..., : input_size[0], : input_size[1]]
    want = F.interpolate(t, original_size, mode="bilinear", align_corners=False).numpy()
    sam = build_sam("vit_b", encoder_depth=1, global_attn_indexes=(0,))
    for impl in ("matmul", "taps"):
        sam.postprocess_implementation = impl
        got = np.asarray(sam.postprocess_masks(jnp.asarray(low), input_size, original_size))
        assert got.shape == want.shape
        assert rel_err(got, want) < RTOL["float32"], impl
    sam.postprocess_implementation = "dense"
    with pytest.raises(ValueError, match="'dense'"):
        sam.postprocess_masks(jnp.asarray(low), input_size, original_size)
