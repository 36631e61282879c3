"""Converters from PyTorch checkpoints (SAM, BEiT, SARFormer/Mask2Former mmseg) to our params."""
