"""Multi-task LoRA / QLoRA fine-tuning of the base model on one fold, resumable after preemption.

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` examples drawn by the task-ratio sampler
(:class:`~morphomol.studies.cells.examples.TaskSampler`); loss = mean cross-entropy over response tokens
(prompt, image and padding masked); AdamW (lr, weight decay) on the trainable LoRA / modules_to_save
parameters, linear warm-up over ``warmup_ratio`` of the steps then cosine (``morphomol.train.loop``),
gradient-norm clipping. With ``world > 1`` (torchrun, :mod:`.launch`) every process draws its own examples
(``rank`` in the sampler's seed) and gradients are averaged with ``all_reduce`` (gloo / NCCL): data
parallel, identical weights on every process.

Logged per step (``train_log.csv``): learning rate, loss, loss and example count per task, the schedule's
task weights; every ``val_every`` steps: the validation loss per task on fixed validation examples.

Preemption (:mod:`morphomol.train.resume`): SIGTERM / SIGUSR1 set a flag; at the next step boundary the
trainable tensors, optimizer, step, logs and RNG state go to ``resume.pt`` (also every ``save_every``
steps) and the job exits 143. A rerun resumes only onto the same fingerprint (config, fold, base model,
templates, every declared input's stat digest) and, on CPU, ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from morphomol.studies.cells.base_model import add_lora, load_base, load_processor, load_trainable_state, trainable_state
from morphomol.studies.cells.config import TASKS, CellsConfig
from morphomol.studies.cells.examples import (
    FoldExamples,
    PatchSource,
    TaskSampler,
    assemble,
    encode_prompts,
    token_losses,
    tokenize_responses,
    validation_set,
)
from morphomol.studies.cells.folds import FoldSentences, read_fold
from morphomol.studies.cells.prompts import load_templates
from morphomol.train.loop import learning_rate
from morphomol.train.resume import (
    RESUME_NAME,
    Preempted,
    StopFlag,
    fingerprint,
    load_resume,
    rng_state,
    save_resume,
    set_rng_state,
)
from morphomol.train.runtime import Runtime, run_context
from morphomol.util.atomic import atomic_path
from morphomol.util.hashing import sha256_path
from morphomol.util.jsonio import write_json
from morphomol.util.logs import get_logger

log = get_logger("cells.train")


@dataclass
class TrainInputs:
    """What a training job reads (every path a declared rule input)."""

    fold_table: Path
    fold_meta: Path
    base_model: Path
    templates: Path
    image_stores: dict[str, Path] = field(default_factory=dict)


@dataclass
class TrainOutputs:
    adapter: Path       # directory: adapter_model.safetensors, adapter_config.json, cells_model.json
    metrics: Path       # train_metrics.json
    log_csv: Path       # train_log.csv (one row per step)

    @property
    def work_dir(self) -> Path:
        return self.metrics.parent


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    examples: int = 0
    tokens: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _forward_losses(model: Any, batch: dict[str, Any], device: torch.device, pixel_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")}
    if "pixel_values" in batch:
        kw["pixel_values"] = batch["pixel_values"].to(device, dtype=pixel_dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(**kw, use_cache=False)
    return token_losses(out.logits, batch["labels"].to(device))


class _Batcher:
    """Examples -> encoded batch tensors (processor + responses)."""

    def __init__(self, processor: Any, chat: Any, fx: FoldExamples, max_length: int) -> None:
        self.processor, self.chat, self.fx, self.max_length = processor, chat, fx, max_length

    def __call__(self, draws: list[tuple[str, int, int]]) -> tuple[dict[str, Any], list[str]]:
        exs = [self.fx.example(row, task, tpl) for task, row, tpl in draws]
        p = encode_prompts(self.processor, self.chat, exs)
        resp = tokenize_responses(self.processor.tokenizer, self.chat, [e.response for e in exs])
        return assemble(p, list(range(len(exs))), resp, pad_id=self.chat.pad_id, max_length=self.max_length), \
            [e.task for e in exs]


@torch.no_grad()
def _validate(model: Any, batcher: _Batcher, draws: list[tuple[str, int, int]], bs: int, device: torch.device,
              pixel_dtype: torch.dtype) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(draws), bs):
        batch, tasks = batcher(draws[i:i + bs])
        s, c = _forward_losses(model, batch, device, pixel_dtype)
        for t, si, ci in zip(tasks, s.tolist(), c.tolist(), strict=True):
            sums[t] = sums.get(t, 0.0) + si
            counts[t] = counts.get(t, 0) + int(ci)
    model.train()
    return {t: sums[t] / max(counts[t], 1) for t in sums}


def train_fold(inputs: TrainInputs, outputs: TrainOutputs, *, cfg: CellsConfig, runtime: Runtime, rank: int = 0,
               world: int = 1, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fine-tune LoRA adapters on one fold; writes the adapter, metrics and step log (rank 0)."""
    t_cfg = cfg.train
    with run_context(runtime) as device:
        if world > 1 and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        table, meta = read_fold(inputs.fold_table, inputs.fold_meta, columns=["n_sentence_genes"])
        sentences = FoldSentences(inputs.fold_table)  # read by row group on demand, not the cohort's text at once
        processor, chat = load_processor(inputs.base_model)
        sampler = TaskSampler(table, cfg.tasks, {}, seed=runtime.seed, steps=t_cfg.steps)
        templates = load_templates(inputs.templates, sampler.tasks)
        sampler.n_templates = {t: len(v) for t, v in templates.items()}
        patches = PatchSource(inputs.image_stores) if inputs.image_stores else None
        fx = FoldExamples(table, templates, organism=cfg.organism, image_placeholder=chat.image, patches=patches,
                          sentences=sentences)
        batcher = _Batcher(processor, chat, fx, t_cfg.max_length)
        val_draws = validation_set(table, sampler.tasks, t_cfg.val_examples, runtime.seed)
        if not val_draws:  # splits.validation none (one training donor with one sample): nothing to monitor
            log.info("fold %s: no validation cells (validation %s): %d fixed steps, no validation losses", meta["fold"],
                     meta.get("validation", "none"), t_cfg.steps)

        model, quant = load_base(inputs.base_model, cfg, device)
        model = add_lora(model, cfg, quant)
        model.train()
        pixel_dtype = next(p for n, p in model.named_parameters() if "vision_tower" in n).dtype
        if pixel_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            pixel_dtype = torch.bfloat16
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
        warmup = int(math.ceil(t_cfg.warmup_ratio * t_cfg.steps))
        fp = fingerprint(cells={k: v for k, v in asdict(cfg).items() if k not in ("eval", "baselines")},
                         seed=runtime.seed, world=world, labels=meta["labels"], hvg=meta["hvg"],
                         inputs={"fold_table": inputs.fold_table, "fold_meta": inputs.fold_meta,
                                 "base_model": inputs.base_model, "templates": inputs.templates,
                                 **{f"images:{s}": p for s, p in inputs.image_stores.items()}})
        resume_path = outputs.work_dir / RESUME_NAME
        st = TrainState()
        ckpt = load_resume(resume_path, fp)
        if ckpt is not None:
            load_trainable_state(model, ckpt["trainable"])
            opt.load_state_dict(ckpt["optimizer"])
            st = TrainState(**ckpt["state"])
            set_rng_state(ckpt["rng"])
            log.info("resumed from %s at step %d", resume_path, st.step)
        resumed = ckpt is not None

        def save() -> None:
            if rank == 0:
                save_resume(resume_path, {"fingerprint": dict(fp), "trainable": trainable_state(model),
                                          "optimizer": opt.state_dict(), "state": asdict(st), "rng": rng_state()})

        log.info("fold %s: %d fit cells (%d with an H&E patch), tasks %s, %d steps x %d examples x %d accumulation x "
                 "%d process(es) on %s", meta["fold"], len(sampler.rows), len(sampler.image_rows), sampler.tasks,
                 t_cfg.steps, t_cfg.batch_size, t_cfg.grad_accum, world, device)
        with StopFlag() as stop:
            while st.step < t_cfg.steps:
                t0 = time.perf_counter()
                lr = learning_rate(st.step, t_cfg.lr, 0.0, warmup, t_cfg.steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                stats = torch.zeros(2 * len(TASKS) + 2, dtype=torch.float64)  # per-task sums/counts, examples, tokens
                for micro in range(t_cfg.grad_accum):
                    batch, tasks = batcher(sampler.draw(st.step, t_cfg.batch_size, rank=rank, micro=micro))
                    sums, counts = _forward_losses(model, batch, device, pixel_dtype)
                    if t_cfg.loss_average == "example":  # every example counts the same, whatever its length
                        loss = (sums / counts.clamp(min=1)).mean() / t_cfg.grad_accum
                    else:  # every response token counts the same (long gene lists dominate)
                        loss = sums.sum() / counts.sum().clamp(min=1) / t_cfg.grad_accum
                    loss.backward()
                    for t, s, c in zip(tasks, sums.detach().tolist(), counts.tolist(), strict=True):
                        j = TASKS.index(t)
                        stats[2 * j] += s
                        stats[2 * j + 1] += c
                    stats[-2] += len(tasks)
                    stats[-1] += int(batch["attention_mask"].sum())
                if world > 1:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        _all_reduce(p.grad, world).div_(world)
                    _all_reduce(stats, world)
                if t_cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, t_cfg.max_grad_norm)
                opt.step()
                st.step += 1
                dt = time.perf_counter() - t0
                st.seconds += dt
                st.examples += int(stats[-2])
                st.tokens += int(stats[-1])
                tot_s = float(sum(stats[2 * j] for j in range(len(TASKS))))
                tot_c = float(sum(stats[2 * j + 1] for j in range(len(TASKS))))
                rec: dict[str, Any] = {"step": st.step, "lr": lr, "loss": tot_s / max(tot_c, 1.0), "seconds": dt}
                for j, t in enumerate(TASKS):
                    c = float(stats[2 * j + 1])
                    rec[f"loss_{t}"] = float(stats[2 * j]) / c if c else math.nan
                for t, w in sampler.weights(st.step - 1).items():
                    rec[f"weight_{t}"] = w
                st.log.append(rec)
                if st.step % t_cfg.log_every == 0 or st.step == 1:
                    log.info("step %d/%d loss %.4f lr %.2e | %s | %.1f examples/s", st.step, t_cfg.steps, rec["loss"],
                             lr, " ".join(f"{t}={rec[f'loss_{t}']:.3f}" for t in sampler.tasks
                                         if not math.isnan(rec[f"loss_{t}"])), stats[-2] / max(dt, 1e-9))
                if val_draws and (st.step % t_cfg.val_every == 0 or st.step == t_cfg.steps):
                    v = _validate(model, batcher, val_draws, t_cfg.batch_size, device, pixel_dtype)
                    st.val.append({"step": st.step, **{f"val_loss_{t}": x for t, x in v.items()}})
                    log.info("step %d validation loss %s", st.step, {t: round(x, 4) for t, x in v.items()})
                if on_step is not None:
                    on_step(st.step)
                flag = _all_reduce(torch.tensor([float(stop.requested)]), world)
                if float(flag[0]) > 0:
                    save()
                    log.warning("signal received: saved %s at step %d; exiting for a later resume", resume_path, st.step)
                    raise Preempted(resume_path)
                if st.step % t_cfg.save_every == 0 and st.step < t_cfg.steps:
                    save()
        metrics = {"fold": meta["fold"], "steps": st.step, "quantization": quant, "device": str(device), "world": world,
                   "resumed": resumed, "tasks": sampler.tasks, "train_seconds": st.seconds,
                   "examples_per_second": st.examples / max(st.seconds, 1e-9),
                   "tokens_per_second": st.tokens / max(st.seconds, 1e-9), "examples": st.examples, "tokens": st.tokens,
                   "trainable_parameters": int(sum(p.numel() for p in params)),
                   "final_loss": float(np.nanmean([r["loss"] for r in st.log[-max(1, t_cfg.log_every):]])),
                   "validation": st.val, "validation_policy": meta.get("validation"),
                   "n_fit": len(sampler.rows), "n_fit_images": len(sampler.image_rows)}
        if device.type == "cuda":
            metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if rank == 0:
            _write_outputs(model, outputs, inputs, cfg, meta, metrics, st, quant)
            (outputs.work_dir / RESUME_NAME).unlink(missing_ok=True)
        return metrics


def _write_outputs(model: Any, outputs: TrainOutputs, inputs: TrainInputs, cfg: CellsConfig, meta: Mapping[str, Any],
                   metrics: dict[str, Any], st: TrainState, quant: str) -> None:
    with atomic_path(outputs.adapter) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        write_json(tmp / "cells_model.json", {
            "base_model": str(inputs.base_model),
            "base_model_config_sha256": sha256_path(Path(inputs.base_model) / "config.json"),
            "processor": str(inputs.base_model), "quantization": quant, "hvg": meta["hvg"], "labels": meta["labels"],
            "fit_labels": meta["fit_labels"], "values": meta["values"], "n_genes": meta["n_genes"],
            "organism": cfg.organism, "templates": str(inputs.templates), "tasks": metrics["tasks"],
            "label_map": cfg.label_map,
            "lora": asdict(cfg.lora), "fold": meta["fold"]})
    with atomic_path(outputs.log_csv) as tmp:
        pd.DataFrame(st.log).to_csv(tmp, index=False)
    write_json(outputs.metrics, metrics)
    log.info("adapter written to %s (%d steps, %.1f examples/s, %.0f tokens/s)", outputs.adapter, metrics["steps"],
             metrics["examples_per_second"], metrics["tokens_per_second"])
