# Snakemake adapter for rule register (workflow/rules/register.smk): no logic here.
from morphomol import registration
from morphomol.smk import run


def main(smk):
    registration.register_sample(
        xenium=smk.input.xenium,
        he=smk.input.he,
        alignment=smk.input.get("alignment"),
        regions=smk.input.get("regions"),
        out_json=smk.output.registration,
        out_qc=smk.output.qc,
        sample=smk.wildcards.sample,
        he_mpp=smk.params.he_mpp,
        qv_min=smk.params.qv_min,
        batch_size=smk.params.batch_size,
        seed=smk.params.seed,
        **smk.params.cfg,
    )


run(main)
