"""The cells study (seed 000): QLoRA-tuned multimodal LLM for cell types from expression and H&E."""
