"""A tiny random Gemma-3 (``Gemma3ForConditionalGeneration`` + ``Gemma3Processor``) built locally, for the
cells study's demo and tests: nothing is downloaded.

* tokenizer: a word-level ``PreTrainedTokenizerFast`` (whitespace split) over the gene symbols, the
  words of the canonical labels and of the prompt templates, the numbers up to the sentence length and
  Gemma's special tokens with Gemma's ids (pad 0, eos 1, bos 2, unk 3, turns, image tokens);
* model: a small Gemma-3 text config and a small SigLIP vision config (geometry from config
  ``cells.model.tiny``), random weights from the configured seed (the image projector too, which
  transformers leaves at zero for a checkpoint to fill), saved as safetensors;
* processor: ``Gemma3ImageProcessor`` at the tiny image size, ``image_seq_length`` = ``mm_tokens``.

The directory loads with ``AutoProcessor`` / ``AutoModelForImageTextToText`` like MedGemma-4b-it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from morphomol.studies.cells.config import TinyModelConfig
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("synthetic.cells_model")

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                                   "<start_of_image>", "<end_of_image>", "<image_soft_token>")
#: role words of Gemma's chat turns (``<start_of_turn>user`` ... ``<start_of_turn>model``)
CHAT_WORDS: tuple[str, ...] = ("user", "model")


def vocabulary(*, genes: Iterable[str], label_words: Iterable[str], template_texts: Iterable[str],
               organism: str, max_number: int) -> list[str]:
    """Word list of the tiny tokenizer (special tokens first, then sorted words; no duplicates)."""
    words: set[str] = set(genes) | set(label_words) | set(organism.split()) | set(CHAT_WORDS)
    for text in template_texts:
        for w in text.split():
            if not (w.startswith("{") and w.endswith("}")):
                words.add(w)
    words |= {str(i) for i in range(max_number + 1)}
    words -= set(SPECIAL_TOKENS)
    words.discard("")
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tiny_gemma3(out_dir: str | Path, words: Sequence[str], cfg: TinyModelConfig) -> Path:
    """Write tokenizer, processor, config and random safetensors weights of a tiny Gemma-3 to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # matched before the whitespace split, as in Gemma's tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": cfg.image_size,
                                                                           "width": cfg.image_size}),
                                tokenizer=tokenizer, image_seq_length=cfg.mm_tokens)
    text = dict(vocab_size=len(vocab), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.head_dim, max_position_embeddings=4096, sliding_window=1024, query_pre_attn_scalar=cfg.head_dim,
                pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"], bos_token_id=vocab["<bos>"])
    vision = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_hidden_size,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  intermediate_size=cfg.vision_intermediate_size or 2 * cfg.vision_hidden_size)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=cfg.mm_tokens,
                          boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                          image_token_index=vocab["<image_soft_token>"])
    torch.manual_seed(int(cfg.seed))
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        # transformers initialises the image projector to zeros (a pretrained checkpoint overwrites it): a random
        # model would feed the language model blank image tokens that no adapter can bring back (the projector
        # is not a linear layer LoRA adapts). Draw it like the other weights.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, config.initializer_range)
    model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<end_of_turn>"]]
    model.generation_config.pad_token_id = vocab["<pad>"]
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    log.info("tiny Gemma-3 (%d parameters, vocabulary %d) written to %s", n, len(vocab), out)
    return out


def build_tiny_for_cohort(*, out_dir: str | Path, units: Sequence[str | Path], label_map: str | Path,
                          templates: str | Path, cells: Any) -> Path:
    """Rule entry (``cells_base_model``): the tiny model's vocabulary covers every gene of the cohort's unit
    tables, the canonical labels, the template words, the organism and the numbers up to ``n_genes``."""
    from morphomol.data.units import unit_genes
    from morphomol.studies.cells.labels import LabelMap
    from morphomol.studies.cells.prompts import enabled_tasks, load_templates

    genes: set[str] = set()
    for u in units:
        genes |= set(unit_genes(u))
    tpl = load_templates(templates, enabled_tasks(cells.tasks))
    texts = [t.model_input for ts in tpl.values() for t in ts] + [t.response for ts in tpl.values() for t in ts]
    words = vocabulary(genes=genes, label_words=LabelMap.read(label_map).words(), template_texts=texts,
                       organism=cells.organism, max_number=int(cells.n_genes))
    return build_tiny_gemma3(out_dir, words, cells.model.tiny)
