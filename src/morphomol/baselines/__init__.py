"""Baselines shared by studies: :mod:`.ridge` (HEST-style ridge probe on frozen features)."""
