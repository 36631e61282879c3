"""Shared config blocks.  Every value mirrors ../shared/spec/ARCHITECTURE.md (section in comments).

Keys (one schema for every config):
  model.*      architecture (backbone, head, aux head, loss weights, dtypes)
  guidance.*   where the 100 mask proposals come from (SAM online / cached / boxes / none)
  data.*       dataset, augmentation and loader settings
  train.*      optimiser, schedule, steps, checkpoints, sharding
  eval.*       inference mode and test-time augmentation
"""

from __future__ import annotations

from sarformer_jax.config import Config

ADE_MEAN = (123.675, 116.28, 103.53)  # §1.1, RGB
ADE_STD = (58.395, 57.12, 57.375)


def parse_arg(arg: str | None, **defaults):
    """`"variant=L,runlocal"` -> Config(variant="L", runlocal=True), over `defaults`."""
    out = Config(defaults)
    if arg:
        for item in arg.split(","):
            if not item:
                continue
            key, eq, value = item.partition("=")
            out[key] = value if eq else True
    return out


def beit_adapter_b() -> Config:
    """SARFormer-B backbone, §2.1."""
    return Config(
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        patch_size=16,
        qv_bias=True,
        layer_norm_eps=1e-6,
        drop_path_rate=0.1,
        init_values=0.1,
        interaction_indexes=((0, 2), (3, 5), (6, 8), (9, 11)),
        deform_num_heads=12,
        n_points=4,
        deform_ratio=0.5,
        conv_inplane=64,
        cffn_ratio=0.25,
        with_cffn=True,
        add_vit_feature=True,
        with_cp=False,  # activation checkpointing (jax.checkpoint); no numeric effect
        # each interaction's BEiT layers as one lax.scan: a fraction of the compile time; same
        # numbers (only the stochastic-depth draws differ from the unrolled layers'). "auto":
        # scanned on the CPU, unrolled on an accelerator (faster steps there; models.beit)
        scan_layers="auto",
        carry_cls=False,  # §2.7 / §8 #5: the original resets cls at every stage
        msda_init="trunc_normal",  # §8 #13: "trunc_normal" (faithful) | "deformable_detr" (clean)
        # BEiT relative position grid; inputs of other sizes interpolate (CHECKPOINTS §5.3)
        rel_pos_grid=(40, 40),
        # attention: auto = cuDNN fused attention on a GPU in bf16 (padded to its shapes), else
        # xla; "xla" / "cudnn" force one
        attention="auto",
        # the relative position bias for cuDNN attention on a GPU: "xla" (two one-hot products,
        # then layout copies and cuDNN's padding) or "pallas" (one kernel writing the padded
        # bias: kernels/position_bias_pallas.py; opt-in until timed on a GPU)
        position_bias="xla",
        # BEiT attention (with its relative position bias) run per batch shard, so each device
        # reduces its bias gradient to the table before the devices sum it
        # (models.beit.BEiTAttention._attend_per_batch_shard): "auto" = when training splits
        # the batch over more than one device; True / False
        attention_per_batch_shard="auto",
    )


def beit_adapter_l() -> Config:
    """SARFormer-L backbone, §2.1."""
    cfg = beit_adapter_b()
    cfg.update(
        embed_dim=1024,
        depth=24,
        num_heads=16,
        drop_path_rate=0.2,
        init_values=1e-6,
        interaction_indexes=((0, 5), (6, 11), (12, 17), (18, 23)),
        deform_num_heads=16,
        with_cp=True,
        # 24 rematerialised layers: L keeps the scan everywhere (its unrolled GPU compile time is
        # not measured; the B measurement that made "auto" unroll is in models.beit)
        scan_layers=True,
    )
    return cfg


def mask2former_head(d: int = 256, *, pd_heads: int = 8, pd_ffn: int = 1024, dec_heads: int = 8,
                     dec_ffn: int = 2048, num_feats: int = 128, num_classes: int = 150) -> Config:
    """Mask2Former head, §3.2 / §4 (B defaults)."""
    return Config(
        feat_channels=d,
        num_queries=100,
        num_classes=num_classes,
        num_transformer_feat_level=3,
        pixel_decoder=Config(
            num_layers=6, num_heads=pd_heads, n_levels=3, n_points=4, ffn_dim=pd_ffn,
            num_feats=num_feats, gn_groups=32, norm_eps=1e-5,
            # the encoder layers as one lax.scan (same numbers): "auto" = scanned on the CPU
            # (compile time), unrolled on an accelerator, where the scan's per-layer stores of
            # its residuals cost step time and memory (H100, SARFormer-B 640² b2: 66.2 -> 62.2
            # ms pipelined, 9.47 -> 8.63 GiB peak; docs/benchmarks.md, train run 28)
            scan_layers="auto",
        ),
        decoder=Config(num_layers=9, num_heads=dec_heads, ffn_dim=dec_ffn, num_feats=num_feats,
                       norm_eps=1e-5),
        query_init="sam_pooling",  # "sam_pooling" (SARFormer) | "learned" (Mask2Former baseline)
        second_pixel_decoder_pass=True,  # §4.2 / §8 #11: pool queries from PD(x[1])
        # both passes as one pixel-decoder call on 2B images (the same numbers: every op in it
        # is per image).  H100, SARFormer-B 640² b2: 59.3 -> 57.2 ms pipelined, 68.6 -> 63.0 ms
        # blocking (docs/benchmarks.md, train run 36)
        batch_pixel_decoder_passes=True,
    )


def loss() -> Config:
    """§5."""
    return Config(
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
        num_points=12544,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        aux_weight=0.4,
        # the auxiliary logits' upscale to the label size (1/16 -> 1): matrix (two products
        # with the interpolation matrices; on the GPU float32 CUDA-core GEMMs, ~0.7 ms of the
        # SARFormer-B step forward, train run 35) | taps (each output from its two neighbours:
        # the same weights, element-wise; not yet timed on a GPU)
        aux_resize="matrix",
        # importance-sampling selection: top_k | sort | pallas (the same points; pallas gives
        # them in index order); auto = pallas where the Pallas GPU kernels run (a radix select,
        # 2.4x lax.top_k on an H100), else sort when the batch is split over devices (XLA
        # partitions the sort, it gathered the batch for top_k) and top_k on one device
        point_select="auto",
        # point-sampled mask losses on at most this many matched slots per image when no image
        # has more (then on all M = min(Q, K) slots): the same losses, less work; None = always
        # all M slots
        compact_slots=32,
        # matching costs on each image's present classes only, at most this many (then the
        # same assignment from a C-column float32 product instead of a K-column one; an image
        # with more classes sends the whole batch to all K); None = all K classes (the default
        # until timed on a GPU)
        match_classes=None,
    )


def aux_head(enabled: bool = True, in_channels: int = 768, num_classes: int = 150) -> Config:
    """§5.4 AdapterFCNHead (SARFormer-B only)."""
    return Config(enabled=enabled, in_index=2, in_channels=in_channels, channels=256,
                  num_convs=1, dropout=0.1, num_classes=num_classes)


def guidance(source: str = "online") -> Config:
    """§4.3, §8.  Defaults are the recommended clean ones for new training."""
    return Config(
        source=source,  # "online" | "cached" | "boxes" | "none"
        cache_dir="",  # for "cached": written by `sarformer amg --dataset`
        # for "boxes": <boxes_dir>/<split>/<stem>.json, detector rows [x1, y1, x2, y2, ...]
        boxes_dir="",
        max_boxes=32,  # fixed number of box slots per image (NaN rows where none)
        sam=Config(
            model_type="vit_b",
            checkpoint="",  # converted SAM params (.npz from `sarformer convert sam`)
            image_size=1024,
            points_per_side=32,
            points_per_batch=64,
            pred_iou_thresh=0.88,
            stability_score_thresh=0.95,
            stability_score_offset=1.0,
            mask_threshold=0.0,
            box_nms_thresh=0.7,
            max_masks=256,  # fixed-size output of the on-device generator
            # upscale and post-process only the prompts with a mask over pred_iou_thresh (the
            # others' candidates fail that threshold whatever their masks: same kept masks);
            # AmgSettings.skip_low_iou.  On by default since train run 46 (H100, random SAM
            # weights): guidance 65.3 -> 51.2 ms a step; less with real weights, where more
            # prompts pass (the saving scales with the share that fails)
            skip_low_iou=True,
            dtype="bfloat16",  # SAM compute dtype inside the step (params stay float32)
            # image-encoder attention: auto = cuDNN fused attention on a GPU in bf16, else xla
            attention="auto",
            # how the candidates' logits are resized to the image (Sam.postprocess_implementation):
            # "taps" (the few nonzero weights per pixel, gathered) or "matmul" (float32 GEMMs);
            # taps: 81.6 vs 100.7 ms per 640² image for the whole generator on an H200
            # (docs/benchmarks.md, SAM run 4); "pallas" (GPU: resized and thresholded in one
            # kernel, kernels/sam_mask_stats.py; 36.2 vs 42.8 ms, SAM run 11); "auto" = pallas
            # on a GPU, taps elsewhere
            postprocess="auto",
            # the mask decoder's 4x upscaling (MaskDecoder.upscale_implementation): "blocks"
            # (convs kept as blocks, only the masks interleaved), "pallas" (one fused GPU
            # kernel, bf16 only; no faster in the generator: SAM runs 6 and 12),
            # "blocks_pallas" (blocks' first half, the rest one GPU kernel, bf16 only: online
            # guidance 66.4 vs 70.4 ms, train runs 22-23), "upstream", or "auto" =
            # blocks_pallas on a GPU in bf16, blocks elsewhere; and its
            # cross-attentions (TwoWayTransformer.attention_implementation): "absorbed"
            # (image-token projections moved to the prompt side), "absorbed_pallas" (absorbed,
            # each block's image-token update one GPU kernel, bf16 only; "auto" picks it on a
            # GPU in bf16) or "upstream".  Same values up to rounding; blocks + absorbed: online
            # train step 202.4 vs 228.6 ms, generator 73.3 vs 80.7 ms per 640² image on an H200
            # (docs/benchmarks.md, SAM run 5); auto (= absorbed_pallas on a GPU in bf16):
            # generator 57.2 vs 61.5 ms (SAM run 7), online train step 173.2 vs 184.3 ms (train
            # run 10); on the CPU auto is absorbed
            upscale="auto",
            # blocks_pallas: the first conv's bias, LayerNorm and GELU in the kernel too
            # (MaskDecoder.upscale_fuse_norm; equal within the spread alone and in the online
            # train step: SAM run 13, train run 25)
            upscale_fuse_norm=False,
            decoder_attention="auto",
        ),
        invert_first_mask=False,  # §8 #4: True reproduces the released weights' behaviour
        noise_placeholders=True,  # §8 #6: Bernoulli(0.5) placeholders as the original
        seed_compat=False,  # §8 #1-3: double normalisation, transposed frame, stale embedding
        deterministic_eval=True,  # fixed PRNG key per image at evaluation
    )


def ade20k_data(root: str = "data/ade/ADEChallengeData2016") -> Config:
    """§6.2: the pipeline that actually ran."""
    return Config(
        dataset="ade20k",  # "ade20k" | "cityscapes" | "synthetic" | "tfds:scene_parse150" | ...
        root=root,
        num_classes=150,
        ignore_index=255,
        reduce_zero_label=True,
        crop_size=(640, 640),
        scale=(2560, 640),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        flip_prob=0.5,
        photometric=True,
        mean=ADE_MEAN,
        std=ADE_STD,
        num_workers=4,
        on_error="raise",  # "raise" | "skip"
        seed=0,
    )


def original_optimizer(num_steps: int = 160_000) -> Config:
    """§6.1: what the original ran."""
    return Config(
        optimizer="adamw",
        lr=2e-5,
        weight_decay=0.05,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip_norm=0.01,
        schedule="poly",
        power=0.9,
        end_lr=0.0,
        warmup_steps=0,
        layer_decay=None,  # upstream ViT-Adapter recipe: 0.9
        no_decay_norm_embed=False,  # upstream: True
        # parameters laid end to end per hyper-parameter group for the update (same numbers);
        # auto = unless parameters are split over fsdp
        flat_optimizer="auto",
        # flat optimiser: leaves of at most this many elements get groups of their own, updated
        # as one vector in the step (one kernel instead of one per bias / norm); 0 = off
        pack_small_leaves=0,
        # flat optimiser: the train state holds the parameters as its group vectors (the step
        # updates each group in one pass; checkpoints still hold the parameter tree);
        # auto = on GPUs whenever the optimiser is flat (train runs 41-42: -5.7 / -4.8 ms blocking)
        flat_params="auto",
        num_steps=num_steps,
    )


def train(batch_size: int = 4, num_steps: int = 160_000) -> Config:
    cfg = original_optimizer(num_steps)
    cfg.update(
        batch_size=batch_size,  # global batch
        grad_accum=1,
        seed=0,
        # a converted .npz the first step starts from (not used when resuming): from `sarformer
        # convert beit` (the backbone, as the original trained from BEiT weights; with
        # --beit-only the adapter keeps its initialisation) or `sarformer convert sarformer`
        # (the whole model, e.g. to fine-tune released weights); "" = the seeded initialisation
        init_from="",
        compute_dtype="bfloat16",
        param_dtype="float32",
        log_every=50,
        eval_every=5000,  # §6.1
        ckpt_every=40_000,  # §6.1
        keep_checkpoints=3,
        keep_best=True,  # best by mIoU
        nan_policy="stop",  # "stop" | "skip"
        # fsdp > 1 splits params / optimiser state with >= fsdp_min_size elements over `fsdp`
        mesh=Config(data=-1, fsdp=1, fsdp_min_size=2**14),
        # a directory: trace `profile_window` = (steps of this run to skip, steps to trace) with
        # jax.profiler into it (TensorBoard / Perfetto); "" = off
        profile="",
        profile_window=(10, 5),
        # after the first step (and each evaluation) collect once and gc.freeze() what is
        # alive, so Python's full collections stop walking the long-lived objects (0.2-0.4 s
        # host pauses that starved the GPUs, docs/benchmarks.md scaling run 13)
        freeze_gc=True,
    )
    return cfg


def eval_cfg(crop=(640, 640), stride=(426, 426), scale=(2560, 640)) -> Config:
    """§1.3: slide inference."""
    return Config(
        mode="slide",  # "whole" | "slide"
        crop_size=crop,
        stride=stride,
        scale=scale,
        aug_test=False,
        scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
        flip=True,
        batch_size=1,  # windows per model call (with several devices, rounded up to a multiple)
        # slide evaluation without TTA: consecutive images' windows in shared calls split over
        # the devices ("auto"), or one image at a time (False); see evaluate.parallel_refusal
        parallel="auto",
    )
