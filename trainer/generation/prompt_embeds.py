"""Text embeddings for prompts longer than CLIP's 77 tokens, the way A1111 does it.

The prompt's tokens are cut into chunks of 75; each chunk is wrapped in BOS … EOS, padded to 77 and encoded on its
own; the chunk embeddings are concatenated along the sequence axis (the UNet's cross-attention takes any length).
The negative prompt is padded with empty chunks to the same length. A prompt of up to 75 tokens gives exactly the
embedding diffusers' own `encode_prompt` gives. Beyond `max_chunks` chunks the rest is dropped, with a notice.
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


def _chunk_ids(tokenizer, text: str, max_chunks: int) -> tuple[list[list[int]], int]:
    per_chunk = tokenizer.model_max_length - 2
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    chunks = [ids[i:i + per_chunk] for i in range(0, len(ids), per_chunk)] or [[]]
    return chunks[:max_chunks], len(ids)


def _encode_chunks(tokenizer, text_encoder, chunks: list[list[int]]) -> torch.Tensor:
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [[tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] for chunk in chunks]
    rows = [row + [pad] * (length - len(row)) for row in rows]
    input_ids = torch.tensor(rows, dtype=torch.long, device=text_encoder.device)
    hidden = text_encoder(input_ids)[0]  # (chunks, 77, dim), last hidden state as diffusers uses it
    return hidden.reshape(1, -1, hidden.shape[-1]).to(dtype=text_encoder.dtype)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompt: str, negative: str, max_chunks: int = MAX_CHUNKS) -> PromptEmbeddings:
    prompt_chunks, count = _chunk_ids(tokenizer, prompt, max_chunks)
    negative_chunks, _ = _chunk_ids(tokenizer, negative, max_chunks)
    chunks = max(len(prompt_chunks), len(negative_chunks))
    prompt_chunks += [[]] * (chunks - len(prompt_chunks))
    negative_chunks += [[]] * (chunks - len(negative_chunks))
    per_chunk = tokenizer.model_max_length - 2
    truncated = per_chunk * max_chunks if count > per_chunk * max_chunks else None
    return PromptEmbeddings(_encode_chunks(tokenizer, text_encoder, prompt_chunks),
                            _encode_chunks(tokenizer, text_encoder, negative_chunks), count, truncated)
