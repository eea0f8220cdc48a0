"""The ``morphomol`` command: small entry points beside the Snakemake workflow.

    morphomol init DIR --name NAME [--patient-regex 'REGEX']   a cohort (sheet + YAML) from a folder of bundles
    morphomol doctor                                           is this machine ready (torch/CUDA, weights, SLURM)
    morphomol check-config [config/config.yaml]
    morphomol export spatialdata|qupath|explorer|features --cohort C [--samples S ...] [--out DIR]
    morphomol predict --cohort C --setting S --fold K --on NEW_COHORT [--samples S ...]
    morphomol simulate OUT_DIR --panel config/cohorts/demo/panel.yaml --patients 3 --samples-per-patient 2
    morphomol encoders | studies

Exports and predictions read a finished run's results (``--results``, default ``results``) and the
configuration that made them (``--config``); run them from the workflow directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from morphomol.errors import MorphomolError
from morphomol.util.logs import get_logger, setup_logging

log = get_logger("cli")


def _cmd_simulate(args: argparse.Namespace) -> None:
    from morphomol.config import read_yaml
    from morphomol.synthetic import simulate_cohort

    panel = read_yaml(args.panel, "panel YAML")
    extra = read_yaml(args.params, "simulation parameters YAML") if args.params else {}
    sheet = simulate_cohort(
        args.out_dir,
        n_patients=args.patients,
        samples_per_patient=args.samples_per_patient,
        core_genes=list(panel["core"]),
        addon_genes=list(panel["addon"]),
        seed=args.seed,
        **(extra or {}),
    )
    print(f"simulated {len(sheet)} samples into {args.out_dir} (sample sheet: {Path(args.out_dir) / 'samples.tsv'})")


def _cmd_encoders(args: argparse.Namespace) -> None:
    from morphomol.encoders import list_encoders_table

    configured = None
    if args.config:
        from morphomol.config import load_config

        configured = load_config(args.config).base.encoders
    print(list_encoders_table(configured))


def _cmd_studies(args: argparse.Namespace) -> None:
    from morphomol.config import kinds
    from morphomol.studies import list_studies

    for s in list_studies():
        print(f"{s.name:10s} cohort kinds: {', '.join(s.cohort_kinds):12s} {s.description}")
    print()
    for k in kinds().values():
        print(f"cohort kind {k.name}: {k.description}; sheet columns {', '.join(k.columns)} "
              f"(required: {', '.join(k.required)}); default studies: {', '.join(k.studies)}")


def _cmd_check_config(args: argparse.Namespace) -> None:
    from morphomol.config import load_config

    pc = load_config(args.config)
    for name, c in pc.cohorts.items():
        line = (f"cohort {name} ({c.kind.name}; studies {', '.join(c.studies)}): {len(c.samples)} samples, "
                f"{c.samples['patient_id'].nunique()} patients")
        if c.panel is not None:
            line += f", panel {c.panel.mode}: {len(c.panel.core)} core / {len(c.panel.addon)} add-on genes"
        if "fusion" in c.studies:
            from morphomol.studies.fusion.settings import load_settings

            settings = load_settings(c.cfg.experiments.settings_file)
            weights = {e: entry.weights for e, entry in c.cfg.encoders.items()}
            runnable = [s for s in settings.values() if s.not_runnable_reason(weights) is None]
            line += f"; fusion: {len(runnable)}/{len(settings)} settings runnable"
        print(line)
    print("configuration OK")


def _cmd_init(args: argparse.Namespace) -> None:
    from morphomol.tools.init import init_cohort

    out = init_cohort(args.dir, name=args.name, out_dir=args.out, relative_to=args.relative_to,
                      patient_regex=args.patient_regex, patients=args.patients, max_depth=args.max_depth,
                      overwrite=args.overwrite)
    for name, c in out["cohorts"].items():
        print(f"cohort {name} ({c['kind']}): {c['n']} samples -> {c['yaml']}, {c['samples']}")
        for t in c["todo"]:
            print(f"  {t[2:]}")
        print(f"  next: add `{name}: {c['yaml']}` under `cohorts:` in config/config.yaml, then `morphomol check-config`")


def _cmd_doctor(args: argparse.Namespace) -> int:
    from morphomol.tools.doctor import run_doctor

    checks = run_doctor(args.config, profile=args.profile, checksums=not args.no_checksums)
    for c in checks:
        print(c.line())
    bad = [c for c in checks if c.status == "fail"]
    print(f"{len(checks)} checks: {len(bad)} failed, {sum(c.status == 'warn' for c in checks)} warnings")
    return 1 if bad else 0


def _samples(args: argparse.Namespace, cohort: str | None = None) -> tuple[object, object, list[str]]:
    from morphomol.config import load_config
    from morphomol.errors import InputError
    from morphomol.export.sample import workflow_paths
    from morphomol.util.names import check_name

    name = check_name(cohort or args.cohort, "--on" if cohort else "--cohort")
    for s in args.samples or ():
        check_name(s, "--samples")
    pc = load_config(args.config)
    paths = workflow_paths(args.results)
    if name not in pc.cohorts:
        raise InputError(f"unknown cohort {name!r}", file=args.config, field="cohorts",
                         expected="one of " + ", ".join(pc.cohorts))
    return pc, paths, list(args.samples or pc.cohorts[name].sample_ids)


def _cmd_export(args: argparse.Namespace) -> None:
    from morphomol.export.sample import finished_sample
    from morphomol.util.progress import progress

    pc, paths, samples = _samples(args)
    fss = [finished_sample(pc, args.cohort, s, paths) for s in samples]  # all checked before anything is written
    for fs in progress(fss, desc=f"export {args.what}", unit="sample"):
        ext = {"spatialdata": ".zarr", "qupath": ".geojson", "explorer": "_he_imagealignment.csv", "features": ".h5"}
        default = paths.export(args.what if args.what != "features" else f"features_{args.encoder}", args.cohort,
                               fs.sample, ext[args.what])
        out = Path(args.out) / Path(default).name if args.out else Path(default)
        if args.what == "spatialdata":
            from morphomol.export.spatialdata import export_spatialdata

            export_spatialdata(fs, out, he_level=args.he_level, transcripts=not args.no_transcripts)
        elif args.what == "qupath":
            from morphomol.export.qupath import export_qupath

            export_qupath(fs, out, genes=args.genes or (), tissue=not args.no_tissue)
        elif args.what == "explorer":
            from morphomol.export.explorer import export_explorer

            export_explorer(fs, out)
        else:
            from morphomol.export.features import export_features_h5

            export_features_h5(fs, args.encoder, out)
        print(f"{fs.sample}: {out}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from morphomol.errors import InputError
    from morphomol.export.sample import finished_sample
    from morphomol.tools.predict import NewSample, predict_fusion, predict_spots, write_predictions

    from morphomol.util.names import check_name

    check_name(args.cohort, "--cohort")
    check_name(args.setting, "--setting")
    pc, paths, samples = _samples(args, args.on)
    trained = pc.cohorts.get(args.cohort)
    if trained is None:
        raise InputError(f"unknown cohort {args.cohort!r}", file=args.config, field="cohorts")
    new = []
    for s in samples:
        fs = finished_sample(pc, args.on, s, paths)
        tokens = Path(paths.tokens(args.on, s))
        new.append(NewSample(s, fs.units, tokens if tokens.exists() else None,
                             fs.image_store if fs.image_store and fs.image_store.exists() else None, dict(fs.features)))
    if "spots" in trained.studies:
        seed = args.seed if args.seed is not None else trained.cfg.spots.seeds[0]
        run = Path(paths.spots_run("", args.cohort, args.setting)) / f"fold{args.fold}" / f"seed{seed}"
        enc = trained.cfg.spots.encoder
        preds = predict_spots(run, paths.spots_targets(args.cohort, args.fold), new, encoder=enc, device=args.device)
    else:
        run = Path(paths.run_dir("fusion", args.cohort, args.setting, args.fold))
        preds = predict_fusion(run, new, device=args.device, batch_size=args.batch_size)
    out = Path(args.out) if args.out else Path(paths.export(f"predict_{args.cohort}_{args.setting}_fold{args.fold}",
                                                            args.on, "x")).parent
    for p in write_predictions(new, {args.setting: preds}, out):
        print(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="morphomol", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("simulate", help="write a simulated paired Xenium + H&E cohort in real file formats")
    p.add_argument("out_dir")
    p.add_argument("--panel", required=True, help="panel YAML with core/addon gene lists")
    p.add_argument("--patients", type=int, default=3)
    p.add_argument("--samples-per-patient", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params", help="YAML of extra simulate_sample parameters (tissue_um, he_mpp, ...)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("encoders", help="list the encoder registry (and the weights a config names)")
    p.add_argument("--config", help="config.yaml whose encoders section to show")
    p.set_defaults(func=_cmd_encoders)

    p = sub.add_parser("studies", help="list the studies and cohort kinds")
    p.set_defaults(func=_cmd_studies)

    p = sub.add_parser("check-config", help="validate the config, cohorts, sample sheets, panels and settings "
                                            "(everything checkable before any job runs)")
    p.add_argument("config", nargs="?", default="config/config.yaml")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("init", help="a sample sheet and cohort YAML from a folder of Xenium bundles / Space Ranger outs")
    p.add_argument("dir")
    p.add_argument("--name", required=True, help="cohort name (config/cohorts/NAME.yaml, NAME/samples.tsv)")
    p.add_argument("--out", default="config/cohorts", help="where the cohort files go (default config/cohorts)")
    p.add_argument("--relative-to", default=".", help="paths in the sheet relative to this (the workflow directory)")
    p.add_argument("--patient-regex", help="regex whose first group is the patient id (searched in run name, region "
                                           "name and path), e.g. 'P(\\d+)'")
    p.add_argument("--patients", help="TSV/CSV with sample_id, patient_id")
    p.add_argument("--max-depth", type=int, default=4)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("doctor", help="check Python, torch/CUDA, OpenSlide, weights, sbatch and the SLURM partitions")
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--profile", default="profiles/slurm")
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 of the weight files")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("export", help="a finished sample in a field format: spatialdata | qupath | explorer | features")
    p.add_argument("what", choices=["spatialdata", "qupath", "explorer", "features"])
    p.add_argument("--cohort", required=True)
    p.add_argument("--samples", nargs="*", help="default: every sample of the cohort")
    p.add_argument("--out", help="output directory (default results/{cohort}/export/{what}/)")
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--results", default="results")
    p.add_argument("--he-level", type=int, default=0, help="spatialdata: the H&E pyramid level to export")
    p.add_argument("--no-transcripts", action="store_true", help="spatialdata: leave the transcripts out")
    p.add_argument("--genes", nargs="*", help="qupath: raw counts of these genes as measurements")
    p.add_argument("--no-tissue", action="store_true", help="qupath: no tissue contours")
    p.add_argument("--encoder", default="vit_s", help="features: the encoder whose store to export")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="apply a trained fusion setting (or spots head) to new samples")
    p.add_argument("--cohort", required=True, help="the cohort the model was trained on")
    p.add_argument("--setting", required=True)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, help="spots: the seed whose checkpoint to use (default the first of spots.seeds)")
    p.add_argument("--on", required=True, help="the cohort of the new samples (its per-sample stages have run)")
    p.add_argument("--samples", nargs="*")
    p.add_argument("--out", help="default results/{on}/export/predict_{cohort}_{setting}_fold{k}/")
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--results", default="results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_cmd_predict)

    args = parser.parse_args(argv)
    setup_logging(None)
    try:
        rc = args.func(args)
    except MorphomolError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:  # a full disk or a file size limit: one line; anything else keeps its traceback
        from morphomol.smk import write_failure_message

        message = write_failure_message(exc, getattr(args, "out", None))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
