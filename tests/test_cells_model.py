"""The cells study's LLM on a tiny Gemma-3 built locally (transformers + peft, CPU): processor and special
tokens, token_type_ids and response-only labels, LoRA training that learns and saves safetensors adapters,
resume after SIGTERM (bit-identical on CPU), both decoding modes (tuned vs untuned), the predict path,
data-parallel training through torchrun (gloo), and the 4-bit QLoRA path (GPU only)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from morphomol.config import default_sections
from morphomol.errors import InputError
from morphomol.studies.cells.base_model import load_processor
from morphomol.studies.cells.evaluate import EvalInputs, evaluate_fold
from morphomol.studies.cells.examples import IGNORE, FoldExamples, PatchSource, assemble, encode_prompts, tokenize_responses
from morphomol.studies.cells.prompts import load_templates
from morphomol.studies.cells.trainer import TrainInputs, TrainOutputs, train_fold
from morphomol.synthetic.cells_fixtures import TOY_CLASSES, toy_fold, toy_model
from morphomol.train.resume import RESUME_NAME, Preempted
from morphomol.train.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "config" / "experiments" / "cells.yaml"
TASKS = {"gene_to_type": [[0, 1.0]], "type_to_genes": [[0, 0.3]], "image_to_genes": [[0, 0.0]],
         "image_to_type": [[0, 0.3]], "image_genes_to_type": [[0, 0.0]]}


def cfg(**train):
    base = {"steps": 40, "batch_size": 8, "lr": 6e-3, "gradient_checkpointing": False, "log_every": 10, "val_every": 20,
            "val_examples": 8, "save_every": 10}
    return default_sections(cells={"tasks": TASKS, "model": {"tiny": {}}, "n_genes": 8,
                                   "train": {**base, **train}, "eval": {"batch_size": 16, "max_new_tokens": 5}}).cells


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("cells_toy")
    f = toy_fold(d / "fold")
    f["model"] = toy_model(d / "model", f["genes"], TEMPLATES)
    f["dir"] = d
    return f


def inputs(toy):
    return TrainInputs(fold_table=toy["table"], fold_meta=toy["meta"], base_model=toy["model"], templates=TEMPLATES,
                       image_stores=dict(toy["images"]))


def outputs(d):
    d = Path(d)
    return TrainOutputs(adapter=d / "adapter", metrics=d / "train_metrics.json", log_csv=d / "train_log.csv")


@pytest.fixture(scope="module")
def trained(toy):
    out = outputs(toy["dir"] / "run")
    m = train_fold(inputs(toy), out, cfg=cfg(), runtime=Runtime(seed=0, threads=1))
    return out, m


# ------------------------------------------------------------------------------ processor, encoding
def test_encoding_emits_token_types_and_masks_everything_but_the_response(toy):
    proc, chat = load_processor(toy["model"])
    table = pd.read_parquet(toy["table"])
    fx = FoldExamples(table, load_templates(TEMPLATES), organism="Homo sapiens", image_placeholder=chat.image,
                      patches=PatchSource(toy["images"]))
    exs = [fx.example(0, "image_to_type"), fx.example(1, "gene_to_type")]
    p = encode_prompts(proc, chat, exs)
    resp = tokenize_responses(proc.tokenizer, chat, [e.response for e in exs])
    b = assemble(p, [0, 1], resp, pad_id=chat.pad_id, max_length=512)
    ids, tt, lab, att = b["input_ids"], b["token_type_ids"], b["labels"], b["attention_mask"]
    image_pos = ids == chat.image_token_id
    assert torch.equal(tt.bool(), image_pos)  # 1 exactly on the image tokens
    assert int(image_pos[0].sum()) == 4 and int(image_pos[1].sum()) == 0  # mm_tokens of the tiny model
    assert b["pixel_values"].shape == (1, 3, 32, 32)
    for i, r in enumerate(resp):
        n = int(att[i].sum())
        assert lab[i, n - len(r):n].tolist() == r and r[-1] == chat.end_of_turn_id
        assert (lab[i, : n - len(r)] == IGNORE).all() and (lab[i, n:] == IGNORE).all()  # prompt, image, padding
    assert proc.tokenizer.decode(resp[1][:-1]) == exs[1].label
    unk = proc.tokenizer.unk_token_id
    assert not (ids[att.bool()] == unk).any()  # the word-level vocabulary covers the prompts
    left = assemble(p, [0, 1], None, pad_id=chat.pad_id, max_length=512, left=True)
    short = int(np.argmin([len(x) for x in p.ids]))
    assert (left["attention_mask"][:, -1] == 1).all() and left["input_ids"][short, 0] == chat.pad_id
    with pytest.raises(InputError, match="max_length"):
        assemble(p, [0], None, pad_id=chat.pad_id, max_length=5)
    no_img = FoldExamples(table.assign(has_image=False), load_templates(TEMPLATES), organism="Homo sapiens",
                          image_placeholder=chat.image, patches=None)
    with pytest.raises(InputError, match="without an H&E patch"):
        no_img.example(0, "image_genes_to_type")


def test_tokenizer_without_turn_tokens_is_an_error(toy, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoProcessor, Gemma3Processor, PreTrainedTokenizerFast

    d = tmp_path / "model"
    shutil.copytree(toy["model"], d)
    proc = AutoProcessor.from_pretrained(d)
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>",
                                         "<image_soft_token>", "user", "model"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"boi_token": "<start_of_image>",
                                                                           "eoi_token": "<end_of_image>",
                                                                           "image_token": "<image_soft_token>"})
    Gemma3Processor(image_processor=proc.image_processor, tokenizer=tok, image_seq_length=4).save_pretrained(d)
    with pytest.raises(InputError) as e:
        load_processor(d)
    assert "<start_of_turn>" in e.value.message and "<end_of_turn>" in e.value.message and str(d) in e.value.message


# ------------------------------------------------------------------------------ training
def test_lora_training_learns_and_saves_a_safetensors_adapter(trained):
    out, m = trained
    files = sorted(p.name for p in out.adapter.iterdir())
    assert {"adapter_model.safetensors", "adapter_config.json", "cells_model.json"} <= set(files)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    state = load_file(out.adapter / "adapter_model.safetensors")
    assert state and all("lora_" in k or "embed_tokens" in k or "lm_head" in k for k in state)
    assert any("vision_tower" in k for k in state)  # all linear layers, the vision tower's too
    log = pd.read_csv(out.log_csv)
    assert len(log) == 40 and {"weight_gene_to_type", "loss_gene_to_type", "loss_image_to_type"} <= set(log.columns)
    assert log["weight_gene_to_type"].iloc[0] == pytest.approx(1 / 1.6)
    assert log["loss_gene_to_type"].iloc[-10:].mean() < 0.5 * log["loss_gene_to_type"].iloc[:3].mean()
    assert m["steps"] == 40 and m["quantization"] == "none" and not m["resumed"] and m["validation"]
    assert not (out.work_dir / RESUME_NAME).exists()


def test_resume_after_sigterm_is_bit_identical(toy, trained, tmp_path):
    ref, _ = trained
    out = outputs(tmp_path / "run")

    def kill_at_17(step):
        if step == 17:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted) as exc:
        train_fold(inputs(toy), out, cfg=cfg(), runtime=Runtime(seed=0, threads=1), on_step=kill_at_17)
    assert exc.value.code == 143 and (out.work_dir / RESUME_NAME).exists() and not out.adapter.exists()
    ckpt = torch.load(out.work_dir / RESUME_NAME, weights_only=True)  # no arbitrary unpickling
    assert ckpt["state"]["step"] == 17
    m = train_fold(inputs(toy), out, cfg=cfg(), runtime=Runtime(seed=0, threads=1))
    assert m["resumed"]
    a, b = load_file(ref.adapter / "adapter_model.safetensors"), load_file(out.adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(out.log_csv).equals(pd.read_csv(ref.log_csv).assign(seconds=pd.read_csv(out.log_csv)["seconds"]))


def test_resume_state_of_another_configuration_is_ignored(toy, tmp_path, caplog):
    out = outputs(tmp_path / "run")
    with pytest.raises(Preempted):
        train_fold(inputs(toy), out, cfg=cfg(steps=12), runtime=Runtime(seed=0, threads=1),
                   on_step=lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 5 else None)
    m = train_fold(inputs(toy), out, cfg=cfg(steps=12, lr=1e-3), runtime=Runtime(seed=0, threads=1))
    assert not m["resumed"] and m["steps"] == 12
    assert any("belongs to a different run" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ evaluation, prediction
def test_tuned_beats_untuned_in_both_decoding_modes(toy, trained, tmp_path):
    out, _ = trained
    res = {}
    for name, adapter in (("llm", out.adapter), ("untuned", None)):
        ei = EvalInputs(toy["table"], toy["meta"], toy["model"], TEMPLATES, toy["label_map"], adapter, dict(toy["images"]))
        m = evaluate_fold(ei, tmp_path / f"{name}.parquet", tmp_path / f"{name}.json", cfg=cfg(),
                          runtime=Runtime(seed=0, threads=1), model_name=name)
        res[name] = {(r["task"], r["mode"]): r for r in m["results"] if r["partition"] == "test" and r["subset"] == "all"}
        assert set(m["cells_per_second"]) == {"generate", "score"}
    for mode in ("score", "generate"):
        assert res["llm"][("gene_to_type", mode)]["accuracy"] >= 0.9
        assert res["llm"][("gene_to_type", mode)]["accuracy"] > res["untuned"][("gene_to_type", mode)]["accuracy"] + 0.4
    assert res["untuned"][("gene_to_type", "generate")]["unparsed"] > 0.5  # a random model names no label
    assert ("image_to_type", "score") in res["llm"] and ("image_genes_to_type", "score") not in res["llm"]  # disabled
    preds = pd.read_parquet(tmp_path / "llm.parquet")
    assert set(preds["pred"]) <= set(TOY_CLASSES) | {"(unparsed)"}
    assert (preds.loc[preds["mode"] == "generate", "text"] != "").all()


def test_predict_path_labels_new_cells(toy, trained, tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    from morphomol.studies.cells.predict import main

    out, _ = trained
    genes = toy["genes"]
    rng = np.random.default_rng(3)
    X, labels = [], []
    for c, markers in TOY_CLASSES.items():
        for _ in range(10):
            x = rng.poisson(2.0, len(genes)).astype(np.float32)
            x[[genes.index(g) for m in TOY_CLASSES.values() for g in m]] = 0  # as in the toy fold: own markers only
            x[[genes.index(g) for g in markers]] += 40
            X.append(x)
            labels.append(c.lower())
    a = ad.AnnData(X=sp.csr_matrix(np.array(X)), obs=pd.DataFrame({"ct": labels}, index=[f"n{i}" for i in range(30)]),
                   var=pd.DataFrame(index=genes))
    a.write_h5ad(tmp_path / "new.h5ad")
    info = (out.adapter / "cells_model.json")
    meta = __import__("json").loads(info.read_text())
    meta["label_map"] = str(toy["label_map"])
    info.write_text(__import__("json").dumps(meta))
    rc = main(["--adapter", str(out.adapter), "--h5ad", str(tmp_path / "new.h5ad"), "--out", str(tmp_path / "p.csv"),
               "--label-key", "ct"])
    assert rc == 0
    p = pd.read_csv(tmp_path / "p.csv")
    assert len(p) == 30 and p["correct"].mean() >= 0.9
    rc = main(["--adapter", str(out.adapter), "--h5ad", str(tmp_path / "new.h5ad"), "--out", str(tmp_path / "q.csv"),
               "--layer", "counts"])
    assert rc == 1 and not (tmp_path / "q.csv").exists()


# ------------------------------------------------------------------------------ multi-process, 4-bit
def test_data_parallel_training_through_torchrun_on_cpu(toy, tmp_path):
    from morphomol.studies.cells.launch import train_job

    out = outputs(tmp_path / "ddp")
    c = cfg(steps=6, batch_size=4, val_every=6)
    assert train_job(inputs(toy), out, cfg=c, seed=0, threads=2, device="cpu", world=2) is None
    m = __import__("json").loads(out.metrics.read_text())
    assert m["world"] == 2 and m["steps"] == 6 and m["examples"] == 6 * 4 * 2  # both processes' examples counted
    assert (out.adapter / "adapter_model.safetensors").is_file() and not (out.work_dir / "launch.json").exists()


def test_qlora_4bit_nf4_on_cpu(toy, tmp_path):
    """bitsandbytes >= 0.46 runs 4-bit NF4 on CPU (layers of at least 64 features): the QLoRA path itself."""
    pytest.importorskip("bitsandbytes")
    from morphomol.studies.cells.base_model import add_lora, load_base
    from morphomol.studies.cells.config import TinyModelConfig

    model_dir = toy_model(tmp_path / "model64", toy["genes"], TEMPLATES,
                          tiny=TinyModelConfig(vision_hidden_size=64, head_dim=64))
    c = dataclasses.replace(cfg(steps=8), quantization="4bit")
    base, quant = load_base(model_dir, c, torch.device("cpu"))
    kinds = {type(m).__name__ for m in base.modules()}
    assert quant == "4bit" and "Linear4bit" in kinds
    q = next(m for m in base.modules() if type(m).__name__ == "Linear4bit")
    assert q.weight.quant_type == "nf4" and q.weight.quant_state.nested  # double quantisation
    peft_model = add_lora(base, c, quant)
    assert all("lora_" in n or "modules_to_save" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    out = outputs(tmp_path / "q4")
    m = train_fold(TrainInputs(toy["table"], toy["meta"], model_dir, TEMPLATES, dict(toy["images"])), out, cfg=c,
                   runtime=Runtime(seed=0, threads=1, device="cpu"))
    log = pd.read_csv(out.log_csv)
    assert m["quantization"] == "4bit" and np.isfinite(log["loss"]).all()
    assert log["loss"].iloc[-3:].mean() < log["loss"].iloc[0]
    assert (out.adapter / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bitsandbytes 4-bit)")
def test_qlora_4bit_nf4_on_gpu(toy, tmp_path):
    c = dataclasses.replace(cfg(steps=10), quantization="4bit")
    out = outputs(tmp_path / "qlora")
    m = train_fold(inputs(toy), out, cfg=c, runtime=Runtime(seed=0, device="cuda"))
    assert m["quantization"] == "4bit" and m["peak_gpu_memory_gb"] > 0
    assert (out.adapter / "adapter_model.safetensors").is_file()
    log = pd.read_csv(out.log_csv)
    assert np.isfinite(log["loss"]).all()
