"""The spots study (seed 001): frozen pathology FM + 2-layer head on Visium / legacy-ST / HEST spots."""
