"""`sarformer convert sam`: round trip of a real .pth written by segment-anything (reduced depth),
every key used, the CLI report and .npz, and one error listing every problem for checkpoints of
the wrong size or family."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from sam_oracle import sam_pair, torch_sam  # noqa: F401
from sarformer_jax.convert import sam as convert_sam
from sarformer_jax.convert.common import CheckpointError, conv_transpose_kernel, linear_kernel

KW = dict(model_type="vit_b", encoder_depth=2, global_attn_indexes=(1,))


def test_every_key_converted(sam_pair):
    tsam, _, path = sam_pair
    flat, meta = convert_sam.convert(path, **KW)
    sd = {k: v.numpy() for k, v in tsam.state_dict().items() if k not in ("pixel_mean", "pixel_std")}
    assert len(flat) == len(sd) == 177 - 10 * 14 + 17 + 120  # 2 of 12 encoder blocks (14 keys each)
    np.testing.assert_array_equal(flat["image_encoder.blocks.1.attn.qkv.kernel"],
                                  linear_kernel(sd["image_encoder.blocks.1.attn.qkv.weight"]))
    np.testing.assert_array_equal(flat["mask_decoder.output_upscaling.0.kernel"],
                                  conv_transpose_kernel(sd["mask_decoder.output_upscaling.0.weight"]))
    np.testing.assert_array_equal(flat["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
                                  sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    assert meta["model_type"] == "vit_b" and meta["global_attn_indexes"] == [1]


def test_cli_writes_npz_and_loads(sam_pair, tmp_path, capsys):
    from sarformer_jax.cli import main
    from sarformer_jax.sam import load_sam

    tsam, jsam, path = sam_pair
    dst = tmp_path / "sam.npz"
    rc = main(["convert", "sam", str(path), str(dst), "--model-type", "vit_b", "--encoder-depth", "2",
               "--global-attn-indexes", "1"])
    assert rc == 0 and "every source key used" in capsys.readouterr().out
    loaded = load_sam(dst)
    np.testing.assert_array_equal(loaded.mask_decoder.iou_token.embedding[...], jsam.mask_decoder.iou_token.embedding[...])
    assert len(loaded.image_encoder.blocks) == 2 and loaded.image_encoder.blocks[1].window_size == 0


def test_tampered_npz_is_refused_with_every_problem(sam_pair, tmp_path):
    """A converted .npz missing an entry, with an extra one and a mis-shaped one: `load_sam` and
    `build_sam(checkpoint=...)` refuse it naming the file and all three problems, where they
    used to keep the missing entry's random value and take the wrong shape.  The intact file
    loads the same arrays as the .pth converted on the fly."""
    from sarformer_jax.convert.common import load_params, save_params
    from sarformer_jax.sam import load_sam
    from sarformer_jax.sam.build import build_sam

    _, jsam, path = sam_pair
    flat, meta = convert_sam.convert(path, **KW)
    good = tmp_path / "good.npz"
    save_params(good, flat, meta)
    for loaded in (load_sam(good), build_sam(checkpoint=str(good), encoder_depth=2,
                                             global_attn_indexes=(1,))):
        np.testing.assert_array_equal(loaded.image_encoder.blocks[1].attn.qkv.kernel[...],
                                      jsam.image_encoder.blocks[1].attn.qkv.kernel[...])
    flat, meta = load_params(good)
    del flat["mask_decoder.iou_token.embedding"]
    flat["image_encoder.blocks.0.attn.proj.kernel"] = np.zeros((3, 3), np.float32)
    flat["extra.kernel"] = np.zeros(2, np.float32)
    bad = tmp_path / "bad.npz"
    save_params(bad, flat, meta)
    for load in (lambda: load_sam(bad),
                 lambda: build_sam("vit_b", checkpoint=str(bad), encoder_depth=2,
                                   global_attn_indexes=(1,))):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = str(e.value)
        assert msg.startswith(f"{bad}: does not fit Sam: ")
        assert "1 missing: mask_decoder.iou_token.embedding" in msg
        assert "1 not in the model: extra.kernel" in msg
        assert "image_encoder.blocks.0.attn.proj.kernel: expected (768, 768), found (3, 3)" in msg


def test_wrong_size_names_shapes(sam_pair):
    _, _, path = sam_pair
    with pytest.raises(CheckpointError) as e:  # a vit_b file read as vit_l
        convert_sam.convert(path, model_type="vit_l", encoder_depth=2, global_attn_indexes=(1,))
    msg = str(e.value)
    assert "image_encoder.pos_embed: expected (1, 64, 64, 1024)" in msg and "found (1, 64, 64, 768)" in msg
    with pytest.raises(CheckpointError) as e:  # a truncated file read as the full vit_b
        convert_sam.convert(path, model_type="vit_b")
    msg = str(e.value)
    assert "missing keys: " in msg and "image_encoder.blocks.11.mlp.lin2.kernel" in msg
    assert "image_encoder.blocks.1.attn.rel_pos_h: expected (27, 64)" in msg and "found (127, 64)" in msg


def test_wrong_family_and_tampering(sam_pair, tmp_path):
    tsam, _, _ = sam_pair
    sd = dict(tsam.state_dict())
    sd["extra.weight"] = torch.zeros(3)
    del sd["mask_decoder.iou_token.weight"]
    sd["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(CheckpointError) as e:
        convert_sam.convert(bad, **KW)
    msg = str(e.value)
    assert "missing keys: mask_decoder.iou_token.embedding" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "expected (1, 256)" in msg and "found (1, 128)" in msg
    beit = tmp_path / "beit.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 768), "blocks.0.attn.qkv.weight": torch.zeros(2304, 768)}}, beit)
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_sam.convert(beit, model_type="vit_b")


def test_infer_model_type(tmp_path):
    assert convert_sam.infer_model_type("sam_vit_h_4b8939.pth") == "vit_h"
    assert convert_sam.infer_model_type("x.pth", {"image_encoder.patch_embed.proj.weight": np.zeros((1024, 3, 16, 16))}) == "vit_l"
    with pytest.raises(CheckpointError, match="cannot tell"):
        convert_sam.infer_model_type("x.pth", {})
