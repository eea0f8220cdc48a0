"""Snakemake adapter for rule `tables` (and `cross_cohort`): no logic here, see morphomol.tables."""

from morphomol import tables
from morphomol.smk import run


def main(smk):
    if smk.rule == "cross_cohort":
        tables.make_cross_cohort(dict(zip(smk.params.cohorts, smk.input.tables)), smk.output.csv, smk.output.md)
        return
    out_dir = smk.params.out_dir
    tables.make_tables(
        smk.input.metrics,
        out_dir,
        settings=smk.params.settings,
        encoders_cfg=smk.params.encoders,
        tables_cfg=smk.params.tables,
        n_folds=smk.params.n_folds,
        clip_settings=smk.params.clip_settings,
        min_mae_setting=smk.params.min_mae_setting,
        cohort=smk.wildcards.cohort,
        config=smk.params.config,
        metadata_json=smk.output.metadata_json,
        metadata_md=smk.output.metadata_md,
    )


run(main)
