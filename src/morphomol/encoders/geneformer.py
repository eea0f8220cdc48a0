"""Geneformer (``geneformer``): an expression encoder over rank-value gene tokens.

transformers ``BertModel`` from a local directory holding ``config.json``,
``model.safetensors`` or ``pytorch_model.bin``, ``token_dictionary.json`` (Ensembl id -> token
id, incl. ``<pad>`` and, for V2 models, ``<cls>``/``<eos>``), ``gene_median_dictionary.json``
(Ensembl id -> median normalisation factor) and optionally ``gene_name_id_dict.json`` (gene
symbol -> Ensembl id). The ``.pkl`` dictionaries Geneformer ships are read with a restricted
unpickler (plain dicts, str, int, float and NumPy scalars only). A ``BertForMaskedLM``
checkpoint (``bert.*`` + ``cls.*``) loads too. Embedding = mean of the last hidden state over
gene tokens (:class:`morphomol.encoders._modules.GeneformerEncoder`). Torch-free at import.
"""

from __future__ import annotations

import importlib
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from morphomol.encoders.registry import HALF, EncoderSpec, register_encoder
from morphomol.errors import InputError


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for Geneformer's dictionaries: containers, str/int/float and NumPy scalars only."""

    ALLOWED = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_dict_file(directory: Path, stems: Sequence[str], *, required: bool) -> dict[str, Any] | None:
    """The first ``{stem}.json|.pkl|.pickle`` of ``directory`` as a dict (None if absent and not required)."""
    for stem in stems:
        for suffix in (".json", ".pkl", ".pickle"):
            p = directory / f"{stem}{suffix}"
            if not p.is_file():
                continue
            try:
                if suffix == ".json":
                    obj = json.loads(p.read_text())
                else:
                    with open(p, "rb") as f:
                        obj = _SafeUnpickler(f).load()
            except Exception as exc:
                raise InputError(f"cannot read dictionary ({type(exc).__name__}: {exc})", file=p,
                                 expected="a JSON object (or plain-dict pickle)") from None
            if not isinstance(obj, dict):
                raise InputError("not a dictionary", file=p, expected="a JSON object") from None
            return obj
    if required:
        raise InputError(
            "Geneformer directory lacks a dictionary file",
            file=directory,
            field=stems[0],
            expected=f"{stems[0]}.json (or .pkl) in the weights directory",
        )
    return None


@register_encoder(
    name="geneformer", kind="expression",
    architecture="transformers BertModel over rank-value gene tokens (Geneformer)", model_name="BertModel",
    weight_formats=("hf_dir",), input_size=0, mean=HALF, std=HALF, embed_dim=512,
    pooling="mean", poolings=("mean",), requires_weights=True,
    select_prefix=("bert.",), ignore_prefixes=("pooler.", "cls.", "classifier."),
    description="Geneformer (e.g. gf-12L-38M-i4096), mean over gene tokens",
)
def build_geneformer(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int, *,
                     overrides_field: str | None = None) -> Any:
    """BertModel + dictionaries from a local Geneformer directory (required)."""
    from morphomol.encoders.base import hf_offline

    hf_offline()
    from transformers import BertConfig, BertModel

    from morphomol.encoders._modules import GeneformerEncoder
    from morphomol.encoders.base import hf_from_state_dict, read_hf_config, split_overrides
    from morphomol.encoders.weights import expected_text, read_encoder_state_dict, weights_id

    arch, enc = split_overrides(spec, overrides)
    if weights is None or not Path(weights).is_dir():
        raise InputError(
            "Geneformer needs a local model directory",
            file=weights,
            field="encoders.geneformer.weights",
            expected="a directory with config.json, model.safetensors|pytorch_model.bin, "
            "token_dictionary.json, gene_median_dictionary.json (+ optional gene_name_id_dict.json)",
        )
    if not weights.exists():
        raise InputError("weights not found", file=weights, field="weights", expected=expected_text(spec))
    config = read_hf_config(weights, BertConfig, spec.name)
    token_dict = read_dict_file(weights, ("token_dictionary",), required=True)
    medians = read_dict_file(weights, ("gene_median_dictionary",), required=True)
    names = read_dict_file(weights, ("gene_name_id_dict",), required=False)
    sd = read_encoder_state_dict(weights, spec)
    sd.pop("embeddings.position_ids", None)
    model = hf_from_state_dict(BertModel, config, sd, source=weights, encoder=spec.name, seed=seed,
                               add_pooling_layer=False)
    assert token_dict is not None and medians is not None
    return GeneformerEncoder(spec, model, token_dict, medians, names, config=enc, weights_id=weights_id(weights, seed))
