"""The installed product: the wheel runs its default from any folder, the layout keeps its dependency
rules (no product module imports eval/, no import cycles), and a user's own model can be calibrated."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("rerank", "retrievers", "calibration")


def _modules() -> dict[str, Path]:
    """Every product module by dotted name (``configs/`` is installed as ``rerank.configs``)."""
    out = {}
    for top in PRODUCT:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    """Absolute module names imported anywhere in the file (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, mod] if mod else base)
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: {m for m in _imports(p, n) if m in mods and m != n} for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_product_never_imports_the_benchmark_harness():
    bad = {
        n: sorted(m for m in _imports(p, n) if m == "eval" or m.startswith("eval."))
        for n, p in _modules().items()
    }
    assert {n: m for n, m in bad.items() if m} == {}


def test_no_import_cycles_among_product_modules():
    graph = _graph()
    # A package's __init__ may import its own submodules (that is how engines register); a submodule
    # importing its package's __init__ back would close a cycle and is caught here.
    assert _cycles(graph) == []


def _unit(name: str) -> str:
    """The layer a module belongs to (docs/layout.md): ``rerank.<subpackage or top module>``,
    ``retrievers`` or ``calibration``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "rerank" else parts[0]


def test_no_import_cycles_between_packages():
    """Front ends import the core downward and never each other: no two layers import each other, even
    through function-level imports. ``rerank`` itself (the public facade: ``Pipeline``, the records) is
    not a layer; importing it is importing what it re-exports."""
    graph: dict[str, set[str]] = {}
    for n, deps in _graph().items():
        graph.setdefault(_unit(n), set()).update(
            _unit(d) for d in deps if _unit(d) not in (_unit(n), "rerank")
        )
    graph.pop("rerank", None)
    assert _cycles(graph) == []


def test_product_modules_stay_under_600_lines():
    lines = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in _modules().items()}
    assert {n: c for n, c in lines.items() if c > 600} == {}


def test_retrievers_and_calibration_import_nothing_from_rerank():
    for n, deps in _graph().items():
        if n.split(".")[0] in ("retrievers", "calibration"):
            assert not [d for d in deps if d.split(".")[0] == "rerank"], n


def test_pyproject_lists_every_package():
    conf = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(conf["packages"])
    on_disk = {n for n, p in _modules().items() if p.name == "__init__.py"} | {"rerank.configs"}
    on_disk.discard("configs")
    assert listed == on_disk
    assert conf["package-dir"] == {"rerank.configs": "configs"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
        + [str(REPO)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("attn_rerank-*.whl")
    return whl


def test_wheel_ships_configs_curves_and_lists_but_not_eval(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "rerank/configs/default.yaml",
        "calibration/curves/smollm2-135m-nacal.json",
        "calibration/curves/smollm2-135m-nacal-fp32.json",
        "calibration/curves/smollm2-135m-nacal-short.json",
        "rerank/configs/short-lists.yaml",
        "calibration/lists/nq-open-dev.json.gz",
        "calibration/lists/README.md",
        "rerank/data/demo_corpus.jsonl",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("eval/", "tests/", "configs/"))]


@pytest.mark.slow
def test_installed_wheel_reranks_with_the_default_from_an_empty_folder(wheel: Path, tmp_path: Path):
    """A fresh virtualenv with only the wheel (its dependencies come from this environment's site-packages,
    which holds no copy of the project: the editable install's finder is not loaded there)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True)
    work = tmp_path / "empty"
    work.mkdir()
    script = (
        "import json, rerank\n"
        "from rerank import Pipeline\n"
        "pipe = Pipeline.from_config('default', generator=None)\n"
        "ranked = pipe.rerank('Who wrote Hamlet?', ['Paris is the capital of France.',"
        " 'Hamlet is a tragedy written by William Shakespeare.', 'Bananas are rich in potassium.'])\n"
        "print(json.dumps({'file': rerank.__file__, 'ids': ranked.ids,"
        " 'curve': pipe.reranker.curve is not None}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([py, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site)), "the wheel's copy is imported, not the checkout"
    assert got["curve"], "the shipped curve is found as package data"
    assert sorted(got["ids"]) == ["0", "1", "2"]
    res = subprocess.run([py, "-c", "import eval"], cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode != 0, "eval/ is not installed"
    cli = [venv / "bin" / "attn-rerank", "calibrate", "--help"]
    res = subprocess.run(cli, cwd=work, env=env, capture_output=True)
    assert res.returncode == 0


@pytest.mark.slow
def test_calibrate_a_tiny_random_llama_from_a_folder(tmp_path: Path):
    """``attn-rerank calibrate --model FOLDER``: the user's own model (here a random-weight Llama built
    from a config and saved), fitted on the shipped lists; the written config applies the curve."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rerank import Pipeline
    from rerank.cli import main
    from rerank.probe.model import load_model

    tok = load_model().tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    folder = tmp_path / "tiny-llama"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "tiny-curve.json"
    args = ["calibrate", "--model", str(folder), "--out", str(out), "--lists", "48", "--no-progress"]
    args += ["--fusion-hard", "24", "--fusion-retrieved", "0"]
    assert main([*args, "--dtype", "float32"]) == 0
    curve = json.loads(out.read_text())
    assert curve["meta"]["model_id"] == str(folder)
    assert curve["meta"]["layers"] == [2, 3], "the default's share of the depth: 12/30 and 19/30 of 5"
    assert out.with_suffix(".png").stat().st_size > 0
    assert curve["fusion"]["meta"]["lists_by_kind"] == {"hard": 24, "retrieved": 0}
    pipe = Pipeline.from_config(out.with_suffix(".yaml"), generator=None)
    ranked = pipe.rerank("Who wrote Hamlet?", ["Hamlet is by Shakespeare.", "Paris is in France."])
    assert pipe.reranker.curve is not None and pipe.reranker.curve.meta["model_id"] == str(folder)
    assert len(ranked.items) == 2
    # A layer band the model does not have is a usage error, not a traceback.
    assert main([*args, "--layers", "3", "9"]) == 2
