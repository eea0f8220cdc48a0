"""The ``morphomol`` command: small entry points beside the Snakemake workflow.

    morphomol simulate OUT_DIR --panel config/cohorts/demo/panel.yaml --patients 3 --samples-per-patient 2
    morphomol encoders
    morphomol studies
    morphomol check-config [config/config.yaml]
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

    args = parser.parse_args(argv)
    setup_logging(None)
    try:
        args.func(args)
    except MorphomolError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
