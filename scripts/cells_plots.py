# Adapter of rule `cells_plots` (workflow/rules/cells.smk): one typed call.
from morphomol.smk import run
from morphomol.studies.cells.plots import make_plots

run(lambda smk: make_plots(
    per_class=smk.input.per_class,
    confusion=smk.input.confusion,
    summary=smk.input.summary,
    train_logs=list(smk.input.train_logs),
    train_metrics=list(smk.input.train),
    out_dir=smk.output.plots,
))
