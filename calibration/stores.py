"""Stores of probe scores beside a curve: the fitting lists' and the sweep's scores as ``.npz``, bound to the
model and probe settings that made them, written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def save_npz(path: Path, **arrays: object) -> None:
    """``np.savez_compressed`` under another name, then renamed: a process killed mid-write leaves no
    truncated file, and parallel writers of the same path never interleave."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)


def check_store_meta(path: Path, stored: dict[str, Any], meta: dict[str, Any], kind: str) -> None:
    if stored != meta:
        diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
        raise ValueError(
            f"{kind} store {path} was made with other settings ({', '.join(diff)} differ); "
            f"use another --{kind}-store or delete it"
        )


def load_lists_store(
    path: Path, meta: dict[str, Any], lists: Sequence[tuple[str, list[Any], int]]
) -> list[tuple[np.ndarray, int]] | None:
    """The fitting lists' stored scores, or None if ``path`` does not exist.

    Refused if the store was made with other model or probe settings, or for other lists (questions,
    lengths or gold slots).
    """

    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        check_store_meta(path, json.loads(str(z["meta"])), meta, "lists")
        same = (
            z["questions"].tolist() == [q for q, _, _ in lists]
            and z["lengths"].tolist() == [len(p) for _, p, _ in lists]
            and z["gold"].tolist() == [g for _, _, g in lists]
        )
        if not same:
            raise ValueError(
                f"lists store {path} holds other fitting lists (another --lists or --equalise-questions, "
                "or other data); use another --lists-store or delete it"
            )
        return [
            (row[:n].astype(np.float64), int(g))
            for row, n, g in zip(z["scores"], z["lengths"], z["gold"], strict=True)
        ]


def save_lists_store(
    path: Path,
    meta: dict[str, Any],
    lists: Sequence[tuple[str, list[Any], int]],
    scored: Sequence[tuple[np.ndarray, int]],
) -> None:
    """Write the fitting lists' scores (NaN-padded to the longest list) with what identifies the lists."""

    width = max(len(s) for s, _ in scored)
    pad = np.full((len(scored), width), np.nan, dtype=np.float32)
    for i, (s, _) in enumerate(scored):
        pad[i, : len(s)] = s
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(
        path,
        meta=json.dumps(meta, sort_keys=True),
        questions=np.array([q for q, _, _ in lists]),
        lengths=np.array([len(p) for _, p, _ in lists]),
        gold=np.array([g for _, _, g in lists]),
        scores=pad,
    )


def load_sweep_store(path: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Stored sweep rows by question id; refuses a store made with another model or probe setting."""

    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        check_store_meta(path, json.loads(str(z["meta"])), meta, "sweep")
        return dict(zip(z["qids"].tolist(), z["scores"], strict=True))


def save_sweep_store(path: Path, meta: dict[str, Any], rows: dict[str, np.ndarray]) -> None:
    """Write sweep rows (question id -> gold slot x prompt slot scores), sorted by id, atomically."""

    qids = sorted(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(
        path,
        meta=json.dumps(meta, sort_keys=True),
        qids=np.array(qids),
        scores=np.stack([rows[q] for q in qids]).astype(np.float32),
    )


def list_key(qid: str, ids: Sequence[str]) -> str:
    """What identifies one probed list in a store: its question id and its candidates in order."""
    import hashlib

    return f"{qid}:" + hashlib.sha256("\x1f".join(ids).encode()).hexdigest()[:16]


def load_signal_store(path: Path, meta: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stored probe readings by :func:`list_key`: (merged scores, per-order scores), candidate order.

    Empty when ``path`` does not exist; refused if it was made with other model or probe settings.
    """
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        check_store_meta(path, json.loads(str(z["meta"])), meta, "signal")
        out = {}
        for key, n, merged, orders in zip(z["keys"], z["lengths"], z["merged"], z["orders"], strict=True):
            out[str(key)] = (merged[:n].astype(np.float64), orders[:, :n].astype(np.float64))
        return out


def save_signal_store(
    path: Path, meta: dict[str, Any], rows: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    """Write probe readings by list key (NaN-padded), with the settings they were made with."""
    keys = sorted(rows)
    width = max((len(rows[k][0]) for k in keys), default=1)
    n_orders = max((rows[k][1].shape[0] for k in keys), default=1)
    merged = np.full((len(keys), width), np.nan, dtype=np.float32)
    orders = np.full((len(keys), n_orders, width), np.nan, dtype=np.float32)
    for i, k in enumerate(keys):
        m, o = rows[k]
        merged[i, : len(m)] = m
        orders[i, : o.shape[0], : o.shape[1]] = o
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(
        path,
        meta=json.dumps(meta, sort_keys=True),
        keys=np.array(keys),
        lengths=np.array([len(rows[k][0]) for k in keys]),
        merged=merged,
        orders=orders,
    )
