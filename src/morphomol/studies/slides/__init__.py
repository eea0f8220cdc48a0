"""The slides study (seed 003): slide-level contrastive alignment of frozen H&E and RNA encoders."""
