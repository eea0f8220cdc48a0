"""Snakemake adapter for rule `plots`: no logic here, see morphomol.plots.make_plots."""

from pathlib import Path

from morphomol import plots
from morphomol.smk import run


def main(smk):
    cfg = smk.params.tables or {}
    cohort_dir = Path(smk.input.a1).parent.parent
    plots.make_plots(
        cohort_dir,
        smk.output.plots,
        tables_dir=Path(smk.input.a1).parent,
        samples=smk.params.samples,
        prediction_paths=list(smk.input.predictions),
        token_stores=dict(zip(smk.params.sample_names, smk.input.tokens)),
        panel_path=smk.input.panel,
        plot_gene=cfg.get("plot_gene"),
        spatial_samples=cfg.get("spatial_samples"),
        thumbnail_max_size=int(cfg.get("thumbnail_max_size", 1024)),
        min_mae_setting=smk.params.min_mae_setting,
    )


run(main)
