# Adapter of rule `register` (workflow/rules/register.smk): one typed call.
from morphomol.config import IOConfig, RegistrationConfig, typed
from morphomol.registration import register_sample
from morphomol.smk import run

run(lambda smk: register_sample(
    xenium=smk.params.xenium_dir,
    he=smk.input.he,
    alignment=smk.input.get("alignment"),
    regions=smk.input.get("regions"),
    out_json=smk.output.registration,
    out_qc=smk.output.qc,
    sample=smk.wildcards.sample,
    he_mpp=smk.params.he_mpp,
    cfg=typed(RegistrationConfig, smk.params.registration),
    io=typed(IOConfig, smk.params.io),
    seed=smk.params.seed,
    prealigned=bool(getattr(smk.params, "prealigned", False)),  # xenium_ingest_* samples (not cells_register)
))
