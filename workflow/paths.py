"""Every results path of the workflow, defined once (the model is sopa's ``WorkflowPaths``).

Each method returns a path *pattern* with Snakemake wildcards when called without arguments
(``paths.tiles()`` -> ``results/{cohort}/samples/{sample}/tiles.parquet``, for rule outputs) and
a concrete path when given values (``paths.tiles("demo", "S01")``, for input functions). Rules
refer to each other's outputs through these methods only; library functions receive the
resulting paths explicitly and never rebuild them.

Layout::

    results/{cohort}/simulated/{sample}/            simulated inputs (demo cohorts)
    results/{cohort}/samples/{sample}/              per-sample artifacts (the unit-table contract)
        ingest/{format}/                            SpatialData / HEST samples converted to a bundle
        qc/  registration.json  registration_qc.png
        tiles.parquet  images.zarr  tiles_qc.png     unit geometry + image store
        tokens.zarr                                 transcripts pooled per ViT token (fusion)
        units.h5ad                                  unit table: obs = units, obsm['spatial'] µm, X = counts
    results/{cohort}/features/{encoder}/{sample}.zarr   frozen features, rows = units
    results/{cohort}/splits/folds.parquet               patient-grouped folds of the cohort (rows: fold x sample)
    results/{cohort}/{study}/...                        a study's own outputs (runs, tables, figures)
    results/{cohort}/{study}/samples/{sample}.h5ad      per-sample predictions (AnnData layers)
    results/{cohort}/export/{kind}/{sample}.*           `morphomol export` (SpatialData, QuPath, Explorer, h5)
    results/{cohort}/logs/{rule}/...                    one log per job
    results/{cohort}/benchmarks/{rule}/...              Snakemake `benchmark:` records of the heavy rules
    results/tables/                                     cross-cohort summaries
"""

from __future__ import annotations

W = {"cohort": "{cohort}", "sample": "{sample}", "encoder": "{encoder}", "fold": "{fold}", "setting": "{setting}",
     "format": "{format}"}


class WorkflowPaths:
    def __init__(self, root: str = "results") -> None:
        self.root = root.rstrip("/")

    # ---------------------------------------------------------------- per cohort / sample
    def cohort_dir(self, cohort: str = W["cohort"]) -> str:
        return f"{self.root}/{cohort}"

    def sample_dir(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.root}/{cohort}/samples/{sample}"

    def simulated_dir(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.root}/{cohort}/simulated/{sample}"

    def simulated(self, name: str, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.simulated_dir(cohort, sample)}/{name}"

    def ingested(self, fmt: str = W["format"], name: str = "", cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        """A file of a SpatialData / HEST sample converted to a bundle (``ingest/{format}/{name}``)."""
        return f"{self.sample_dir(cohort, sample)}/ingest/{fmt}/{name}"

    def qc(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.sample_dir(cohort, sample)}/qc"

    def registration(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.sample_dir(cohort, sample)}/registration.json"

    def registration_qc(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.sample_dir(cohort, sample)}/registration_qc.png"

    def tiles(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.sample_dir(cohort, sample)}/tiles.parquet"

    def image_store(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.sample_dir(cohort, sample)}/images.zarr"

    def tiles_qc(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.sample_dir(cohort, sample)}/tiles_qc.png"

    def tokens(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.sample_dir(cohort, sample)}/tokens.zarr"

    def units(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        return f"{self.sample_dir(cohort, sample)}/units.h5ad"

    def features(self, cohort: str = W["cohort"], encoder: str = W["encoder"], sample: str = W["sample"]) -> str:
        return f"{self.root}/{cohort}/features/{encoder}/{sample}.zarr"

    def folds(self, cohort: str = W["cohort"]) -> str:
        """Every fold of the cohort, one row per (fold, sample) (``morphomol.splits``)."""
        return f"{self.root}/{cohort}/splits/folds.parquet"

    # ---------------------------------------------------------------- per study
    def study_dir(self, study: str, cohort: str = W["cohort"]) -> str:
        return f"{self.root}/{cohort}/{study}"

    def panel(self, study: str, cohort: str = W["cohort"], fold: int | str = W["fold"]) -> str:
        return f"{self.study_dir(study, cohort)}/panels/fold{fold}.json"

    def run_dir(self, study: str, cohort: str = W["cohort"], setting: str = W["setting"],
                fold: int | str = W["fold"]) -> str:
        return f"{self.study_dir(study, cohort)}/runs/{setting}/fold{fold}"

    def run(self, study: str, name: str, cohort: str = W["cohort"], setting: str = W["setting"],
            fold: int | str = W["fold"]) -> str:
        """A file of one run: metrics.json, predictions.parquet, checkpoint.safetensors, checkpoint.json."""
        return f"{self.run_dir(study, cohort, setting, fold)}/{name}"

    def study_sample(self, study: str, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        """A study's per-sample predictions as AnnData (layers ``measured``, ``pred_<setting>``)."""
        return f"{self.study_dir(study, cohort)}/samples/{sample}.h5ad"

    def export(self, kind: str, cohort: str = W["cohort"], sample: str = W["sample"], ext: str = "") -> str:
        """Default output of ``morphomol export {kind}`` for one sample (``{sample}{ext}``)."""
        return f"{self.root}/{cohort}/export/{kind}/{sample}{ext}"

    def tables_dir(self, study: str, cohort: str = W["cohort"]) -> str:
        return f"{self.study_dir(study, cohort)}/tables"

    def table(self, study: str, name: str, cohort: str = W["cohort"]) -> str:
        return f"{self.tables_dir(study, cohort)}/{name}"

    def cross_cohort(self, name: str) -> str:
        return f"{self.root}/tables/{name}"

    # ---------------------------------------------------------------- benchmarks
    def benchmark(self, rule: str, *parts: str, cohort: str = W["cohort"]) -> str:
        """``results/{cohort}/benchmarks/{rule}/{part}/.../{last}.tsv`` (parts default to the sample):
        wall time, memory and I/O of a heavy rule's job (Snakemake ``benchmark:``)."""
        tail = "/".join(parts) if parts else W["sample"]
        return f"{self.root}/{cohort}/benchmarks/{rule}/{tail}.tsv"

    # ---------------------------------------------------------------- logs
    def log(self, rule: str, *parts: str, cohort: str = W["cohort"]) -> str:
        """``results/{cohort}/logs/{rule}/{part}/.../{last}.log`` (parts default to the sample)."""
        tail = "/".join(parts) if parts else W["sample"]
        return f"{self.root}/{cohort}/logs/{rule}/{tail}.log"

    # ---- spots study
    def spots_qc(self, cohort: str = W["cohort"], sample: str = W["sample"], ext: str = "json") -> str:
        """Per-sample QC of the spots: ``spots_qc.json`` (counts, µm/px, geometry) / ``spots_qc.png``."""
        return f"{self.sample_dir(cohort, sample)}/spots_qc.{ext}"

    def spots_captions_vlm(self, cohort: str = W["cohort"], sample: str = W["sample"]) -> str:
        """Captions generated by the caption model, one per unit (parquet with model metadata)."""
        return f"{self.sample_dir(cohort, sample)}/captions_vlm.parquet"

    def spots_targets(self, cohort: str = W["cohort"], fold: int | str = W["fold"]) -> str:
        """Target genes of a fold, chosen on its training samples."""
        return f"{self.study_dir('spots', cohort)}/targets/fold{fold}.json"

    def spots_text(self, name: str, cohort: str = W["cohort"]) -> str:
        """The cohort's captions (``captions.parquet``) and their embeddings (``embeddings.zarr``)."""
        return f"{self.study_dir('spots', cohort)}/text/{name}"

    def spots_run(self, name: str, cohort: str = W["cohort"], setting: str = W["setting"]) -> str:
        """A setting's (or baseline's) outputs over every fold and seed: metrics.json, predictions.parquet;
        ``runs/{setting}/fold{k}/seed{s}/`` hold the individual runs."""
        return f"{self.study_dir('spots', cohort)}/runs/{setting}/{name}"

    def spots_outputs(self, name: str, cohort: str = W["cohort"]) -> str:
        """``samples/`` (per-sample AnnData with measured / predicted layers) and ``maps/`` (figures)."""
        return f"{self.study_dir('spots', cohort)}/{name}"

    # ---- cells study
    def cells_base_model(self, cohort: str = W["cohort"]) -> str:
        """The tiny Gemma-3 built locally for a demo / test cohort (``cells.model.tiny``)."""
        return f"{self.study_dir('cells', cohort)}/base_model"

    def cells_folds(self, cohort: str = W["cohort"]) -> str:
        """``folds/folds.parquet``: the donor-level assignment of every fold (fold, patient_id, partition, n_cells)."""
        return f"{self.study_dir('cells', cohort)}/folds/folds.parquet"

    def cells_fold(self, ext: str, cohort: str = W["cohort"], fold: int | str = W["fold"]) -> str:
        """``folds/fold{k}.parquet`` (donor-grouped split + cell sentences) or ``.json`` (HVGs, labels, counts)."""
        return f"{self.study_dir('cells', cohort)}/folds/fold{fold}.{ext}"

    # ---- slides study
    def slides_simulated_dir(self, cohort: str = W["cohort"]) -> str:
        """Simulated slides of a demo slides cohort (one directory: ``{sample}.tif`` per slide)."""
        return f"{self.root}/{cohort}/simulated/slides"

    def slides_simulated(self, name: str, cohort: str = W["cohort"]) -> str:
        """``rna_counts.tsv`` / ``truth.parquet`` of a simulated slides cohort."""
        return f"{self.root}/{cohort}/simulated/{name}"

    def slides_rna(self, name: str, cohort: str = W["cohort"]) -> str:
        """``rna/expression.h5ad``, ``rna/preprocessing.json``, ``rna/genes.txt`` (the matched, logged bulk RNA)."""
        return f"{self.study_dir('slides', cohort)}/rna/{name}"

    def slides_genesets(self, name: str, cohort: str = W["cohort"]) -> str:
        """``genesets/scores.parquet`` (ssGSEA), ``genesets/sets.json``, ``genesets/coverage.tsv``."""
        return f"{self.study_dir('slides', cohort)}/genesets/{name}"

    def slides_embeddings(self, cohort: str = W["cohort"], group: str = "{group}") -> str:
        """One group's per-slide embeddings (rule ``slides_embed``): a directory of ``{sample}.zarr``."""
        return f"{self.study_dir('slides', cohort)}/embeddings/{group}"

    def slides_embedding(self, cohort: str, group: str, sample: str) -> str:
        """The embedding of one slide (mean tile vector, seeded bag, tile index) inside its group's directory."""
        return f"{self.slides_embeddings(cohort, group)}/{sample}.zarr"

    def slides_transfer(self, cohort: str = W["cohort"], target: str = "{target}") -> str:
        """Leave-one-cohort-out transfer + few-shot results with ``target`` held out."""
        return f"{self.study_dir('slides', cohort)}/transfer/{target}.json"
