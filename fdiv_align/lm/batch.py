"""Batches of (context, continuation) pairs in the library's one layout, and their padding.

* a context c is encoded as [BOS] + tokens(c) (BOS = the tokenizer's bos token, else its eos);
* prompts are **left-padded** to a common length (every prompt ends at the same column), continuations
  **right-padded**; :func:`pad_rows` is the one padding routine (sampling, scoring, make_batch, TRL).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Batch", "encode_contexts", "render_contexts", "pad_rows", "make_batch", "decode"]


@dataclass
class Batch:
    """Samples x ∼ q(·|c): prompts (left-padded), continuations (right-padded) and log q."""

    context_index: torch.Tensor  # [B] index into ``contexts``
    contexts: list[str]  # the distinct context strings
    prompt_ids: torch.Tensor  # [B, Lp]
    prompt_mask: torch.Tensor  # [B, Lp]
    tokens: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] 1 for generated tokens (EOS included)
    token_logq: torch.Tensor | None = None  # [B, T] recorded at generation, 0 at padding
    texts: list[str] = field(default_factory=list)  # decoded continuations (no special tokens)

    @property
    def logq(self) -> torch.Tensor:
        return self.token_logq.sum(-1)

    @property
    def context_texts(self) -> list[str]:
        return [self.contexts[i] for i in self.context_index.tolist()]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def trim(self) -> "Batch":
        """Drop prompt columns that are padding in every row and continuation columns past the
        longest sequence (the numbers do not change: position ids follow the attention mask)."""
        keep_p = self.prompt_mask.bool().any(0)
        width = int(self.mask.sum(-1).max())
        return Batch(self.context_index, self.contexts, self.prompt_ids[:, keep_p], self.prompt_mask[:, keep_p],
                     self.tokens[:, :width], self.mask[:, :width],
                     None if self.token_logq is None else self.token_logq[:, :width], list(self.texts))

    def select(self, index: torch.Tensor) -> "Batch":
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index.tolist()
        return Batch(self.context_index[index], self.contexts, self.prompt_ids[index], self.prompt_mask[index],
                     self.tokens[index], self.mask[index],
                     None if self.token_logq is None else self.token_logq[index],
                     [self.texts[i] for i in rows] if self.texts else [])


def _start_token(tokenizer) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither a bos nor an eos token to start sequences with")
    return tid


def render_contexts(tokenizer, contexts: list, chat_template: bool = False) -> list[str]:
    """Contexts as the strings the model is prompted with: a conversation (a list of ``{"role", "content"}``
    messages) through the tokenizer's chat template with the generation prompt (the assistant turn's
    opening, where sampling continues); a string as it is, or — with ``chat_template`` — as one user turn."""
    rendered = []
    for c in contexts:
        messages = c if isinstance(c, list) else [{"role": "user", "content": c}] if chat_template else None
        if messages is None:
            rendered.append(c)
            continue
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"context {c!r:.80} needs a chat template, and the tokenizer has none (a base model?): "
                             f"give plain-string prompts, or a model whose tokenizer has one")
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def encode_contexts(tokenizer, contexts: list[str], max_length: int | None = None) -> list[list[int]]:
    """[BOS] + tokens(c) for each context (no second BOS when c's text begins with it, as a prompt rendered
    with a chat template may); clear errors on empty lists and over-long contexts."""
    if isinstance(contexts, str):
        raise TypeError("contexts must be a list of strings, got a single string")
    if len(contexts) == 0:
        raise ValueError("contexts: empty list; give at least one context ('' for unconditional generation)")
    start = _start_token(tokenizer)
    out = []
    for c in contexts:
        if not isinstance(c, str):
            raise TypeError(f"contexts must be strings, got {type(c).__name__}: {c!r}")
        ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        if not ids or ids[0] != start:  # a chat-rendered prompt already begins with it: never twice
            ids = [start] + ids
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"context of {len(ids)} tokens exceeds the model window budget of {max_length} tokens: {c[:80]!r}")
        out.append(ids)
    return out


def pad_rows(seqs, pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, width], mask [B, width]) of token rows (lists or 1-D tensors) padded with ``pad_id`` on
    ``side`` (prompts: left, so that every prompt ends at the same column; continuations: right) — the
    library's one padding routine."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def decode(tokenizer, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The texts of masked token rows (special tokens skipped)."""
    rows = [t[m.bool()].tolist() for t, m in zip(tokens, mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def make_batch(tokenizer, contexts: list[str], continuations: list[str], context_index=None,
               add_eos: bool = False) -> Batch:
    """A :class:`Batch` for given continuation texts (for scoring); errors on texts with no tokens."""
    encoded = encode_contexts(tokenizer, contexts)
    if context_index is None:
        if len(contexts) != len(continuations) and len(contexts) != 1:
            raise ValueError(f"{len(continuations)} continuations for {len(contexts)} contexts: give context_index")
        context_index = torch.arange(len(continuations)) if len(contexts) > 1 else torch.zeros(len(continuations), dtype=torch.long)
    context_index = torch.as_tensor(context_index, dtype=torch.long)
    rows = []
    for text in continuations:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if add_eos:
            ids = ids + [tokenizer.eos_token_id]
        if not ids:
            raise ValueError(f"continuation {text!r} tokenises to nothing")
        rows.append(ids)
    tokens, mask = pad_rows(rows, tokenizer.pad_token_id, "right")
    prompt_ids, prompt_mask = pad_rows([encoded[i] for i in context_index.tolist()], tokenizer.pad_token_id)
    return Batch(context_index, list(contexts), prompt_ids, prompt_mask, tokens, mask, None, list(continuations))
