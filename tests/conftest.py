"""Session-wide fixtures: the shared data folder, the embedded models and the demo corpus (loaded once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports huggingface_hub: never reach for the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch starts OpenMP: idle threads sleep instead of spinning. On this shared 2-core machine
# spinning threads made each MiniLM query encoding ~10x slower while another process was busy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO / "rerank" / "data" / "demo_corpus.jsonl"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``<repo>/../shared/data``; tests needing it skip when it is absent."""
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared evaluation data not found at {path} (expected next to the repository)")
    return path


@pytest.fixture(scope="session")
def scifact_dir(data_dir: Path) -> Path:
    path = data_dir / "beir-scifact"
    if not (path / "corpus.jsonl").is_file():
        pytest.skip(f"BEIR SciFact not found at {path}")
    return path


@pytest.fixture(scope="session")
def demo_passages():
    from retrievers.corpus import load_corpus

    return load_corpus(DEMO_CORPUS)


@pytest.fixture(scope="session")
def dense_encoder():
    """The embedded all-MiniLM-L6-v2, loaded once per session (the loader caches it per process)."""
    from retrievers.dense import load_encoder

    return load_encoder("embedded")


@pytest.fixture(scope="session")
def dense_demo(dense_encoder, demo_passages):
    """A flat dense index over the demo corpus, built once per session. Do not mutate."""
    from retrievers.dense import DenseRetriever

    retriever = DenseRetriever(dense_encoder, encoder_name="embedded")
    retriever.index(demo_passages, show_progress=False)
    return retriever


@pytest.fixture(scope="session")
def smol_model():
    """The embedded SmolLM2 with the default ModelConfig (bf16 where the CPU has it, else fp32), loaded once.

    Shared: a test that switches its attention kernel must leave a working one behind.
    """
    from rerank.probe.model import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_llama(smol_model):
    """A 2-layer random-weight Llama with SmolLM2's tokenizer, built from a config (no download)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rerank.probe.model import wrap_model

    torch.manual_seed(0)
    tok = smol_model.tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=4096,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    return wrap_model(model, tok, "tiny-llama")
