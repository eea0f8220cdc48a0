# Adapter of rule `spots_units` (workflow/rules/spots.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.spots.config import SpotsConfig
from morphomol.studies.spots.units import build_spot_units

run(lambda smk: build_spot_units(
    sample=smk.wildcards.sample,
    patient=smk.params.patient_id,
    fmt=smk.params.fmt,
    files={**{k: str(v) for k, v in smk.input.items()}, "sheet": smk.params.sheet},
    he_mpp=smk.params.he_mpp,
    image_scale=smk.params.image_scale,
    cfg=typed(SpotsConfig, smk.params.spots),
    out_units=smk.output.units,
    out_store=smk.output.store,
    out_qc=smk.output.qc,
    out_qc_png=smk.output.qc_png,
))
