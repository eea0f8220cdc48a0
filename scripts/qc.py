# Adapter of rule `qc` (workflow/rules/qc.smk): one typed call.
from morphomol.config import IOConfig, typed
from morphomol.qc import qc_sample
from morphomol.smk import run


def main(smk):
    io = typed(IOConfig, smk.params.io)
    qc_sample(xenium_dir=smk.params.xenium_dir, he_path=smk.input.he, he_mpp=smk.params.he_mpp, out_dir=smk.output[0],
              sample_id=smk.wildcards.sample, qv_min=io.qv_min, batch_size=io.batch_size,
              panel_genes=smk.params.panel_genes)


run(main)
