"""Prompt text -> text-encoder embeddings, with A1111's attention syntax, CLIP skip and long prompts.

We encode prompts ourselves rather than through the pipeline: it keeps CLIP skip working across
transformers versions (whose CLIPTextModel layout changed in 5.x), and it lets a prompt longer
than CLIP's 75 tokens be read in chunks of 75, each encoded alone and the results joined, as
stable-diffusion-webui does, instead of being cut off.

Attention syntax, as stable-diffusion-webui reads it: `(word)` weighs 1.1, `[word]` 1/1.1, `(word:1.5)`
1.5, brackets nest (their weights multiply; round and square ones are matched separately, so they may
cross), a backslash makes a bracket literal, and `BREAK` starts a new 75-token chunk. A chunk that
fills up within 20 tokens after a comma (A1111's Prompt word wrap length limit) ends at that comma, so a tag is not
cut in two. A weight scales the token's embedding, and the chunk is then scaled back to its old
mean. A1111's *Emphasis mode* setting changes that: "No norm" leaves the chunk's mean as the weights make it,
"Ignore" reads the brackets but weighs every token 1, "None" reads brackets as plain text (and BREAK as a word).
Prompt editing ([a:b:0.5]) and alternation ([a|b]) are resolved before this, per step
(prompt_schedule.py); <lora:...> is not read: it stays text. An SDXL model reads the same chunks with both its
text encoders (encode_sdxl_pair).
"""
from __future__ import annotations

import re

import torch

from webui.engine.embeddings import token_groups

CHUNK_TOKENS = 75  # CLIP's 77 positions less the start and end markers
UP, DOWN = 1.1, 1 / 1.1  # what ( ) and [ ] multiply by
BREAK = "BREAK"
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
ORIGINAL = "Original"
EMPHASIS_MODES = (ORIGINAL, "No norm", "Ignore", "None")  # A1111's names, its default first
# A weight is digits with an optional fraction: one way to split a run of digits, so matching stays linear.
_ATTENTION_TOKEN = re.compile(r"\\.|\(|\[|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|\)|\]|\bBREAK\b|[^\\()\[\]:B]+|.", re.S)


def parse_attention(text: str) -> list[tuple[str, float | None]]:
    """Prompt text -> runs of (text, weight); a run ("BREAK", None) marks a chunk break. A weight may be
    negative, as in stable-diffusion-webui."""
    runs: list[list] = []  # [text, weight], merged later
    # The index of the first run inside each open bracket. "(" and "[" are kept apart, as A1111 does:
    # a "]" closes the last "[" even when a "(" was opened after it.
    open_round: list[int] = []
    open_square: list[int] = []

    def close(opened: list[int], factor: float) -> bool:
        if not opened:
            return False
        for run in runs[opened.pop():]:
            if run[1] is not None:
                run[1] *= factor
        return True

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None:
            if not close(open_round, float(weight)):
                runs.append([token, 1.0])
        elif token == ")":
            if not close(open_round, UP):
                runs.append([token, 1.0])
        elif token == "]":
            if not close(open_square, DOWN):
                runs.append([token, 1.0])
        elif token == BREAK:
            runs.append([BREAK, None])
        else:
            runs.append([token[1:] if token.startswith("\\") else token, 1.0])
    while open_round:  # unclosed brackets still weigh, as in stable-diffusion-webui
        close(open_round, UP)
    while open_square:
        close(open_square, DOWN)
    return _merge(runs)


def _merge(runs: list[list]) -> list[tuple[str, float | None]]:
    merged: list[tuple[str, float | None]] = []
    for text, weight in runs:
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def encode_prompt_pair(pipe, prompts: list[str], negatives: list[str], clip_skip: int = 1,
                       emphasis: str = ORIGINAL, backtrack: int = COMMA_BACKTRACK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings for prompts and negative prompts, padded to the same number of chunks
    (classifier-free guidance needs equal shapes). `backtrack`: A1111's Prompt word wrap length limit."""
    embeddings = _encode(pipe, _padded_chunks(pipe.tokenizer, prompts + negatives, emphasis, backtrack), clip_skip,
                         emphasis)
    return embeddings[: len(prompts)], embeddings[len(prompts):]


def encode_sdxl_pair(pipe, prompts: list[str], negatives: list[str], emphasis: str = ORIGINAL,
                     clip_l_skip: int | None = None, backtrack: int = COMMA_BACKTRACK
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An SDXL model's (prompt, negative, pooled prompt, pooled negative) embeddings, as A1111 conditions SDXL: each
    75-token chunk is read by both text encoders (the penultimate layer of each, without its final norm), each
    encoder's output weighted on its own (as ours for SD), the two joined side by side (768 + 1280 = 2048 wide for
    SDXL); the pooled vector is the second encoder's projection of a text's first chunk, unweighted. An empty
    negative prompt is all zeros (A1111 and diffusers both zero it). Clip skip is not read by default, as A1111;
    `clip_l_skip` (A1111's "Clip skip SDXL" setting, with its Clip skip) reads CLIP-L's layer that far from the end
    instead, still without the final norm (2 is the default's layer). An SDXL refiner has the second encoder alone:
    its embeddings are that one's (1280 wide)."""
    texts = prompts + negatives
    device = pipe._execution_device
    # The second tokenizer pads with "!" (OpenCLIP's padding); the chunks are the same (one BPE vocabulary, and an
    # embedding's vectors at the same ids in both encoders: embeddings.py).
    second, pooled = _encode_layer(pipe.text_encoder_2, _padded_chunks(pipe.tokenizer_2, texts, emphasis, backtrack),
                                   device, emphasis)
    hidden = second
    if pipe.text_encoder is not None:  # a base model; a refiner has no first encoder
        first, _ = _encode_layer(pipe.text_encoder, _padded_chunks(pipe.tokenizer, texts, emphasis, backtrack), device,
                                 emphasis, -(clip_l_skip or 2))
        hidden = torch.cat([first, second.to(first.dtype)], dim=-1)
    empty_negative = torch.tensor([index >= len(prompts) and not text for index, text in enumerate(texts)],
                                  device=hidden.device)
    hidden = hidden.masked_fill(empty_negative[:, None, None], 0)
    pooled = pooled.masked_fill(empty_negative[:, None], 0)
    count = len(prompts)
    return hidden[:count], hidden[count:], pooled[:count], pooled[count:]


def _padded_chunks(tokenizer, texts: list[str], emphasis: str = ORIGINAL,
                   backtrack: int = COMMA_BACKTRACK) -> list[list[Chunk]]:
    """Each text's chunks, the shorter ones padded with empty chunks to the longest's count."""
    chunked = [_chunks(tokenizer, text, emphasis, backtrack) for text in texts]
    count = max(len(chunks) for chunks in chunked)
    empty = _chunks(tokenizer, "")[0]
    return [chunks + [empty] * (count - len(chunks)) for chunks in chunked]


def encode_parts(pipe, parts: list[str], negative: str, clip_skip: int = 1, emphasis: str = ORIGINAL,
                 backtrack: int = COMMA_BACKTRACK) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings for the parts of a prompt joined with AND (parts, length, hidden) and for its negative prompt
    (1, length, hidden), stacked as _stack_parts says."""
    def encode(text: str) -> torch.Tensor:
        return _encode(pipe, [_chunks(pipe.tokenizer, text, emphasis, backtrack)], clip_skip, emphasis)

    return _stack_parts([encode(text) for text in parts], encode(negative), encode(""))


def encode_sdxl_parts(pipe, parts: list[str], negative: str, emphasis: str = ORIGINAL,
                      clip_l_skip: int | None = None, backtrack: int = COMMA_BACKTRACK
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """encode_parts for an SDXL model, each text read as encode_sdxl_pair reads it; and the pooled vectors, each
    part's (parts, projection) and the negative prompt's (1, projection)."""
    def encode(prompts: list[str], negatives: list[str]):
        return encode_sdxl_pair(pipe, prompts, negatives, emphasis, clip_l_skip, backtrack)

    encoded = [encode([text], []) for text in parts]
    _, uncond, _, negative_pooled = encode([], [negative])
    conds, uncond = _stack_parts([hidden for hidden, *_ in encoded], uncond, encode([""], [])[0])
    return conds, uncond, torch.cat([pooled for _, _, pooled, _ in encoded]), negative_pooled


def _stack_parts(encoded: list[torch.Tensor], uncond: torch.Tensor, empty: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts (each (1, length, hidden)) stacked as A1111 stacks them: a part shorter than the longest repeats its
    last vector up to that length; then the parts or the negative prompt are padded with `empty` chunks to the same
    length."""
    longest = max(part.shape[1] for part in encoded)
    conds = torch.cat([torch.cat([part, part[:, -1:].expand(-1, longest - part.shape[1], -1)], dim=1)
                       for part in encoded])
    chunk = empty.shape[1]
    if uncond.shape[1] < conds.shape[1]:
        uncond = torch.cat([uncond, empty.repeat(1, (conds.shape[1] - uncond.shape[1]) // chunk, 1)], dim=1)
    elif conds.shape[1] < uncond.shape[1]:
        padding = empty.repeat(len(encoded), (uncond.shape[1] - conds.shape[1]) // chunk, 1)
        conds = torch.cat([conds, padding], dim=1)
    return conds, uncond


def chunk_count(tokenizer, text: str, emphasis: str = ORIGINAL, backtrack: int = COMMA_BACKTRACK) -> int:
    """How many 77-token chunks a prompt takes (the text encoder's output is chunks x 77 long)."""
    return len(_split(tokenizer, text, emphasis, backtrack))


def token_count(tokenizer, text: str, emphasis: str = ORIGINAL, backtrack: int = COMMA_BACKTRACK) -> int:
    """The UI's counter (12/75), counted as stable-diffusion-webui counts: the tokens of the last chunk, plus
    75 for each chunk before it, so a BREAK or a chunk ended early at a comma shows in the count."""
    chunks = _split(tokenizer, text, emphasis, backtrack)
    return CHUNK_TOKENS * (len(chunks) - 1) + len(chunks[-1][0])


Chunk = tuple[list[int], list[float]]  # token ids and each one's weight


def _chunks(tokenizer, text: str, emphasis: str = ORIGINAL, backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """One prompt as chunks of 77 tokens: start marker, up to 75 tokens, end marker, padding."""
    padding = [tokenizer.pad_token_id]
    return [([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + padding * (CHUNK_TOKENS - len(ids)),
             [1.0, *weights, 1.0] + [1.0] * (CHUNK_TOKENS - len(ids)))
            for ids, weights in _split(tokenizer, text, emphasis, backtrack)]


def _runs(text: str, emphasis: str) -> list[tuple[str, float | None]]:
    """The text's runs and their weights (None: BREAK) as the emphasis mode reads them."""
    if emphasis == "None":
        return [(text, 1.0)]
    runs = parse_attention(text)
    if emphasis == "Ignore":
        return [(run, None if weight is None else 1.0) for run, weight in runs]
    return runs


def _split(tokenizer, text: str, emphasis: str = ORIGINAL, backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """One prompt's tokens, split into chunks of at most 75. BREAK and a full chunk start a new one; a chunk
    that fills up at most `backtrack` tokens after its last comma (A1111's Prompt word wrap length limit; 0:
    never) moves the words after that comma to the next chunk, as stable-diffusion-webui does."""
    comma = _comma_id(tokenizer)
    pieces: list[Chunk] = [([], [])]
    last_comma = -1  # position of the last comma in the current chunk
    for run, weight in _runs(text, emphasis):
        if weight is None:  # BREAK
            pieces.append(([], []))
            last_comma = -1
            continue
        for group in _token_groups(tokenizer, run):
            ids, weights = pieces[-1]
            if group == [comma]:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma >= 0 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                pieces[-1] = (ids[:cut], weights[:cut])
                pieces.append((ids[cut:], weights[cut:]))
                last_comma = -1
            if len(pieces[-1][0]) == CHUNK_TOKENS or (
                    pieces[-1][0] and len(pieces[-1][0]) + len(group) > CHUNK_TOKENS):  # an embedding stays whole
                pieces.append(([], []))
                last_comma = -1
            for token in group:
                if len(pieces[-1][0]) == CHUNK_TOKENS:  # more vectors than a chunk holds
                    pieces.append(([], []))
                pieces[-1][0].append(token)
                pieces[-1][1].append(weight)
    if len(pieces) > 1 and not pieces[-1][0]:  # a BREAK at the end starts no chunk
        pieces.pop()
    return pieces


def _comma_id(tokenizer) -> int | None:
    """The id of CLIP's "," token (as a word end), or None for a tokenizer without one."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    return None if comma is None or comma == tokenizer.unk_token_id else comma


def _token_groups(tokenizer, text: str) -> list[list[int]]:
    """The text's token ids, one per group, but a textual inversion embedding's name becomes one group of its
    vector ids."""
    if not text:
        return []
    return token_groups(tokenizer, tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def _encode(pipe, batch: list[list[Chunk]], clip_skip: int, emphasis: str = ORIGINAL) -> torch.Tensor:
    """[prompt][chunk] -> (prompts, chunks * 77, hidden); clip_skip=2 takes the penultimate layer."""
    encoder = pipe.text_encoder
    input_ids, weights = _token_tensors(batch, pipe._execution_device)
    if clip_skip <= 1 or _is_open_clip(encoder):
        hidden = encoder(input_ids)[0]
    else:
        layer_count = encoder.config.num_hidden_layers
        if clip_skip > layer_count:
            raise ValueError(f"clip_skip: this model's text encoder has {layer_count} layers; use 1 to {layer_count}")
        states = encoder(input_ids, output_hidden_states=True).hidden_states
        layers = getattr(encoder, "text_model", encoder)  # transformers 4.x wraps the layers
        hidden = layers.final_layer_norm(states[-clip_skip])
    return _weighted(hidden, weights, len(batch), encoder.dtype, emphasis)


def _encode_layer(encoder, batch: list[list[Chunk]], device, emphasis: str = ORIGINAL, layer: int = -2
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[prompt][chunk] -> the encoder's hidden states at `layer` (the penultimate, as SDXL reads both its text
    encoders) (prompts, chunks * 77, hidden), weighted; and for an encoder with a projection, each prompt's first
    chunk projected (prompts, projection), else None."""
    input_ids, weights = _token_tensors(batch, device)
    output = encoder(input_ids, output_hidden_states=True)
    hidden = _weighted(output.hidden_states[layer], weights, len(batch), encoder.dtype, emphasis)
    projected = getattr(output, "text_embeds", None)
    if projected is None:
        return hidden, None
    return hidden, projected.reshape(len(batch), -1, projected.shape[-1])[:, 0]


def _token_tensors(batch: list[list[Chunk]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[prompt][chunk] -> the token ids and their weights, a row per chunk."""
    input_ids = torch.tensor([ids for prompt in batch for ids, _ in prompt], device=device)
    weights = torch.tensor([w for prompt in batch for _, w in prompt], device=device)
    return input_ids, weights


def _weighted(hidden: torch.Tensor, weights: torch.Tensor, prompts: int, dtype: torch.dtype,
              emphasis: str = ORIGINAL) -> torch.Tensor:
    """A row per chunk -> the chunks weighted, and a prompt's chunks joined: (prompts, chunks * 77, hidden)."""
    if (weights != 1).any():
        hidden = _weigh(hidden.float(), weights, keep_mean=emphasis == ORIGINAL)
    return hidden.reshape(prompts, -1, hidden.shape[2]).to(dtype=dtype)


def _is_open_clip(encoder) -> bool:
    """SD 2.x's OpenCLIP text encoder. stable-diffusion-webui ignores Clip skip for it (SD 2.x always reads its
    penultimate layer, which diffusers' copy of the encoder ends with), so its "Clip skip: 2" infotexts for
    SD 2.x models make the same picture here only if Clip skip is ignored here too."""
    return getattr(encoder.config, "hidden_act", "") == "gelu"  # OpenAI's CLIP (SD 1.x) uses quick_gelu


# A chunk whose mean is below this share of its values' mean size has no level to keep: dividing by a mean of
# (about) 0 would blow the embeddings up, to inf and then a NaN picture (a text encoder whose last layer norm has no
# bias, as a freshly made one, gives such chunks; CLIP's is ~0.1 of the size)
MIN_MEAN_SHARE = 1e-4


def _weigh(hidden: torch.Tensor, weights: torch.Tensor, keep_mean: bool = True) -> torch.Tensor:
    """Scale each token's embedding by its weight, then (keep_mean) each chunk back to its old mean, as
    stable-diffusion-webui does (so weights shift emphasis rather than the overall level), where it has one."""
    old_mean = hidden.mean(dim=(1, 2), keepdim=True)
    hidden = hidden * weights[..., None]
    if not keep_mean:
        return hidden
    new_mean = hidden.mean(dim=(1, 2), keepdim=True)
    least = MIN_MEAN_SHARE * hidden.abs().mean(dim=(1, 2), keepdim=True)
    has_level = (new_mean.abs() > least) & (old_mean.abs() > least)  # (an old mean of ~0 would zero the chunk)
    return torch.where(has_level, hidden * (old_mean / torch.where(has_level, new_mean, 1.0)), hidden)
