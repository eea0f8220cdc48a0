"""Tiny local models for tests and benchmarks of the spots study (nothing downloaded, seeded weights):

* :func:`build_tiny_sentence_model` — a sentence-transformers directory (1-layer BERT with a word-piece
  vocabulary of the given words, mean pooling, normalisation), loadable with ``SentenceTransformer(dir)``;
* :func:`build_tiny_vlm` — a Hugging Face image-text-to-text directory (LLaVA: tiny CLIP vision tower +
  1-layer Llama, word-level tokenizer with ``<image>``, a chat template), loadable with
  ``AutoProcessor`` / ``AutoModelForImageTextToText``. Its captions are random words, which is all a
  test of the caption rule needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

WORDS = ("tumour tumor cells nuclei stroma fibrous pink dense sparse lymphocytes infiltrate small round dark large "
         "crowded spindle shaped epithelial glands with and of the a in sheets nests tissue area loose").split()


def build_tiny_sentence_model(out: str | Path, words: Sequence[str] = WORDS, dim: int = 32, seed: int = 0) -> Path:
    """Write a tiny sentence-transformers model into ``out`` and return it."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 5.2 moved the modules
        import sentence_transformers.sentence_transformer.modules as models
    except ImportError:  # pragma: no cover - older releases
        from sentence_transformers import models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out)
    base = out.parent / (out.name + "_bert")
    base.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ":", "-", *sorted(set(w.lower() for w in words))]
    (base / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)  # transformers >= 5
    if len(tok) < len(vocab):  # transformers 4: a vocabulary file
        tok = BertTokenizerFast(vocab_file=str(base / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=2 * dim, max_position_embeddings=64))
    bert.save_pretrained(base)
    tok.save_pretrained(base)
    word = models.Transformer(str(base), max_seq_length=48)
    model = SentenceTransformer(modules=[word, models.Pooling(dim, "mean"), models.Normalize()], device="cpu")
    model.save(str(out))
    return out


def build_tiny_vlm(out: str | Path, words: Sequence[str] = WORDS, seed: int = 0) -> Path:
    """Write a tiny LLaVA image-text-to-text model (+ processor) into ``out`` and return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {t: i for i, t in enumerate(special + ["USER:", "ASSISTANT:"] + sorted(set(w.lower() for w in words)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_size, patch = 32, 16
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"]),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
        pad_token_id=vocab["<pad>"])
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    model.save_pretrained(out)
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                             crop_size={"height": image_size, "width": image_size}),
                          tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template, image_token="<image>")
    proc.save_pretrained(out)
    (out / "morphomol_tiny.json").write_text(json.dumps({"what": "tiny test VLM", "seed": seed}))
    return out
