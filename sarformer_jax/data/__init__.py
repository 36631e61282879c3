"""Datasets and input pipelines (nothing heavy is imported here; grain / TFDS load lazily).

  synthetic.py    the synthetic ADE20K / Cityscapes-layout set and its proposal cache
  ade20k.py cityscapes.py tfds_source.py   record sources; sources.py: decoding and checks
  transforms.py   mmseg-semantics augmentations as numpy / OpenCV functions of a Generator
  proposals.py    the mask-proposal cache format
  pipeline.py     build_train_loader, build_eval_dataset, eval_preprocess, to_global_batch
  cli.py          `sarformer data synth | cityscapes-train-ids`
"""
