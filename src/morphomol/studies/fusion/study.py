"""The fusion study's registry entry and its pre-flight checks (torch-free).

Everything the fusion rules would otherwise find only when they run, checked from the config,
the sheets and the small files of each bundle (never the transcripts or images):

* the settings file (schema + combinations + encoder names), and that ``tables.baseline`` names a
  setting (or ``best_morph_only``);
* tile geometry: the stride divides the tile and is a whole number of tokens;
* the fold plan (:func:`morphomol.splits.plan_folds`): ``splits.n_folds`` <= patients, ``splits.validation``
  possible in every fold (the shared policy; asserted in code on every fold);
* panel genes: no control probe among core/add-on genes; when a bundle ships ``gene_panel.json``
  every panel gene is one of its targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphomol.errors import InputError
from morphomol.splits import check_fold_plan
from morphomol.studies import StudySpec, StudySummary, log_noop, register_study


def check_tile_geometry(tile_px: int, stride_px: int, grid: int, *, file: Any = None) -> None:
    k = tile_px / stride_px
    if abs(k - round(k)) > 1e-9 or round(k) < 1:
        raise InputError(f"stride_px {stride_px} does not divide tile_px {tile_px}", file=file,
                         field="tiling.stride_px", expected="a divisor of tiling.tile_px (e.g. 512 / 256)")
    s = grid / round(k)
    if abs(s - round(s)) > 1e-9:
        raise InputError(f"the stride ({stride_px} px of a {tile_px} px tile) is not a whole number of the "
                         f"{grid}x{grid} tokens", file=file, field="tiling.stride_px",
                         expected="tokens.grid * stride_px / tile_px to be an integer")


def check_panel_genes(cohort: Any, *, workdir: Path) -> None:
    from morphomol.io.xenium_layout import CONTROL_PREFIXES, is_control, read_gene_panel

    panel = cohort.panel
    if panel is None:
        return
    for key, genes in (("core", panel.core), ("addon", panel.addon)):
        ctrl = [g for g in genes if is_control(g)]
        if ctrl:
            raise InputError(f"{len(ctrl)} control probe(s) in the panel: {', '.join(ctrl[:5])}", file=panel.path,
                             field=key, expected="genes, not control features (" + ", ".join(CONTROL_PREFIXES) + ")")
    if cohort.simulate is not None or panel.mode != "yaml":
        return
    for sid in cohort.sample_ids:
        xdir = cohort.field(sid, "xenium_dir")
        if not xdir:
            continue
        targets = read_gene_panel(workdir / xdir)
        if targets is None:
            continue
        have = set(targets)
        for key, genes in (("core", panel.core), ("addon", panel.addon)):
            miss = [g for g in genes if g not in have]
            if miss:
                raise InputError(f"sample {sid}: {len(miss)} {key} gene(s) not in the bundle's gene panel "
                                 f"({Path(xdir) / 'gene_panel.json'}): {', '.join(miss[:10])}", file=panel.path,
                                 field=key, expected="genes measured in every sample")


def check(cohort: Any, *, workdir: Path, config_file: Path, preflight: bool = True) -> None:
    from morphomol.studies.fusion.settings import load_settings

    cfg = cohort.cfg
    settings_file = workdir / cfg.experiments.settings_file
    settings = load_settings(settings_file)
    baseline = cfg.tables.baseline
    if baseline != "best_morph_only" and baseline not in settings:
        raise InputError(f"unknown setting '{baseline}'", file=cohort.source_of("tables") or config_file,
                         field="tables.baseline", expected="best_morph_only or a setting of " + str(settings_file))
    check_tile_geometry(cfg.tiling.tile_px, cfg.tiling.stride_px, cfg.tokens.grid,
                        file=cohort.source_of("tiling") or config_file)
    vit = cfg.model.vit
    if vit.embed_dim % vit.num_heads:
        raise InputError(f"model.vit.embed_dim {vit.embed_dim} is not a multiple of model.vit.num_heads {vit.num_heads}",
                         file=cohort.source_of("model") or config_file, field="model.vit.embed_dim",
                         expected="a multiple of model.vit.num_heads (each attention head gets embed_dim / num_heads)")
    check_fold_plan(cohort, file=cohort.source_of("splits") or config_file)
    check_panel_genes(cohort, workdir=workdir)
    if preflight:
        log_noop(summary(cohort, workdir=workdir))


def summary(cohort: Any, *, workdir: Path) -> StudySummary:
    """``fusion: 17/37 settings runnable (20 need encoders.uni.weights, ...)``; a warning when none can run."""
    from morphomol.studies.fusion.settings import load_settings

    settings = load_settings(workdir / cohort.cfg.experiments.settings_file)
    weights = {e: entry.weights for e, entry in cohort.cfg.encoders.items()}
    missing = {n: s.missing_weights(weights) for n, s in settings.items()}
    runnable = [n for n, m in missing.items() if not m]
    keys = sorted({f"encoders.{e}.weights" for m in missing.values() for e in m})
    line = f"fusion: {len(runnable)}/{len(settings)} settings runnable"
    if keys:
        line += f" ({len(settings) - len(runnable)} need {', '.join(keys)})"
    warnings = []
    if not runnable:
        warnings.append(f"cohort '{cohort.name}': the fusion study will train no model: none of its {len(settings)} "
                        f"settings can run without weights; set {' and '.join(keys)} (a local weights file; "
                        "`morphomol encoders` lists what each needs)")
    return StudySummary(line, tuple(warnings))


STUDY = register_study(StudySpec(
    name="fusion",
    description="early/late fusion of Xenium transcript tokens and H&E tiles (seed 002): Table A.1 / A.2",
    cohort_kinds=("xenium",),
    check=check,
    settings_schema="settings.fusion.schema.yaml",
    summary=summary,
))
