# Snakemake adapter for rules splits and panel (workflow/rules/splits.smk): no logic here.
from morphomol import panels, splits
from morphomol.smk import run


def main(smk):
    if smk.rule == "panel":
        cfg = dict(smk.params.cfg)
        panels.panel_fold(split=smk.input.split, counts=list(smk.input.counts), samples=smk.params.samples,
                          panel=dict(smk.params.panel), out=smk.output[0], mode=cfg.get("mode", "yaml"),
                          n_hvg_targets=int(cfg.get("n_hvg_targets", 100)))
        return
    cfg = dict(smk.params.cfg)
    splits.splits_cohort(tiles=list(smk.input.tiles), samples=smk.params.samples, patients=smk.params.patients,
                         out=[smk.output[0]], folds=[int(smk.wildcards.fold)], n_folds=int(cfg.get("n_folds", 4)),
                         val_fraction=float(cfg.get("val_fraction", 0.25)), seed=smk.params.seed)


run(main)
