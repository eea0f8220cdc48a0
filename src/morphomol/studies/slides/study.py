"""The slides study's registry entry, its cohort kind and pre-flight checks (torch-free).

Cohort kind ``slides`` (``workflow/schemas/samples.slides.schema.yaml``): one H&E whole-slide image
per row with ``sample_id, patient_id, slide_path, cohort`` (source cohort / project: the unit of
leave-one-cohort-out transfer) and optional ``cancer_type``, ``rna_id`` (the sample's label in the
RNA matrix) and ``he_mpp``. The bulk RNA matrix and its value type are named in the cohort's
``slides:`` section (or pseudo-bulk of a spatial cohort).

Checked before any job (``morphomol check-config`` / ``snakemake -n``), each an InputError naming
the file and the field: one RNA source (an existing matrix file, or another cohort to pseudo-bulk);
GMT files that parse, and grounded set names among them; the patch encoder among
``features.encoders`` (with weights when it needs them); known slide encoders (frozen ones with
existing weights); the RNA encoder (``pca`` or a registry expression encoder with local weights);
folds <= patients; enough patients per cohort for the transfer; the ``simulate`` block's keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphomol.config.kinds import CohortKind, register_kind
from morphomol.encoders import bulk_rna  # noqa: F401  (registers the bulk-RNA expression encoder)
from morphomol.errors import InputError
from morphomol.splits import check_fold_plan
from morphomol.studies import StudySpec, StudySummary, log_noop, register_study

SLIDES = "slides"

KIND = register_kind(CohortKind(
    name="slides",
    description="H&E whole-slide images with bulk RNA (slides study)",
    required=("sample_id", "patient_id", "slide_path", "cohort"),
    columns=("sample_id", "patient_id", "slide_path", "cohort", "cancer_type", "rna_id", "he_mpp"),
    path_columns=("slide_path",),
    numeric_columns=("he_mpp",),
    studies=(SLIDES,),
))


def _check_rna(cohort: Any, s: Any, *, workdir: Path, file: Path) -> None:
    rna = s.rna
    if bool(rna.path) == bool(rna.pseudobulk_from):
        raise InputError("name exactly one RNA source", file=file, field="slides.rna.path",
                         expected="slides.rna.path (a matrix file) or slides.rna.pseudobulk_from (a spatial cohort)")
    if rna.pseudobulk_from == cohort.name:
        raise InputError("a cohort cannot be its own pseudo-bulk source", file=file, field="slides.rna.pseudobulk_from",
                         expected="another (spatial) cohort of config.yaml")
    if rna.path and cohort.simulate is None:
        p = workdir / rna.path
        if not p.is_file():
            raise InputError(f"RNA matrix not found: {rna.path}" + (" (it is a directory)" if p.is_dir() else ""),
                             file=file, field="slides.rna.path", expected="an existing TSV/CSV/Parquet/h5ad file")


def _check_gene_sets(s: Any, *, workdir: Path, file: Path) -> None:
    from morphomol.studies.slides.genesets import read_gmts

    if not s.gene_sets.gmt:
        raise InputError("no GMT file configured", file=file, field="slides.gene_sets.gmt",
                         expected="at least one GMT file (e.g. MSigDB Hallmark)")
    sets = read_gmts([workdir / g for g in s.gene_sets.gmt])
    unknown = [g for g in s.gene_sets.grounded if g not in sets]
    if unknown:
        raise InputError(f"grounded set(s) not in the GMT files: {', '.join(unknown)}", file=file,
                         field="slides.gene_sets.grounded", expected="names of sets of slides.gene_sets.gmt")


def _check_encoders(cfg: Any, s: Any, *, workdir: Path, file: Path) -> None:
    from morphomol.encoders.registry import get_spec
    from morphomol.studies.slides.slide_encoders import get_slide_encoder

    if s.encoder not in cfg.features.encoders:
        raise InputError(f"patch encoder '{s.encoder}' is not among features.encoders {list(cfg.features.encoders)}",
                         file=file, field="slides.encoder", expected="an encoder whose features are cached")
    spec = get_spec(s.encoder)
    if spec.kind != "image":
        raise InputError(f"'{s.encoder}' is an {spec.kind} encoder", file=file, field="slides.encoder",
                         expected="an image encoder of the registry")
    if spec.requires_weights and not cfg.weights(s.encoder):
        raise InputError(f"encoder '{s.encoder}' needs weights", file=file, field=f"encoders.{s.encoder}.weights",
                         expected="a local weights path")
    for name in s.poolings:
        se = get_slide_encoder(name, file=file)
        if se.requires_weights:
            w = s.slide_encoder_weights.get(name)
            if not w or not (workdir / w).is_file():
                raise InputError(f"slide encoder '{name}' needs a local weights file" + (f" ({w} not found)" if w else ""),
                                 file=file, field=f"slides.slide_encoder_weights.{name}",
                                 expected="an existing safetensors file")
    if s.rna_encoder != "pca":
        rs = get_spec(s.rna_encoder)
        if rs.kind != "expression":
            raise InputError(f"'{s.rna_encoder}' is an {rs.kind} encoder", file=file, field="slides.rna_encoder",
                             expected="pca or an expression encoder of the registry")
        if rs.requires_weights and not cfg.weights(s.rna_encoder):
            raise InputError(f"RNA encoder '{s.rna_encoder}' needs local weights", file=file,
                             field=f"encoders.{s.rna_encoder}.weights", expected="a local model directory")


def _check_patients(cohort: Any, cfg: Any, *, file: Path) -> None:
    df = cohort.samples
    check_fold_plan(cohort, file=cohort.source_of("splits") or file)
    per = df.groupby("patient_id")["cohort"].nunique()
    if (per > 1).any():
        raise InputError(f"patient {per.index[per > 1][0]} appears in two cohorts", file=cohort.sheet_path,
                         field="cohort", expected="each patient in one source cohort")
    if cfg.slides.transfer.enabled and df["cohort"].nunique() >= 2:
        pats = df.groupby("cohort")["patient_id"].nunique()
        for c in pats.index:
            if int(pats.drop(c).sum()) < 2 or int(pats[c]) < 2:
                raise InputError(f"leave-one-cohort-out with target '{c}': {int(pats.drop(c).sum())} source and "
                                 f"{int(pats[c])} target patient(s)", file=cohort.sheet_path, field="cohort",
                                 expected="at least 2 patients in every cohort and in its complement "
                                          "(or slides.transfer.enabled: false)")


def check(cohort: Any, *, workdir: Path, config_file: Path, preflight: bool = True) -> None:
    """Everything checkable before any job runs (see the module doc)."""
    cfg = cohort.cfg
    s = cfg.slides
    file = cohort.source_of("slides") or config_file
    _check_rna(cohort, s, workdir=workdir, file=file)
    _check_gene_sets(s, workdir=workdir, file=file)
    _check_encoders(cfg, s, workdir=workdir, file=cohort.source_of("features") or file)
    _check_patients(cohort, cfg, file=config_file)
    if cohort.simulate is not None:
        from morphomol.synthetic.slides import SlideSimParams

        params = SlideSimParams.from_mapping(cohort.simulate, file=cohort.path)
        if not (workdir / params.gmt).is_file():
            raise InputError(f"GMT not found: {params.gmt}", file=cohort.path, field="simulate.gmt",
                             expected="an existing GMT file")
    if preflight:
        log_noop(summary(cohort, workdir=workdir))


def summary(cohort: Any, *, workdir: Path) -> StudySummary:
    """``slides: patch encoder vit_s, poolings mean, abmil, RNA encoder pca``. Missing required weights stop the
    check above (naming the key); a real cohort whose patch encoder runs from a random init gets a warning."""
    from morphomol.encoders.registry import get_spec

    cfg = cohort.cfg
    s = cfg.slides
    random_init = not get_spec(s.encoder).requires_weights and not cfg.weights(s.encoder)
    line = (f"slides: patch encoder {s.encoder}" + (" (random init)" if random_init else "")
            + f", poolings {', '.join(s.poolings)}, RNA encoder {s.rna_encoder}")
    warnings = []
    if random_init and cohort.simulate is None:
        warnings.append(f"cohort '{cohort.name}': slides.encoder {s.encoder} has no weights (encoders.{s.encoder}"
                        f".weights): the slide embeddings are built from a randomly initialised {s.encoder}; set "
                        f"encoders.{s.encoder}.weights, or slides.encoder to a pretrained encoder with weights")
    return StudySummary(line, tuple(warnings))


STUDY = register_study(StudySpec(
    name=SLIDES,
    description="slide-level contrastive alignment of frozen H&E and RNA encoders, gene-set prompting (seed 003)",
    cohort_kinds=("slides",),
    check=check,
    summary=summary,
))
