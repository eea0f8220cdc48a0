"""The ``morphomol`` command: small entry points beside the Snakemake workflow.

    morphomol simulate OUT_DIR --panel config/cohorts/demo/panel.yaml --patients 3 --samples-per-patient 2
    morphomol encoders
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
    from morphomol.simulate import simulate_cohort

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

    print(list_encoders_table())


def _cmd_check_config(args: argparse.Namespace) -> None:
    from morphomol.config import load_cohorts, load_settings, read_yaml, setting_status

    config = read_yaml(args.config, "config")
    schema_dir = Path(args.schemas)
    cohorts = load_cohorts(config, schema_dir, config_file=args.config)
    settings = load_settings(config["experiments"]["settings_file"])
    for name, c in cohorts.items():
        runnable = [s for s in settings if setting_status(settings[s], c.config.get("encoders")) is None]
        print(f"cohort {name}: {len(c.samples)} samples, {c.samples['patient_id'].nunique()} patients, "
              f"panel {len(c.panel['core'])} core / {len(c.panel['addon'])} add-on genes, "
              f"{len(runnable)}/{len(settings)} settings runnable")


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

    p = sub.add_parser("encoders", help="list the encoder registry")
    p.set_defaults(func=_cmd_encoders)

    p = sub.add_parser("check-config", help="validate the config, cohorts, sample sheets and panels")
    p.add_argument("config", nargs="?", default="config/config.yaml")
    p.add_argument("--schemas", default="workflow/schemas")
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
