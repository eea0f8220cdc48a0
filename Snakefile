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


def all_targets():
    out = []
    for c in COHORTS:
        for s in samples_of(c):
            d = f"results/{c}/samples/{s}"
            out += [f"{d}/qc", f"{d}/registration.json", f"{d}/tiles.parquet", f"{d}/tokens.zarr"]
        out += [f"results/{c}/tables/table_a1.csv", f"results/{c}/tables/table_a2.csv"]
    return out


rule all:
    default_target: True
    input:
        all_targets(),
