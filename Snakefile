# morphomol: raw slides -> morpho-molecular models -> benchmark tables, one workflow for every study.
#
#   snakemake --cores N            # local run (profiles/default)
#   snakemake --profile slurm      # HPC (see README)
#   snakemake --report results/report.html
#
# common.smk loads and validates the configuration (typed, strict) and owns the results paths
# (workflow/paths.py); the shared stages follow; then one rules file per study. A study registers
# its final outputs in STUDY_TARGETS; `all` asks for those of every cohort that runs the study.


include: "workflow/rules/common.smk"
# shared stages of xenium cohorts
include: "workflow/rules/simulate.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/register.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/tokens.smk"
# shared by every study
include: "workflow/rules/splits.smk"
include: "workflow/rules/features.smk"
# studies: a study's rules are included only when a cohort of the configuration runs it (fewer rules, a
# faster DAG: Snakemake looks up every input file among the outputs of every rule)
if study_cohorts("fusion"):

    include: "workflow/rules/fusion.smk"


if study_cohorts("spots"):

    include: "workflow/rules/spots.smk"


if study_cohorts("cells"):

    include: "workflow/rules/cells.smk"


if study_cohorts("slides"):

    include: "workflow/rules/slides.smk"



report: "workflow/report/workflow.rst"


# Light jobs (seconds, little memory) run inside the Snakemake process itself, not as cluster jobs: a
# SLURM job per fold split or per table would wait in the queue far longer than it runs.
localrules:
    all,
    splits,


rule all:
    default_target: True
    input:
        all_targets(),
