"""The cells study (seed 000): QLoRA-tuned multimodal LLM for cell types from expression and H&E.

Torch-free (imported while Snakemake builds the DAG): :mod:`.config` (typed ``cells`` section, task names),
:mod:`.study` (cohort kind ``cells``, registry entry, pre-flight checks), :mod:`.modelfiles` (what a local
base-model directory must hold), :mod:`.labels` (label map, free-text parsing), :mod:`.prompts` (templates,
task-ratio schedule), :mod:`.metrics`, :mod:`.tables`, :mod:`.plots`; data without torch: :mod:`.ingest`
(h5ad / Xenium cells -> unit table, H&E patches), :mod:`.sentences` (HVGs, Cell2Sentence sentences),
:mod:`.folds` (donor-grouped folds + sentences), :mod:`.baselines` (majority, logistic regression, kNN, null).

The LLM (torch, transformers, peft): :mod:`.base_model` (processor + special tokens, QLoRA / LoRA, adapters),
:mod:`.examples` (five tasks, sampler, encoding with token_type_ids and response-only labels),
:mod:`.trainer` (multi-task fine-tuning, resume, data parallel), :mod:`.launch` (torchrun),
:mod:`.evaluate` (free generation and constrained scoring), :mod:`.predict` (label new cells).
"""
