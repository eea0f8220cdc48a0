"""The alignment module and its evaluation: ABMIL masking, contrastive training through the shared loop
(learns a shared latent, the permuted-pairs control does not), soft-kNN, prompting calibration, metrics,
the frozen slide encoder and the bulk-RNA encoder of the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from morphomol.errors import InputError
from morphomol.studies.slides.align import AlignData, build_model, train_align
from morphomol.studies.slides.config import AlignConfig
from morphomol.studies.slides.evaluate import calibrate, prompt_predict, retrieval, set_metrics, soft_knn
from morphomol.studies.slides.models import GatedABMIL, embed_all, load_frozen_abmil


def test_abmil_ignores_padding():
    torch.manual_seed(0)
    pool = GatedABMIL(8, 16, 8, 0.0).eval()
    bag = torch.randn(1, 5, 8)
    padded = torch.cat([bag, 100 * torch.randn(1, 3, 8)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        a = pool(bag, torch.ones(1, 5, dtype=torch.bool))
        b = pool(padded, mask)
        _, att = pool.attention(padded, mask)
    torch.testing.assert_close(a, b)
    assert float(att[0, 5:].sum()) == 0.0 and float(att.sum()) == pytest.approx(1.0)


def _paired(n: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    slide = z @ rng.normal(size=(4, 24)) + 0.3 * rng.normal(size=(n, 24))
    rna = z @ rng.normal(size=(4, 12)) + 0.3 * rng.normal(size=(n, 12))
    return z, slide.astype(np.float32), rna.astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    z, slide, rna = _paired()
    data = AlignData([f"s{i}" for i in range(len(z))], {"slide": slide, "rna": rna})
    fit, val, test = np.arange(0, 90), np.arange(90, 110), np.arange(110, 150)
    cfg = AlignConfig(proj_dim=16, hidden=32, dropout=0.0, temperature=0.1, epochs=40, warmup_epochs=2, batch_size=32,
                      lr=3e-3, patience=40)
    work = tmp_path_factory.mktemp("align")
    model = build_model(data.subset(fit), cfg, bag=False, seed=0)
    untrained = build_model(data.subset(fit), cfg, bag=False, seed=0)
    res = train_align(model, data.subset(fit), data.subset(val), cfg, work_dir=work / "t", seed=0,
                      fingerprint={"x": "1"}, threads=1)
    perm = np.random.default_rng(1).permutation(len(fit))
    pdata = data.subset(fit).with_rna(rna[fit][perm])
    permuted = build_model(pdata, cfg, bag=False, seed=0)
    train_align(permuted, pdata, data.subset(val).with_rna(rna[val][::-1].copy()), cfg, work_dir=work / "p", seed=0,
                fingerprint={"x": "2"}, threads=1)
    return {"data": data, "test": test, "model": model, "untrained": untrained, "permuted": permuted, "res": res,
            "work": work}


def test_contrastive_alignment_learns_and_the_controls_do_not(trained):
    d, test = trained["data"], trained["test"]
    out = {}
    for name in ("model", "untrained", "permuted"):
        zs, zr = embed_all(trained[name], d.arrays)
        out[name] = retrieval(zs[test], zr[test], (1, 5))
    chance = out["model"]["chance"]["recall@1"]
    assert chance == pytest.approx(1 / 40)
    assert out["model"]["slide_to_rna"]["recall@1"] > 8 * chance
    assert out["model"]["rna_to_slide"]["recall@5"] > 0.7
    assert out["model"]["slide_to_rna"]["recall@5"] > out["untrained"]["slide_to_rna"]["recall@5"] + 0.3
    assert out["permuted"]["slide_to_rna"]["recall@5"] < 0.4
    res = trained["res"]
    assert res.best_epoch >= 0 and res.history[-1]["loss"] < res.history[0]["loss"]
    assert not list(trained["work"].glob("**/resume.pt"))  # the shared loop's resume state is cleaned up


def test_soft_knn_retrieves_the_nearest_references_scores():
    ref = np.eye(4, dtype=np.float32)
    y = np.array([[1.0], [2.0], [3.0], [4.0]])
    q = np.array([[0.0, 0.0, 1.0, 0.05]], np.float32)
    assert soft_knn(q, ref, y, k=1, temperature=0.1)[0, 0] == pytest.approx(3.0)
    # with a huge temperature the k neighbours are averaged equally
    assert soft_knn(q, ref, y, k=2, temperature=1e6)[0, 0] == pytest.approx(3.5, abs=1e-4)


def test_calibration_metrics_and_prompting():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(30, 3))
    y = 2 * raw + 1
    a, b = calibrate(raw, y)
    np.testing.assert_allclose(a, 2.0) and np.testing.assert_allclose(b, 1.0)
    m = set_metrics(y, y, ["a", "b", "c"])
    assert (m["r2"] == 1.0).all()
    m0 = set_metrics(y, np.repeat(y.mean(0, keepdims=True), 30, axis=0) + 1e-9 * raw, ["a", "b", "c"])
    assert np.allclose(m0["r2"], 0.0, atol=1e-6)
    # direct prompting: embeddings = the mean of the set's genes (a perfect "RNA encoder"): slides whose
    # profile is high on set 0 get the highest calibrated score for set 0
    L = rng.normal(size=(40, 6))
    sets = [np.array([0, 1]), np.array([2, 3])]

    def embed(P: np.ndarray) -> np.ndarray:
        z = np.stack([P[:, s].mean(1) for s in sets] + [np.ones(len(P))], axis=1)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    Y = np.stack([L[:, s].mean(1) for s in sets], axis=1)
    pred = prompt_predict(embed, L[:30], sets, 2.0, embed(L[:30]), Y[:30], embed(L[30:]))
    assert set_metrics(Y[30:], pred, ["s0", "s1"])["pearson"].min() > 0.8


def test_frozen_abmil_loads_an_abmil_run_checkpoint(tmp_path):
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    bag = rng.normal(size=(6, 5, 8)).astype(np.float32)
    mask = np.ones((6, 5), bool)
    data = AlignData([f"s{i}" for i in range(6)], {"bag": bag, "mask": mask, "rna": rng.normal(size=(6, 3)).astype(np.float32)})
    model = build_model(data, AlignConfig(hidden=16, proj_dim=8), bag=True, seed=0).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "run.safetensors"))
    pool = load_frozen_abmil(str(tmp_path / "run.safetensors"), 8)
    x = torch.from_numpy(bag)
    with torch.no_grad():
        torch.testing.assert_close(pool(x, torch.from_numpy(mask)), model.slide(x, torch.from_numpy(mask)))
    assert not any(p.requires_grad for p in pool.parameters())
    with pytest.raises(InputError, match="ABMIL input dim 8 but the tile features have 16"):
        load_frozen_abmil(str(tmp_path / "run.safetensors"), 16)


# ------------------------------------------------------------------------------ bulk-RNA encoder (registry)
@pytest.fixture()
def bulk_dir(tmp_path):
    from morphomol.encoders.bulk_rna import save_bulk_model
    from morphomol.encoders.bulk_rna_module import BulkRNACore

    torch.manual_seed(0)
    cfg = {"n_bins": 8, "max_value": 4.0, "embed_dim": 16, "depth": 1, "num_heads": 2, "ffn_dim": 32,
           "normalisation": "log10p1_tpm"}
    vocab = [f"G{i}" for i in range(10)]
    core = BulkRNACore(len(vocab), 8, 16, 1, 2, 32)
    return save_bulk_model(tmp_path / "bulk", core.state_dict(), cfg, vocab)


def test_bulkrnabert_loads_from_local_weights_and_maps_genes(bulk_dir):
    from morphomol.encoders import create_encoder, get_spec

    assert get_spec("bulkrnabert").kind == "expression"
    enc = create_encoder("bulkrnabert", bulk_dir)
    genes = ["G3", "G0", "X1", "G9"]  # partial overlap, other order, one unknown gene
    enc.set_genes(genes)
    tpm = torch.tensor([[0.0, 11.0, 5.0, 120.0], [12.0, 0.0, 1.0, 0.0]])
    bins = enc.tokenize(tpm)
    # log10(1 + TPM) in 8 bins of 0.5 over [0, 4]: 11 TPM -> 1.08 -> bin 2; 120 -> 2.08 -> bin 4; absent -> bin 0
    assert bins.shape == (2, 10) and bins[0, 0] == 2 and bins[0, 9] == 4 and bins[0, 3] == 0 and bins[1, 3] == 2
    out = enc(tpm)
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    again = create_encoder("bulkrnabert", bulk_dir)
    again.set_genes(genes)
    torch.testing.assert_close(out, again(tpm))  # the same local weights give the same embeddings
    from morphomol.studies.slides.embed import RegistryRna

    rna = RegistryRna("bulkrnabert", str(bulk_dir)).fit(np.zeros((2, 4)), genes)
    np.testing.assert_allclose(rna.transform(np.log2(tpm.numpy() + 1.0)), out.numpy(), rtol=1e-5, atol=1e-5)


def test_bulkrnabert_refuses_bad_weights(bulk_dir):
    from safetensors.torch import load_file, save_file

    from morphomol.encoders import create_encoder

    with pytest.raises(InputError, match="needs pretrained weights"):
        create_encoder("bulkrnabert", None)
    sd = load_file(str(bulk_dir / "model.safetensors"))
    sd["gene_embedding.weight"] = sd["gene_embedding.weight"][:5]
    save_file(sd, str(bulk_dir / "model.safetensors"))
    with pytest.raises(InputError, match="mismatched shapes.*gene_embedding"):
        create_encoder("bulkrnabert", bulk_dir)
    (bulk_dir / "genes.txt").unlink()
    with pytest.raises(InputError, match="lacks config.json or genes.txt"):
        create_encoder("bulkrnabert", bulk_dir)
