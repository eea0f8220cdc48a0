"""The base model (MedGemma-4b-it, or the tiny demo Gemma-3) from a local directory, QLoRA / LoRA, adapters.

* :func:`load_processor` — ``AutoProcessor`` (``Gemma3Processor``) with the special tokens the prompts
  need checked (image begin / end / soft token, chat turns, pad, eos): one InputError naming the missing ones.
* :func:`load_base` — ``AutoModelForImageTextToText`` (→ ``Gemma3ForConditionalGeneration``), safetensors
  only, ``local_files_only``; QLoRA when the quantisation resolves to ``4bit``: bitsandbytes 4-bit NF4,
  double quantisation, bf16 compute and storage (``auto`` = 4-bit on CUDA, unquantised on CPU).
* :func:`add_lora` — peft LoRA (r 16, alpha 16, dropout 0.05, all linear layers, ``modules_to_save``
  lm_head + embed_tokens by default), gradient checkpointing without re-entrancy.
* :func:`load_adapter` — a saved adapter on top of the base model, for evaluation and prediction.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from morphomol.errors import InputError
from morphomol.studies.cells.config import CellsConfig
from morphomol.studies.cells.modelfiles import check_model_dir
from morphomol.util.logs import get_logger

log = get_logger("cells.model")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")


@dataclass(frozen=True)
class Chat:
    """Gemma's chat layout: ``<bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n``
    then ``{response}<end_of_turn>``; the token ids the loss, generation and scoring need."""

    bos: str
    image: str        # placeholder the processor expands into the image tokens (the boi token)
    pad_id: int
    eos_ids: tuple[int, ...]   # generation stops at any of these (eos, end_of_turn)
    end_of_turn_id: int
    image_token_id: int

    def prompt(self, text: str) -> str:
        return f"{self.bos}<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"

    @staticmethod
    def response(text: str) -> str:
        return f"{text}<end_of_turn>"


def load_processor(base_dir: str | Path) -> tuple[Any, Chat]:
    """The model directory's processor and its :class:`Chat` (InputError for missing special tokens)."""
    from transformers import AutoProcessor

    base_dir = check_model_dir(base_dir)
    try:
        proc = AutoProcessor.from_pretrained(str(base_dir), local_files_only=True)
    except Exception as exc:  # a tokenizer without Gemma-3's image tokens fails inside the processor
        raise InputError(f"cannot load the processor ({type(exc).__name__}: {exc})", file=base_dir,
                         field="tokenizer", expected="a Gemma-3 processor (image begin/end/soft tokens)") from None
    tok = getattr(proc, "tokenizer", None)
    if tok is None or not hasattr(proc, "image_processor"):
        raise InputError(f"{type(proc).__name__} is not a multimodal processor", file=base_dir, field="processor",
                         expected="Gemma3Processor (AutoProcessor)")
    missing = []
    names = {"boi_token": getattr(tok, "boi_token", None), "eoi_token": getattr(tok, "eoi_token", None),
             "image_token": getattr(tok, "image_token", None)}
    missing += [k for k, v in names.items() if not v]
    ids: dict[str, int] = {}
    for t in TURN_TOKENS + tuple(v for v in names.values() if v):
        i = tok.convert_tokens_to_ids(t)
        if i is None or (tok.unk_token_id is not None and i == tok.unk_token_id):
            missing.append(t)
        else:
            ids[t] = int(i)
    for attr in ("pad_token_id", "eos_token_id", "bos_token"):
        if getattr(tok, attr, None) is None:
            missing.append(attr.replace("_id", ""))
    if missing:
        raise InputError(f"tokenizer lacks special token(s) {missing}", file=base_dir, field="tokenizer",
                         expected="Gemma-3's <bos>, <pad>, <eos>, <start_of_turn>, <end_of_turn>, <start_of_image>, "
                                  "<end_of_image>, <image_soft_token>")
    chat = Chat(bos=str(tok.bos_token), image=str(proc.boi_token), pad_id=int(tok.pad_token_id),
                eos_ids=(int(tok.eos_token_id), ids["<end_of_turn>"]), end_of_turn_id=ids["<end_of_turn>"],
                image_token_id=ids[names["image_token"]])
    return proc, chat


def resolve_quantization(mode: str, device: torch.device) -> str:
    """``4bit`` or ``none``: auto = 4-bit on CUDA; an explicit 4bit needs bitsandbytes."""
    if mode == "auto":
        mode = "4bit" if device.type == "cuda" else "none"
    if mode == "4bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("4-bit quantisation needs bitsandbytes", field="cells.quantization",
                             expected="pip install bitsandbytes, or quantization: none") from None
    return mode


def load_base(base_dir: str | Path, cfg: CellsConfig, device: torch.device) -> tuple[Any, str]:
    """The base model on ``device`` (eval mode) and the quantisation used (``4bit`` | ``none``)."""
    from transformers import AutoModelForImageTextToText

    base_dir = check_model_dir(base_dir)
    quant = resolve_quantization(cfg.quantization, device)
    dtype = DTYPES[cfg.model.dtype] if device.type == "cuda" else torch.float32
    kw: dict[str, Any] = {"attn_implementation": cfg.model.attn_implementation, "dtype": dtype}
    if quant == "4bit":
        from transformers import BitsAndBytesConfig

        compute = DTYPES[cfg.qlora.compute_dtype]
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.qlora.quant_type, bnb_4bit_use_double_quant=cfg.qlora.double_quant,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
        kw["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(base_dir), local_files_only=True,
                                                            use_safetensors=True, **kw)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the base model ({type(exc).__name__}: {exc})", file=base_dir,
                         field="cells.model.path", expected="an image-text-to-text model (Gemma-3) in safetensors") from None
    if quant != "4bit":
        model.to(device)
    model.eval()
    log.info("base model %s (%s, %s, %s) on %s", base_dir.name, type(model).__name__, quant, str(dtype).split(".")[-1],
             device)
    return model, quant


def add_lora(model: Any, cfg: CellsConfig, quant: str) -> Any:
    """Wrap ``model`` with fresh LoRA adapters (trainable) for training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc = cfg.train.gradient_checkpointing
    gc_kwargs = {"use_reentrant": False}
    if quant == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
                    target_modules=cfg.lora.target_modules, modules_to_save=list(cfg.lora.modules_to_save) or None,
                    task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # Gemma ties lm_head to embed_tokens; as in the published recipe both are trained as separate copies
        # (modules_to_save) and saved in the adapter (peft's ensure_weight_tying broke loading them back here)
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        peft_model = get_peft_model(model, lc)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d alpha=%g dropout=%g on %s (+ %s): %d trainable of %d parameters (%.2f%%)", cfg.lora.r,
             cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, list(cfg.lora.modules_to_save), n_train, n_all,
             100 * n_train / max(n_all, 1))
    return peft_model


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """The base model with a saved LoRA adapter (inference)."""
    from peft import PeftModel

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file() or not (d / "adapter_model.safetensors").is_file():
        raise InputError("incomplete adapter directory", file=d, field="adapter",
                         expected="adapter_config.json + adapter_model.safetensors (written by cells_train)")
    check_safetensors(d / "adapter_model.safetensors", field="adapter_model.safetensors",
                      expected="the complete adapter written by cells_train (copy it again)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")  # see add_lora
            m = PeftModel.from_pretrained(model, str(d), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # another base model, a damaged adapter_config
        raise InputError(f"cannot load the adapter onto the base model ({type(exc).__name__}: {exc})", file=d,
                         field="adapter", expected="an adapter trained by cells_train on this base model") from None
    m.eval()
    return m


def check_safetensors(path: str | Path, *, field: str, expected: str) -> None:
    """InputError unless ``path`` is a whole safetensors file (its header read and its byte ranges checked
    against the file's size: a truncated or partly copied file is named, not a SafetensorError)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # SafetensorError (a Rust exception type) or OSError
        raise InputError(f"not a complete safetensors file ({exc})", file=path, field=field, expected=expected) from None


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA + modules_to_save) on CPU: what a resume state stores."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"resume state has unknown parameters {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
