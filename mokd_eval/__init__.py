"""Evaluation of self-supervised checkpoints (ours and third-party) with the field's standard protocols."""
