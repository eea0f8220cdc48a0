# The cells study (seed 000; morphomol.studies.cells): QLoRA-tuned multimodal LLM for cell types from expression and H&E.


STUDY_TARGETS["cells"] = lambda cohort: []
