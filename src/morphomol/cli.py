"""The ``morphomol`` command: small entry points beside the Snakemake workflow.

    morphomol init DIR --name NAME [--patient-regex 'REGEX']   a cohort (sheet + YAML) from a folder of bundles
    morphomol doctor [--config config/config.yaml]             is this machine ready (torch/CUDA, weights, SLURM)
    morphomol check-config [--config config/config.yaml]       everything checkable before any job runs
    morphomol export spatialdata|qupath|explorer|features --cohort C [--samples S01,S02] [--out DIR]
    morphomol predict --cohort C --setting S --fold K --on NEW_COHORT [--samples S01,S02]
    morphomol simulate OUT_DIR --panel config/cohorts/demo/panel.yaml --patients 3 --samples-per-patient 2
    morphomol encoders | studies
    morphomol --version

Every verb that reads the pipeline's configuration takes it as ``--config`` (default
config/config.yaml). Lists (``--samples``, ``--genes``) are one comma-separated value or a
repeated option (``--samples S01,S02`` or ``--samples S01 --samples S02``): an option never takes
the words after it, so ``export --samples S01 explorer`` means the explorer export of S01.
Exports and predictions read a finished run's results (``--results``, default ``results``) and the
configuration that made them; run them from the workflow directory. ``morphomol VERB --help``
shows each option with its default.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from morphomol.errors import MorphomolError
from morphomol.util.logs import get_logger, setup_logging

log = get_logger("cli")

DEFAULT_CONFIG = "config/config.yaml"


def package_version() -> str:
    """The installed distribution's version (``importlib.metadata``), else ``morphomol.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("morphomol")
    except PackageNotFoundError:
        import morphomol

        return str(getattr(morphomol, "__version__", "unknown"))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help followed by its default, as argparse's ``ArgumentDefaultsHelpFormatter``
    does, except for switches, options without a default and help texts that already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (d is None or d is False or d is argparse.SUPPRESS or isinstance(action, argparse._VersionAction)
                or "default" in text.lower() or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)"


class ListOption(argparse.Action):
    """A list option that never takes the next words: one comma-separated value, or the option
    repeated (``--samples S01,S02`` == ``--samples S01 --samples S02``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        items = [v.strip() for v in str(values).split(",")]
        if not all(items):
            parser.error(f"argument {option_string}: {values!r} has an empty item (expected names separated by "
                         f"commas, e.g. {option_string} S01,S02)")
        setattr(namespace, self.dest, list(getattr(namespace, self.dest, None) or []) + items)


class Parser(argparse.ArgumentParser):
    """argparse with a hint when an old space-separated list (``--samples S01 S02``) left words over."""

    argv: list[str] = []  # the command line being parsed (set by main)

    def error(self, message: str) -> None:  # type: ignore[override]
        lists = any(a.split("=")[0] in ("--samples", "--genes") for a in self.argv)
        if lists and (message.startswith("unrecognized arguments") or "invalid choice" in message):
            message += ("\n(lists are comma-separated or repeated: --samples S01,S02 or --samples S01 --samples S02; "
                        "an option takes only the word after it)")
        super().error(message)


def _config_option(p: argparse.ArgumentParser, help: str = "the pipeline's config.yaml, the one the run used",
                   default: str | None = DEFAULT_CONFIG) -> None:
    p.add_argument("--config", default=default, metavar="CONFIG", help=help)


def _list_option(p: argparse.ArgumentParser, flag: str, help: str, metavar: str) -> None:
    p.add_argument(flag, action=ListOption, metavar=metavar,
                   help=f"{help}; comma-separated or repeated ({flag} {metavar} or "
                        + " ".join(f"{flag} {m}" for m in metavar.split(",")) + ")")


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
    from morphomol.errors import InputError

    config = args.config or args.config_file or DEFAULT_CONFIG
    if args.config_file is not None:
        if args.config is not None and args.config != args.config_file:
            raise InputError(f"two configs given: {args.config_file!r} and --config {args.config!r}",
                             field="--config", expected="one config file")
        log.warning("`morphomol check-config %s` is deprecated: use `morphomol check-config --config %s`",
                    args.config_file, args.config_file)
    import logging

    from morphomol.studies import NOOP_LOGGER, get_study

    noop = logging.getLogger(NOOP_LOGGER)
    was, noop.disabled = noop.disabled, True  # the studies' no-op warnings are printed in the summary below
    try:
        pc = load_config(config)
    finally:
        noop.disabled = was
    warnings: list[str] = []
    for name, c in pc.cohorts.items():
        line = (f"cohort {name} ({c.kind.name}; studies {', '.join(c.studies)}): {len(c.samples)} samples, "
                f"{c.samples['patient_id'].nunique()} patients")
        if c.panel is not None:
            line += f", panel {c.panel.mode}: {len(c.panel.core)} core / {len(c.panel.addon)} add-on genes"
        for study in c.studies:
            spec = get_study(study)
            if spec.summary is not None:
                s = spec.summary(c, workdir=pc.workdir)
                line += f"; {s.line}"
                warnings += s.warnings
        print(line)
    for w in warnings:
        print(f"WARNING: {w}")
    print("configuration OK" + (f" (with {len(warnings)} warning{'s' if len(warnings) > 1 else ''}: "
                                "a study will train nothing, or from random weights; see above)" if warnings else ""))


def _cmd_init(args: argparse.Namespace) -> None:
    from morphomol.tools.init import init_cohort

    out = init_cohort(args.dir, name=args.name, out_dir=args.out, relative_to=args.relative_to,
                      patient_regex=args.patient_regex, patients=args.patients, max_depth=args.max_depth,
                      overwrite=args.overwrite)
    _flush_logs()  # the summary comes after every log line of the scan
    for name, c in out["cohorts"].items():
        print(f"cohort {name} ({c['kind']}): {c['n']} samples -> {c['yaml']}, {c['samples']}")
        if c["todo"]:
            print(f"  {len(c['todo'])} TODO(s) to fill in (also the # TODO lines at the top of {c['samples']}):")
            for t in c["todo"]:
                print(f"    {t}")
        print(f"  next: add `{name}: {c['yaml']}` under `cohorts:` in {DEFAULT_CONFIG}, then `morphomol check-config`")
    sys.stdout.flush()


def _flush_logs() -> None:
    import logging

    for h in logging.getLogger("morphomol").handlers:
        h.flush()
    sys.stderr.flush()


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


def _cmd_export(args: argparse.Namespace) -> int:
    from morphomol.errors import InputError
    from morphomol.export.cohort import EXTENSIONS, REPORT, export_samples, summary
    from morphomol.export.sample import finished_sample

    pc, paths, samples = _samples(args)
    fss, not_run = [], []
    for s in samples:  # every sample checked before anything is written; all that have not run in one error
        try:
            fss.append(finished_sample(pc, args.cohort, s, paths))
        except InputError as exc:
            not_run.append(exc)
    if len(not_run) == 1:
        raise not_run[0]
    if not_run:
        raise InputError(f"{len(not_run)} samples cannot be exported: " + "; ".join(e.message for e in not_run))
    kind = args.what if args.what != "features" else f"features_{args.encoder}"

    def out_for(fs: object) -> Path:
        default = Path(paths.export(kind, args.cohort, fs.sample, EXTENSIONS[args.what]))  # type: ignore[attr-defined]
        return Path(args.out) / default.name if args.out else default

    report_dir = Path(args.out) if args.out else Path(paths.export(kind, args.cohort, "x")).parent
    qv_min = None if getattr(args, "all_transcripts", False) else pc.cohorts[args.cohort].cfg.io.qv_min
    done = export_samples(args.what, fss, out_for, report_dir=report_dir, echo=print, he_level=args.he_level,
                          transcripts=not args.no_transcripts, qv_min=qv_min, genes=args.genes or (),
                          tissue=not args.no_tissue, encoder=args.encoder)
    print(summary(args.what, done, report_dir / REPORT))
    if not any(d.status == "written" for d in done):
        print(f"error: nothing exported: every sample was skipped (reasons in {report_dir / REPORT})", file=sys.stderr)
        return 1
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The ``morphomol`` argument parser (every option with a help text; defaults shown by ``--help``)."""
    parser = Parser(prog="morphomol", description=(__doc__ or "").replace("``", ""), formatter_class=HelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the morphomol version and exit")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=textwrap.fill(help, 100), formatter_class=HelpFormatter)

    p = verb("simulate", "write a simulated paired Xenium + H&E cohort in real file formats")
    p.add_argument("out_dir", help="folder to write the cohort into (a folder per sample and samples.tsv)")
    p.add_argument("--panel", required=True, help="panel YAML with core/addon gene lists (required)")
    p.add_argument("--patients", type=int, default=3, metavar="N", help="how many patients to simulate")
    p.add_argument("--samples-per-patient", type=int, default=2, metavar="N", help="samples of each patient")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same cohort")
    p.add_argument("--params", help="YAML of extra simulate_sample parameters (tissue_um, he_mpp, ...)")
    p.set_defaults(func=_cmd_simulate)

    p = verb("encoders", "list the encoder registry (and the weights a config names)")
    _config_option(p, "a config.yaml whose encoders section (weights) to show; default: the registry only",
                   default=None)
    p.set_defaults(func=_cmd_encoders)

    p = verb("studies", "list the studies and cohort kinds")
    p.set_defaults(func=_cmd_studies)

    p = verb("check-config", "validate the config, cohorts, sample sheets, panels and settings "
                             "(everything checkable before any job runs)")
    _config_option(p, f"the pipeline's config.yaml (default: {DEFAULT_CONFIG})", default=None)
    p.add_argument("config_file", nargs="?", metavar="CONFIG",
                   help="deprecated, the same as --config CONFIG (kept for old scripts)")
    p.set_defaults(func=_cmd_check_config)

    p = verb("init", "a sample sheet and cohort YAML from a folder of Xenium bundles / Space Ranger outs")
    p.add_argument("dir", help="folder to scan for Xenium bundles (experiment.xenium) and Space Ranger outs/")
    p.add_argument("--name", required=True, help="cohort name (config/cohorts/NAME.yaml, NAME/samples.tsv; required)")
    p.add_argument("--out", default="config/cohorts", metavar="DIR", help="where the cohort files go")
    p.add_argument("--relative-to", default=".", metavar="DIR",
                   help="paths in the sheet are written relative to this folder, the workflow directory")
    p.add_argument("--patient-regex", metavar="REGEX",
                   help="regex whose first group is the patient id (searched in run name, region name and path), "
                        "e.g. 'P(\\d+)'; default: patient_id left empty under a # TODO line")
    p.add_argument("--patients", metavar="TABLE",
                   help="TSV/CSV with columns sample_id, patient_id: each sample's patient (wins over "
                        "--patient-regex for the samples it lists)")
    p.add_argument("--max-depth", type=int, default=4, metavar="N",
                   help="how many folder levels below DIR to search for bundles")
    p.add_argument("--overwrite", action="store_true",
                   help="replace cohort files that exist (without it, an existing file stops init)")
    p.set_defaults(func=_cmd_init)

    p = verb("doctor", "check Python, torch/CUDA, OpenSlide, weights, sbatch and the SLURM partitions")
    _config_option(p, "the pipeline's config.yaml, whose cohorts and encoder weights are checked")
    p.add_argument("--profile", default="profiles/slurm", metavar="DIR",
                   help="Snakemake profile whose SLURM partitions are checked against sinfo")
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 of the weight files")
    p.set_defaults(func=_cmd_doctor)

    p = verb("export", "a finished sample in a field format: spatialdata | qupath | explorer | features")
    p.add_argument("what", choices=["spatialdata", "qupath", "explorer", "features"],
                   help="spatialdata: SpatialData zarr; qupath: GeoJSON; explorer: Xenium Explorer alignment CSV; "
                        "features: h5 of an encoder's tile features")
    p.add_argument("--cohort", required=True, help="the cohort whose samples to export (required)")
    _list_option(p, "--samples", "sample ids to export (default: every sample of the cohort)", "S01,S02")
    p.add_argument("--out", metavar="DIR", help="output directory (default: results/{cohort}/export/{what}/)")
    _config_option(p)
    p.add_argument("--results", default="results", metavar="DIR", help="the results directory of the finished run")
    p.add_argument("--he-level", type=int, default=0, metavar="N", help="spatialdata: the H&E pyramid level to export")
    p.add_argument("--no-transcripts", action="store_true", help="spatialdata: leave the transcripts out")
    p.add_argument("--all-transcripts", action="store_true",
                   help="spatialdata: keep the transcripts below the pipeline's io.qv_min too (default: only qv >= qv_min)")
    _list_option(p, "--genes", "qupath: raw counts of these genes as measurements (default: none)", "G1,G2")
    p.add_argument("--no-tissue", action="store_true", help="qupath: no tissue contours")
    p.add_argument("--encoder", default="vit_s", help="features: the encoder whose store to export")
    p.set_defaults(func=_cmd_export)

    p = verb("predict", "apply a trained fusion setting (or spots head) to new samples")
    p.add_argument("--cohort", required=True, help="the cohort the model was trained on (required)")
    p.add_argument("--setting", required=True, help="the trained setting whose checkpoint to apply (required)")
    p.add_argument("--fold", type=int, default=0, metavar="K", help="the fold whose checkpoint to apply (0 .. n_folds-1)")
    p.add_argument("--seed", type=int,
                   help="spots: the seed whose checkpoint to use (default: the first of spots.seeds)")
    p.add_argument("--on", required=True, metavar="COHORT",
                   help="the cohort of the new samples (its per-sample stages have run; required)")
    _list_option(p, "--samples", "sample ids of --on to predict (default: every sample of that cohort)", "S01,S02")
    p.add_argument("--out", metavar="DIR", help="output directory (default: results/{on}/export/predict_{cohort}_{setting}_fold{k}/)")
    _config_option(p)
    p.add_argument("--results", default="results", metavar="DIR", help="the results directory of the finished run")
    p.add_argument("--device", default="cpu", help="torch device to run the model on: cpu, cuda, cuda:1, mps ...")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="fusion: tiles per forward pass")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
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
