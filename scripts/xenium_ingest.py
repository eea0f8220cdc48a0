# Adapter of rules `xenium_ingest_spatialdata` and `xenium_ingest_hest` (workflow/rules/ingest.smk): one typed call.
from morphomol.smk import run


def main(smk):
    if smk.rule == "xenium_ingest_spatialdata":
        from morphomol.io.sdata import ingest_spatialdata

        return ingest_spatialdata(sdata=smk.input.sdata, out_dir=smk.params.out_dir, sample=smk.wildcards.sample,
                                  image=smk.params.image, he_mpp=smk.params.he_mpp)
    from morphomol.io.hest import ingest_hest

    return ingest_hest(transcripts=smk.input.transcripts, metadata=smk.input.metadata, he=smk.input.he,
                       out_dir=smk.params.out_dir, sample=smk.wildcards.sample, he_mpp=smk.params.he_mpp)


run(main)
