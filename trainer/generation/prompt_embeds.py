"""Text embeddings for prompts longer than CLIP's 77 tokens, the way A1111 does it.

The prompt's tokens are cut into chunks of 75; each chunk is wrapped in BOS … EOS, padded to 77 and encoded on its
own; the chunk embeddings are concatenated along the sequence axis (the UNet's cross-attention takes any length).
The negative prompt is padded with empty chunks to the same length. A prompt of up to 75 tokens gives exactly the
embedding diffusers' own `encode_prompt` gives. Beyond `max_chunks` chunks the rest is dropped, with a notice.

SDXL (`encode_prompts_xl`): every chunk goes through both text encoders, whose penultimate hidden states are put side
by side on the feature axis (768 + 1280); the pooled embedding comes from the second (projected) encoder on the first
chunk, as in A1111. An empty negative prompt is all zeros when the model asks for that
(`force_zeros_for_empty_prompt`, SDXL base does), as diffusers' pipeline does when given no negative prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_CHUNKS = 4


@dataclass(frozen=True)
class PromptEmbeddings:
    prompt: torch.Tensor      # (1, 77 * chunks, dim)
    negative: torch.Tensor    # same shape
    tokens: int               # prompt tokens, without BOS/EOS
    truncated_to: int | None  # set when the prompt was longer than max_chunks chunks
    pooled: torch.Tensor | None = None           # SDXL: (1, dim) from the last text encoder
    negative_pooled: torch.Tensor | None = None


def _chunk_ids(tokenizer, text: str, max_chunks: int) -> tuple[list[list[int]], int]:
    per_chunk = tokenizer.model_max_length - 2
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    chunks = [ids[i:i + per_chunk] for i in range(0, len(ids), per_chunk)] or [[]]
    return chunks[:max_chunks], len(ids)


def _chunk_input_ids(tokenizer, chunks: list[list[int]], device) -> torch.Tensor:
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [[tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] for chunk in chunks]
    rows = [row + [pad] * (length - len(row)) for row in rows]
    return torch.tensor(rows, dtype=torch.long, device=device)


def _encode_chunks_xl(tokenizers, text_encoders, chunks_per_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, pooled = [], None
    for tokenizer, encoder, chunks in zip(tokenizers, text_encoders, chunks_per_encoder):
        out = encoder(_chunk_input_ids(tokenizer, chunks, encoder.device), output_hidden_states=True)
        states = out.hidden_states[-2]  # (chunks, 77, dim): SDXL conditions on the penultimate layer
        hidden.append(states.reshape(1, -1, states.shape[-1]).to(dtype=encoder.dtype))
        pooled = out[0][:1].to(dtype=encoder.dtype)  # the last encoder's projected embedding of the first chunk
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompt: str, negative: str, max_chunks: int = MAX_CHUNKS) -> PromptEmbeddings:
    return encode_prompts_many(tokenizer, text_encoder, [(prompt, negative)], max_chunks)[0]


@torch.no_grad()
def encode_prompts_many(tokenizer, text_encoder, pairs: list[tuple[str, str]],
                        max_chunks: int = MAX_CHUNKS) -> list[PromptEmbeddings]:
    """`encode_prompts` for several (prompt, negative) pairs, in ONE text-encoder pass: on a GPU the pass is bound by
    kernel launches, so a prompt and its negative together cost what one does, and so do a batch of members' prompts
    (the rows are independent)."""
    per_chunk = tokenizer.model_max_length - 2
    rows, plans = [], []
    for prompt, negative in pairs:
        prompt_chunks, count = _chunk_ids(tokenizer, prompt, max_chunks)
        negative_chunks, _ = _chunk_ids(tokenizer, negative, max_chunks)
        chunks = max(len(prompt_chunks), len(negative_chunks))
        rows += prompt_chunks + [[]] * (chunks - len(prompt_chunks))
        rows += negative_chunks + [[]] * (chunks - len(negative_chunks))
        plans.append((chunks, count, per_chunk * max_chunks if count > per_chunk * max_chunks else None))
    hidden = text_encoder(_chunk_input_ids(tokenizer, rows, text_encoder.device))[0].to(dtype=text_encoder.dtype)
    out, start = [], 0
    for chunks, count, truncated in plans:  # (chunks, 77, dim) rows -> (1, 77 * chunks, dim) per prompt
        prompt_embeds, negative_embeds = (hidden[first:first + chunks].reshape(1, -1, hidden.shape[-1])
                                          for first in (start, start + chunks))
        out.append(PromptEmbeddings(prompt_embeds, negative_embeds, count, truncated))
        start += 2 * chunks
    return out


@torch.no_grad()
def encode_prompts_xl(tokenizers, text_encoders, prompt: str, negative: str, *, zero_empty_negative: bool,
                      max_chunks: int = MAX_CHUNKS) -> PromptEmbeddings:
    prompt_chunks = [_chunk_ids(t, prompt, max_chunks) for t in tokenizers]
    negative_chunks = [_chunk_ids(t, negative, max_chunks)[0] for t in tokenizers]
    chunks = max(len(c) for c in [*(c for c, _ in prompt_chunks), *negative_chunks])
    padded = [c + [[]] * (chunks - len(c)) for c, _ in prompt_chunks]
    padded_negative = [c + [[]] * (chunks - len(c)) for c in negative_chunks]
    count = prompt_chunks[0][1]
    per_chunk = tokenizers[0].model_max_length - 2
    truncated = per_chunk * max_chunks if count > per_chunk * max_chunks else None
    embeds, pooled = _encode_chunks_xl(tokenizers, text_encoders, padded)
    if zero_empty_negative and not negative.strip():
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = _encode_chunks_xl(tokenizers, text_encoders, padded_negative)
    return PromptEmbeddings(embeds, negative_embeds, count, truncated, pooled, negative_pooled)
