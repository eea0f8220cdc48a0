# The slides study (seed 003; morphomol.studies.slides): slide-level contrastive alignment of frozen H&E and RNA encoders.


STUDY_TARGETS["slides"] = lambda cohort: []
