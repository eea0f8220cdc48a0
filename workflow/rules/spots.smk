# The spots study (seed 001; morphomol.studies.spots): frozen pathology FM + 2-layer head on Visium / legacy-ST / HEST spots.


STUDY_TARGETS["spots"] = lambda cohort: []
