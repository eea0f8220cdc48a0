# morphomol: Xenium + H&E slides -> morpho-molecular models -> Table A.1 / A.2.
#
#   snakemake                      # local run, profile profiles/default
#   snakemake --profile slurm      # HPC (see README)
#   snakemake --report results/report.html


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/register.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/tokens.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tables.smk"


report: "workflow/report/workflow.rst"




rule all:
    default_target: True
    input:
        all_targets(),
