# Adapter of rule `spots_tables` (workflow/rules/spots.smk): one typed call.
from pathlib import Path

from morphomol.smk import run
from morphomol.studies.spots.settings import as_setting
from morphomol.studies.spots.tables import tables_metadata, write_spots_tables


def main(smk):
    p = smk.params
    return write_spots_tables(
        metrics_files=list(smk.input.metrics),
        settings={n: as_setting(d, n) for n, d in p.settings.items()},
        reasons=dict(p.reasons), reference=p.reference, out_dir=Path(smk.output.settings).parent,
        metadata=tables_metadata(cohort=smk.wildcards.cohort, config=p.config, models=p.models),
        cohort=smk.wildcards.cohort, predictions=dict(zip(p.names, map(Path, smk.input.predictions), strict=True)),
        folds=Path(smk.input.folds), transform=str(p.transform))


run(main)
