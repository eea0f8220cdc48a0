# Snakemake adapter for rule `min_mae` (workflow/rules/train.smk): no logic here.
from morphomol import training
from morphomol.smk import run

run(training.run_rule)
