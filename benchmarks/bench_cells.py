"""Throughput of the cells study's LLM: training examples/s and tokens/s, evaluation cells/s in both decoding
modes (constrained scoring of every label; free generation), peak GPU memory on CUDA.

    python benchmarks/bench_cells.py                       # tiny Gemma-3 on CPU (LoRA), toy fold
    python benchmarks/bench_cells.py --threads 2 --steps 60
    python benchmarks/bench_cells.py --cohort-dir results/demo_cells   # the demo's fold 0, base model, patches
    python benchmarks/bench_cells.py --medgemma-geometry   # GPU: MedGemma-4b-it geometry (Gemma3Config defaults:
                                                           # 34-layer 2560-d text model, SigLIP-400M at 896 px, 256
                                                           # image tokens), random weights written once to --model-dir,
                                                           # QLoRA 4-bit NF4; add --gpus N for torchrun data parallel

The MedGemma-geometry model has MedGemma-4b-it's shapes (what costs time and memory) but random weights and a
word-level vocabulary of the toy fold (vocabulary size 262,208 kept): throughput and memory, not accuracy.
Nothing is downloaded. Figures are printed as JSON lines; nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from morphomol.config import default_sections
from morphomol.studies.cells.config import TinyModelConfig
from morphomol.studies.cells.evaluate import EvalInputs, evaluate_fold
from morphomol.studies.cells.launch import train_job
from morphomol.studies.cells.trainer import TrainInputs, TrainOutputs, train_fold
from morphomol.synthetic.cells_fixtures import toy_fold, toy_model
from morphomol.train.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "config" / "experiments" / "cells.yaml"
TASKS = {"gene_to_type": [[0, 1.0]], "type_to_genes": [[0, 0.5]], "image_to_genes": [[0, 0.25]],
         "image_to_type": [[0, 0.5]], "image_genes_to_type": [[0, 0.5]]}


def medgemma_geometry(out: Path, words: list[str]) -> Path:
    """MedGemma-4b-it shapes (Gemma3Config defaults) with random weights, saved once (safetensors)."""
    from morphomol.synthetic.cells_model import build_tiny_gemma3

    if (out / "config.json").exists():
        return out
    cfg = TinyModelConfig(hidden_size=2560, layers=34, heads=8, kv_heads=4, head_dim=256, intermediate_size=10240,
                          vision_hidden_size=1152, vision_layers=27, vision_heads=16, vision_intermediate_size=4304,
                          image_size=896, patch_size=14,
                          mm_tokens=256)
    padded = list(words) + [f"<unused{i}>" for i in range(262_208 - len(words))]
    return build_tiny_gemma3(out, padded, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-per-class", type=int, default=60)
    ap.add_argument("--n-genes", type=int, default=24)
    ap.add_argument("--medgemma-geometry", action="store_true")
    ap.add_argument("--model-dir", default=None, help="where the MedGemma-geometry model is written / reused")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--cohort-dir", default=None, help="results/{cohort} of a finished cells demo (fold 0)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        fold = toy_fold(d / "fold", n_per_class=args.n_per_class, n_genes=args.n_genes, image_px=64)
        if args.cohort_dir:
            c = Path(args.cohort_dir)
            fold = {"table": c / "cells/folds/fold0.parquet", "meta": c / "cells/folds/fold0.json",
                    "label_map": ROOT / "config/cohorts/demo_cells/labels.yaml", "genes": fold["genes"],
                    "images": {p.parent.name: p for p in sorted(c.glob("samples/*/images.zarr"))}}
            model = c / "cells/base_model"
        elif args.medgemma_geometry:
            if not gpu:
                print(json.dumps({"benchmark": "cells QLoRA MedGemma-4b geometry", "status": "not run: no CUDA device"}))
                return
            from morphomol.synthetic.cells_model import vocabulary

            words = vocabulary(genes=fold["genes"], label_words=["B", "T", "cell", "Fibroblast"], template_texts=[
                TEMPLATES.read_text()], organism="Homo sapiens", max_number=args.n_genes)
            model = medgemma_geometry(Path(args.model_dir or d / "medgemma_geometry"), words)
        else:
            model = toy_model(d / "model", fold["genes"], TEMPLATES, n_genes=args.n_genes)
        train = {"steps": args.steps, "batch_size": args.batch_size, "lr": 2e-4 if args.medgemma_geometry else 3e-3,
                 "gradient_checkpointing": args.medgemma_geometry, "log_every": 10, "val_every": 10**6,
                 "save_every": 10**6, "gpus": args.gpus, "max_length": 2048}
        cfg = default_sections(cells={"tasks": TASKS, "model": {"tiny": {}}, "n_genes": args.n_genes, "train": train,
                                      "eval": {"batch_size": args.batch_size, "max_new_tokens": 6,
                                               "max_cells": 64}}).cells
        if args.medgemma_geometry:
            cfg = dataclasses.replace(cfg, quantization="4bit")
        inputs = TrainInputs(fold["table"], fold["meta"], model, TEMPLATES, dict(fold["images"]))
        out = TrainOutputs(d / "run/adapter", d / "run/train_metrics.json", d / "run/train_log.csv")
        t0 = time.perf_counter()
        if args.gpus > 1:
            train_job(inputs, out, cfg=cfg, seed=0, threads=args.threads, world=args.gpus)
            m = json.loads(out.metrics.read_text())
        else:
            m = train_fold(inputs, out, cfg=cfg, runtime=Runtime(seed=0, threads=args.threads))
        rec = {"benchmark": "cells train", "model": "MedGemma-4b geometry (random)" if args.medgemma_geometry else "tiny",
               "device": m["device"], "processes": m["world"], "quantization": m["quantization"], "steps": m["steps"],
               "batch_size": args.batch_size, "examples_per_second": round(m["examples_per_second"], 2),
               "tokens_per_second": round(m["tokens_per_second"], 1), "wall_seconds": round(time.perf_counter() - t0, 1),
               "threads": args.threads, "trainable_parameters": m["trainable_parameters"]}
        if "peak_gpu_memory_gb" in m:
            rec["peak_gpu_memory_gb"] = round(m["peak_gpu_memory_gb"], 2)
        print(json.dumps(rec))
        ei = EvalInputs(fold["table"], fold["meta"], model, TEMPLATES, fold["label_map"], out.adapter, dict(fold["images"]))
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        em = evaluate_fold(ei, d / "p.parquet", d / "m.json", cfg=cfg, runtime=Runtime(seed=0, threads=args.threads),
                           model_name="llm")
        rec = {"benchmark": "cells evaluate", "labels": len(em["labels"]),
               "cells_per_second": {k: round(v, 2) for k, v in em["cells_per_second"].items()}}
        if gpu:
            rec["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        print(json.dumps(rec))


if __name__ == "__main__":
    main()
