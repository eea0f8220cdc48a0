# Snakemake adapter for rule qc (workflow/rules/qc.smk): no logic here.
from morphomol import qc
from morphomol.smk import run


def main(smk):
    qc.qc_sample(
        xenium_dir=smk.input.xenium,
        he_path=smk.input.he,
        he_mpp=smk.params.he_mpp,
        out_dir=smk.output[0],
        sample_id=smk.wildcards.sample,
        qv_min=smk.params.qv_min,
        batch_size=smk.params.batch_size,
        panel_genes=smk.params.panel_genes,
    )


run(main)
