# Adapter of rule `cells_units` (workflow/rules/cells.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.cells.config import CellsConfig
from morphomol.studies.cells.ingest import build_units

run(lambda smk: build_units(
    sample=smk.wildcards.sample,
    patient=smk.params.patient_id,
    out_units=smk.output.units,
    cfg=typed(CellsConfig, smk.params.cells),
    label_map=smk.input.label_map,
    h5ad=smk.input.get("h5ad"),
    xenium_dir=smk.params.xenium_dir,
    labels=smk.input.get("labels"),
    image_store=smk.input.get("image_store"),
    he_path=smk.input.get("he"),
    he_mpp=smk.params.he_mpp,
    registration=smk.input.get("registration"),
))
