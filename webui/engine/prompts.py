"""Prompt text -> text-encoder embeddings, with A1111's CLIP skip.

We encode prompts ourselves rather than through the pipeline: it is one short function, it keeps
CLIP skip working across transformers versions (whose CLIPTextModel layout changed in 5.x), and
it is the place where prompt weighting or long-prompt chunking would go.
"""
from __future__ import annotations

import torch


def encode_prompts(pipe, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """Embeddings for each prompt; clip_skip=2 takes the penultimate layer, as A1111 does."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    input_ids = tokens.input_ids.to(pipe._execution_device)
    if clip_skip <= 1:
        embeddings = encoder(input_ids)[0]
    else:
        hidden = encoder(input_ids, output_hidden_states=True).hidden_states
        layers = getattr(encoder, "text_model", encoder)  # transformers 4.x wraps the layers
        embeddings = layers.final_layer_norm(hidden[-clip_skip])
    return embeddings.to(dtype=encoder.dtype)
