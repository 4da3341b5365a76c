"""Prompt text -> text-encoder embeddings, with A1111's CLIP skip and long prompts.

We encode prompts ourselves rather than through the pipeline: it keeps CLIP skip working across
transformers versions (whose CLIPTextModel layout changed in 5.x), and it lets a prompt longer
than CLIP's 75 tokens be read in chunks of 75, each encoded alone and the results joined, as
stable-diffusion-webui does, instead of being cut off.
"""
from __future__ import annotations

import torch

CHUNK_TOKENS = 75  # CLIP's 77 positions less the start and end markers


def encode_prompt_pair(pipe, prompts: list[str], negatives: list[str], clip_skip: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings for prompts and negative prompts, padded to the same number of chunks
    (classifier-free guidance needs equal shapes)."""
    prompt_ids = [_chunks(pipe.tokenizer, text) for text in prompts]
    negative_ids = [_chunks(pipe.tokenizer, text) for text in negatives]
    count = max(len(chunks) for chunks in prompt_ids + negative_ids)
    empty = _chunks(pipe.tokenizer, "")[0]
    batch = [chunks + [empty] * (count - len(chunks)) for chunks in prompt_ids + negative_ids]
    embeddings = _encode(pipe, batch, clip_skip)
    return embeddings[: len(prompts)], embeddings[len(prompts):]


def chunk_count(tokenizer, text: str) -> int:
    """How many 77-token chunks a prompt takes (the text encoder's output is chunks x 77 long)."""
    return len(_chunks(tokenizer, text))


def _chunks(tokenizer, text: str) -> list[list[int]]:
    """Token ids of one prompt as chunks of 77: start marker, up to 75 tokens, end marker, padding."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    pieces = [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]
    pad = tokenizer.pad_token_id
    return [[tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (CHUNK_TOKENS - len(piece))
            for piece in pieces]


def _encode(pipe, batch: list[list[list[int]]], clip_skip: int) -> torch.Tensor:
    """[prompt][chunk][77 ids] -> (prompts, chunks * 77, hidden); clip_skip=2 takes the penultimate layer."""
    encoder = pipe.text_encoder
    prompts, chunks = len(batch), len(batch[0])
    input_ids = torch.tensor([chunk for prompt in batch for chunk in prompt], device=pipe._execution_device)
    if clip_skip <= 1:
        hidden = encoder(input_ids)[0]
    else:
        layer_count = encoder.config.num_hidden_layers
        if clip_skip > layer_count:
            raise ValueError(f"clip_skip: this model's text encoder has {layer_count} layers; use 1 to {layer_count}")
        states = encoder(input_ids, output_hidden_states=True).hidden_states
        layers = getattr(encoder, "text_model", encoder)  # transformers 4.x wraps the layers
        hidden = layers.final_layer_norm(states[-clip_skip])
    return hidden.reshape(prompts, chunks * hidden.shape[1], hidden.shape[2]).to(dtype=encoder.dtype)
