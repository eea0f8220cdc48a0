# Snakemake adapter for rule `features` (workflow/rules/features.smk): no logic here.
from morphomol import features
from morphomol.smk import run

run(features.run_rule)
