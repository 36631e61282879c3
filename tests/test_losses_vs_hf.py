"""Loss parity against HF transformers' `Mask2FormerLoss` / `Mask2FormerHungarianMatcher`, fp32 on
the CPU: the matcher's assignment and every per-layer loss value.

HF draws its random points inside the loss with `torch.rand`; the test records those draws and
injects the same points into ours (`loss_fn(points=...)`), mapping HF's matched boxes (batch-major,
ascending query) onto our fixed slots.  Deliberate differences, named:
* HF normalises mask and dice by the number of ground-truth masks, mmdet (and we) by the number of
  matched pairs; they differ only when an image has more classes than queries, where the test
  rescales HF's values by the ratio.
* HF weights the losses outside `Mask2FormerLoss` (`weight_dict`); we return weighted terms.
* HF has no auxiliary FCN head; that loss is compared with torch `F.cross_entropy` (mmseg's
  `avg_non_ignore=False`: ignored pixels count in the denominator).
* GT masks: HF takes a list of binary masks per image; we point-sample the semantic map per class
  (`gt == k`, 255 nowhere), which is the same tensor sampled the same way.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import RTOL, rel_err
from sarformer_jax.configs.common import loss as loss_config
from sarformer_jax.losses import (aux_ce_loss, gt_present, layer_loss, loss_fn, match_costs,
                                  num_importance_points, point_sample, point_sample_shared,
                                  sample_gt_shared)

transformers = pytest.importorskip("transformers")
from transformers.models.mask2former import modeling_mask2former as hf  # noqa: E402

P, H, W, h, w, L = 160, 48, 64, 12, 16, 3


def _cfg():
    cfg = loss_config()
    cfg.num_points = P
    return cfg


def _semantic_maps(rng, b: int, k: int, many: bool) -> np.ndarray:
    gt = np.full((b, H, W), 255, np.int64)
    for i in range(b - 1):  # the last image has no valid label
        n_cls = k if many and i == 0 else 2 + i
        classes = rng.choice(k, size=min(n_cls, k), replace=False)
        for j, c in enumerate(classes):
            y0, x0 = rng.integers(0, H - 8), rng.integers(0, W - 8)
            gt[i, y0:y0 + rng.integers(8, H // 2), x0:x0 + rng.integers(8, W // 2)] = c
        gt[i, : 4 + 2 * j] = classes[0]
    return gt


class _RandRecorder:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.calls: list[torch.Tensor] = []
        self._rand = torch.rand

    def __call__(self, *size, **kwargs):
        t = self._rand(*size, generator=self.gen)
        self.calls.append(t.clone())
        return t


@pytest.mark.parametrize("q,k", [(10, 5), (3, 6)])
def test_loss_and_matching_equal_hf(q, k):
    rng = np.random.default_rng(q)
    b = 3
    cfg = _cfg()
    gt = _semantic_maps(rng, b, k, many=q < k)
    cls = rng.normal(size=(L, b, q, k + 1)).astype(np.float32) * 2
    masks = rng.normal(size=(L, b, q, h, w)).astype(np.float32) * 3
    hf_cfg = transformers.Mask2FormerConfig(num_labels=k, train_num_points=P, oversample_ratio=3.0,
                                            importance_sample_ratio=0.75, no_object_weight=0.1,
                                            backbone_config=None, use_pretrained_backbone=False)
    crit = hf.Mask2FormerLoss(hf_cfg, weight_dict={})
    labels = [torch.as_tensor(np.unique(g[g != 255])) for g in gt]
    mask_labels = [torch.as_tensor(np.stack([g == c for c in lab.numpy()]) if len(lab) else np.zeros((0, H, W)),
                                   dtype=torch.float32) for g, lab in zip(gt, labels)]
    t = lambda x: torch.as_tensor(x)
    aux = [{"masks_queries_logits": t(masks[i]), "class_queries_logits": t(cls[i])} for i in range(L - 1)]
    rec = _RandRecorder(0)
    with mock.patch.object(torch, "rand", rec), torch.no_grad():
        ref = crit(t(masks[-1]), t(cls[-1]), mask_labels, labels, auxiliary_predictions=aux)
    # HF's call order: last prediction, then the auxiliary ones; per layer B matcher draws + 2
    hf_layers = [L - 1] + list(range(L - 1))
    m = min(q, k)
    n_extra = P - num_importance_points(cfg)
    points = [None] * L
    indices = [None] * L
    for pos, layer in enumerate(hf_layers):
        calls = rec.calls[pos * (b + 2):(pos + 1) * (b + 2)]
        replay = iter(calls[:b])
        with mock.patch.object(torch, "rand", lambda *a, **kw: next(replay)):
            idx = crit.matcher(t(masks[layer]), t(cls[layer]), mask_labels, labels)
        indices[layer] = idx
        cand = rng.uniform(size=(b, m, 3 * P, 2)).astype(np.float32)
        extra = rng.uniform(size=(b, m, n_extra, 2)).astype(np.float32)
        n = 0
        for bi, (src, tgt) in enumerate(idx):
            for sq, tg in zip(src.tolist(), tgt.tolist()):
                slot = sq if q <= k else int(labels[bi][tg])
                cand[bi, slot] = calls[b][n].numpy()
                extra[bi, slot] = calls[b + 1][n].numpy()
                n += 1
        points[layer] = {"match": jnp.asarray(np.concatenate([c.numpy() for c in calls[:b]])),
                         "candidates": jnp.asarray(cand), "extra": jnp.asarray(extra)}
    preds = [{"cls": jnp.asarray(cls[i]), "mask": jnp.asarray(masks[i])} for i in range(L)]
    gt_j = jnp.asarray(gt.astype(np.int32))
    total, parts = jax.jit(lambda p, g, pts: loss_fn(p, g, None, key=jax.random.key(0), cfg_loss=cfg,
                                                     num_classes=k, points=pts))(preds, gt_j, points)
    # matching
    present = gt_present(gt_j, k)
    assign_fn = jax.jit(lambda c, mk, g, pr, pt: layer_loss(c, mk, g, pr, pt, cfg, k)[1])
    for layer in range(L):
        assign = assign_fn(preds[layer]["cls"], preds[layer]["mask"], gt_j, present, points[layer])
        assign = np.asarray(assign)
        for bi, (src, tgt) in enumerate(indices[layer]):
            want = -np.ones(q, int)
            want[src.numpy()] = labels[bi].numpy()[tgt.numpy()] if len(tgt) else []
            np.testing.assert_array_equal(assign[bi], want, err_msg=f"layer {layer} image {bi}")
    # values
    n_hf = sum(len(x) for x in labels)
    n_ours = sum(min(q, len(x)) for x in labels)
    for layer in range(L):
        sfx = "" if layer == L - 1 else f"_{layer}"
        pre = "" if layer == L - 1 else f"d{layer}."
        pairs = [("loss_cls", cfg.class_weight * ref["loss_cross_entropy" + sfx]),
                 ("loss_mask", cfg.mask_weight * ref["loss_mask" + sfx] * n_hf / n_ours),
                 ("loss_dice", cfg.dice_weight * ref["loss_dice" + sfx] * n_hf / n_ours)]
        for name, want in pairs:
            err = rel_err(parts[pre + name], want.numpy())
            assert err <= RTOL["float32"], f"{pre}{name}: ours {float(parts[pre + name]):.6f} hf {float(want):.6f}"
    assert np.isclose(float(total), sum(float(v) for v in parts.values()), rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 12.0])
def test_match_costs_equal_hf_matcher_costs(scale):
    """The matching cost matrix itself against HF's matcher terms (its pairwise sigmoid BCE and
    dice, and -softmax of the labels), both argument layouts: ours takes the BCE's two products
    as one (-l times the targets plus the row sums of softplus(l)); with large logits (scale 12)
    that sum of large terms must still hold float32 accuracy."""
    rng = np.random.default_rng(int(scale))
    q, k, n_p = 7, 5, 300
    cfg = _cfg()
    cls = rng.normal(size=(q, k + 1)).astype(np.float32)
    logits = (rng.normal(size=(q, n_p)) * scale).astype(np.float32)
    targets = rng.uniform(size=(k, n_p)).astype(np.float32)
    targets[:, ::3] = np.round(targets[:, ::3])
    lt, tt = torch.as_tensor(logits), torch.as_tensor(targets)
    want = (cfg.class_weight * -torch.softmax(torch.as_tensor(cls), -1)[:, :k]
            + cfg.mask_weight * hf.pair_wise_sigmoid_cross_entropy_loss(lt, tt)
            + cfg.dice_weight * hf.pair_wise_dice_loss(lt, tt)).numpy()
    got = match_costs(jnp.asarray(cls), jnp.asarray(logits), jnp.asarray(targets), cfg)
    got_t = match_costs(jnp.asarray(cls), jnp.asarray(logits.T), jnp.asarray(targets.T), cfg,
                        points_first=True)
    scale_of = np.abs(want).max()
    assert np.abs(np.asarray(got) - want).max() <= 1e-5 * scale_of
    assert np.abs(np.asarray(got_t) - want).max() <= 1e-5 * scale_of


def test_shared_point_samples_points_first():
    rng = np.random.default_rng(3)
    maps = jnp.asarray(rng.normal(size=(4, 9, 11)).astype(np.float32))
    pts = jnp.asarray(rng.uniform(-0.1, 1.1, size=(13, 2)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(point_sample_shared(maps, pts)).T,
                                  np.asarray(point_sample(maps, pts)))
    gt = jnp.asarray(rng.integers(0, 4, size=(9, 11)).astype(np.int32))
    np.testing.assert_array_equal(np.asarray(sample_gt_shared(gt, pts, 4, points_first=True)).T,
                                  np.asarray(sample_gt_shared(gt, pts, 4)))


def test_aux_ce_equals_torch(rng):
    logits = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
    gt = rng.integers(0, 4, size=(2, 20, 28))
    gt[0, :5] = 255
    up = torch.nn.functional.interpolate(torch.as_tensor(logits).permute(0, 3, 1, 2), size=(20, 28),
                                         mode="bilinear", align_corners=False)
    want = torch.nn.functional.cross_entropy(up, torch.as_tensor(gt), ignore_index=255, reduction="none").mean()
    assert rel_err(aux_ce_loss(jnp.asarray(logits), jnp.asarray(gt)), want.numpy()) <= RTOL["float32"]


@pytest.mark.parametrize("upscale", ["matrix", "taps"])
def test_aux_ce_gradient_equals_torch(rng, upscale):
    """The auxiliary CE's gradient (our custom backward of the pixel CE, through the upscale)
    against torch autograd in float64 (ours in float32): ignored pixels, labels out of range
    (ignored too) and large logits."""
    logits = (rng.normal(size=(2, 5, 7, 6)) * 8).astype(np.float64)
    gt = rng.integers(0, 6, size=(2, 20, 28))
    gt[0, :5] = 255
    gt[1, 3, :4] = 7  # out of range: ignored like 255
    t = torch.as_tensor(logits).permute(0, 3, 1, 2).requires_grad_(True)
    up = torch.nn.functional.interpolate(t, size=(20, 28), mode="bilinear", align_corners=False)
    tgt = torch.as_tensor(np.where(gt >= 6, 255, gt))
    want = torch.nn.functional.cross_entropy(up, tgt, ignore_index=255, reduction="none").mean()
    (want_g,) = torch.autograd.grad(want, t)
    val, g = jax.value_and_grad(lambda v: aux_ce_loss(v, jnp.asarray(gt), upscale))(
        jnp.asarray(logits, jnp.float32))
    assert rel_err(val, want.detach().numpy()) <= RTOL["float32"]
    want_g = want_g.permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(g, np.float64) - want_g).max() <= 1e-5 * np.abs(want_g).max()
