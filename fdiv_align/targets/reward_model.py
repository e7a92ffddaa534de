"""Reward models: a sequence-classification head on the base LM, trained on preference pairs.

r(x, c) = wᵀ h(c, x) + b, where h is the decoder's final hidden state at the EOS token closing context +
continuation (the layout the library scores and samples with: [BOS] + context, then the continuation
and EOS; fdiv_align/lm/batch.py — so an empty continuation has a reward too) — the head of InstructGPT's reward model, and the position
Hugging Face's
``*ForSequenceClassification`` reads. The body is the base model with LoRA adapters by default
(``model.lora``), or fully fine-tuned. Trained by Bradley–Terry, −log σ(r(y_w) − r(y_l) − m)
(:func:`fdiv_align.objectives.preference_loss.bradley_terry_loss`; ``fdiv-align-rm``, fdiv_align/preferences/pair_training.py),
so r is identified up to an additive constant per prompt.

The saved reward model is one file, ``reward_model.pt``, written atomically: the model config, the
trained body weights (the LoRA adapter, or every parameter) and the head. :func:`load_reward_model`
refuses a file without a head. As a scorer, :meth:`RewardModel.rewards` gives r for (texts, contexts);
the task ``reward_model`` builds P = a·exp(r/β) from it (fdiv_align/targets/tasks.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_path, safe_torch_load
from ..lm.batch import make_batch
from ..lm.scoring import last_token_hidden

__all__ = ["RewardModel", "RewardModelError", "save_reward_model", "load_reward_model", "REWARD_MODEL_FILE"]

REWARD_MODEL_FILE = "reward_model.pt"
_FORMAT = "fdiv_align.targets.reward_model/1"


class RewardModelError(ValueError):
    """A reward model that cannot be built or loaded; the message says what is missing."""


def require_pad_token(tokenizer) -> int:
    """The tokenizer's pad id; a tokenizer without one is refused (rows of a batch must be padded)."""
    if tokenizer.pad_token_id is None:
        raise RewardModelError(
            f"the tokenizer ({type(tokenizer).__name__}) has no pad token, so pairs of different lengths cannot be "
            f"batched: set one first (e.g. tokenizer.pad_token = tokenizer.eos_token; fdiv_align.lm.models.load_model "
            f"does that for the models it loads)")
    return tokenizer.pad_token_id


class RewardModel(nn.Module):
    """``model``: a causal LM (PEFT-wrapped or not) whose decoder gives h; ``head``: Linear(H, 1), a new
    one initialised to 0 (r ≡ 0 before training) when None."""

    def __init__(self, model, tokenizer, head: nn.Linear | None = None):
        super().__init__()
        self.pad_id = require_pad_token(tokenizer)
        self.model, self.tokenizer = model, tokenizer
        hidden = model.config.hidden_size
        if head is None:
            head = nn.Linear(hidden, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        if tuple(head.weight.shape) != (1, hidden):
            raise RewardModelError(f"reward head of shape {tuple(head.weight.shape)} does not fit the model: "
                                   f"expected (1, {hidden})")
        device = next(model.parameters()).device
        self.head = head.to(device=device, dtype=torch.float32)

    def forward(self, contexts: list[str], texts: list[str]) -> torch.Tensor:
        """[N] float32 rewards r(texts[i], contexts[i]) under the caller's grad mode."""
        batch = make_batch(self.tokenizer, list(contexts), list(texts), add_eos=True)
        h = last_token_hidden(self.model, batch, self.pad_id)
        return self.head(h.float()).squeeze(-1)

    @torch.no_grad()
    def rewards(self, texts: list[str], contexts: list[str], batch_size: int = 32) -> torch.Tensor:
        """[N] float64 rewards in eval mode, ``batch_size`` rows at a time (a scorer's ``fn``)."""
        was_training = self.training
        self.eval()
        try:
            out = [self(contexts[i:i + batch_size], texts[i:i + batch_size]).double().cpu()
                   for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def trained_state(self) -> dict:
        """The weights that make this reward model differ from its base: body parameters that require grad
        (the LoRA adapter, or all) and the head."""
        body = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {"body": body, "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}}


def save_reward_model(rm: RewardModel, path: str | os.PathLike, model_config: dict, metrics: dict | None = None) -> Path:
    """Write ``reward_model.pt`` under directory ``path`` atomically (temporary file, then rename)."""
    final = Path(path) / REWARD_MODEL_FILE
    with atomic_path(final) as tmp:
        torch.save({"format": _FORMAT, "model": model_config, "metrics": metrics or {}, **rm.trained_state()}, tmp)
    return final


def load_reward_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> RewardModel:
    """The reward model saved at ``path`` (its directory or the file): the base model its config names,
    the LoRA adapter (or full weights) and the head. Clear errors on a missing file, a file that is not a
    reward model, a missing head, or weights that do not fit the base."""
    from ..config import ModelConfig
    from ..lm.models import load_configured, lora_wrap

    path = Path(path)
    file = path / REWARD_MODEL_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no reward model at {file} (train one with fdiv-align-rm; its run directory holds "
                                f"{REWARD_MODEL_FILE})")
    state = safe_torch_load(file)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise RewardModelError(f"{file} is not a reward model saved by fdiv_align (format "
                               f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, expected {_FORMAT!r})")
    head_state = state.get("head") or {}
    missing = sorted({"weight", "bias"} - set(head_state))
    if missing:
        raise RewardModelError(f"{file} has no reward head (missing {', '.join('head.' + k for k in missing)}): a base "
                               f"or policy checkpoint is not a reward model")
    m = ModelConfig(**state["model"])
    lm = load_configured(m, torch.device(device))
    model = lora_wrap(lm.model, m) if m.lora else lm.model
    params = dict(model.named_parameters())
    unknown = sorted(set(state["body"]) - set(params))
    if unknown:
        raise RewardModelError(f"{file}: {len(unknown)} trained weights do not exist in {m.name} "
                               f"(first: {unknown[0]}): saved from another base model or LoRA configuration")
    with torch.no_grad():
        for name, value in state["body"].items():
            if params[name].shape != value.shape:
                raise RewardModelError(f"{file}: weight {name} has shape {tuple(value.shape)}, the model's is "
                                       f"{tuple(params[name].shape)}")
            params[name].copy_(value)
    head = nn.Linear(model.config.hidden_size, 1)
    try:
        head.load_state_dict(head_state)
    except RuntimeError as exc:
        raise RewardModelError(f"{file}: the reward head does not fit {m.name}: {exc}") from exc
    rm = RewardModel(model, lm.tokenizer, head)
    for p in rm.parameters():
        p.requires_grad_(False)
    return rm.eval()
