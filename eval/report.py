"""``python -m eval report``: tables and figures from result JSON files, and the README's Results section.

    python -m eval report --opt inputs=docs/results --opt out=docs/results.md

Every number and figure comes from the JSON files; nothing is typed in. The README section between
``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced by the summary.
"""

from __future__ import annotations

import json
from argparse import Namespace
from collections import Counter
from pathlib import Path
from typing import Any

from eval.common import REPO_ROOT, check_opts, get_opt

START, END = "<!-- results:start -->", "<!-- results:end -->"
SKIP_METRIC_PREFIX = ("recall@1@pos",)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    if isinstance(v, list):
        return ", ".join(map(str, v))[:60]
    return str(v)


def table(result: dict[str, Any], metrics: list[str] | None = None) -> str:
    systems = result["systems"]
    if metrics is None:
        metrics = []
        for s in systems.values():
            for m, v in s.items():
                if (
                    m not in metrics
                    and not m.startswith(SKIP_METRIC_PREFIX)
                    and not isinstance(v, (list, dict))
                ):
                    metrics.append(m)
    lines = ["| system | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, s in systems.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(s[m]) if m in s else "" for m in metrics) + " |")
    return "\n".join(lines)


FUSION_ROWS = (
    "given-order",
    "encoder",
    "probe",
    "default",
    "default-no-probe",
    "fixed",
    "all-signals",
    "agreement",
    "default-adaptive",
    "default-first-order",
)


def fusion_table(result: dict[str, Any]) -> str:
    """The ``fusion`` suite: per set, each system scored and unscored, the default's differences with
    their 95% paired-bootstrap intervals."""
    out = []
    for name, block in result["systems"].items():
        kinds = [k for k in ("scored", "unscored", "all") if k in block]
        metric = next(m for m in block[kinds[0]]["default"] if not m.startswith("minus_"))
        head = f"\n**{name}** ({block.get('queries')} queries, {metric})\n\n| system | " + " | ".join(kinds)
        lines = [head + " |", "|---" * (len(kinds) + 1) + "|"]
        for row in FUSION_ROWS:
            if not any(row in block[k] for k in kinds):
                continue
            cells = []
            for k in kinds:
                r = block[k].get(row, {})
                cell = f"{r[metric]:.3f}" if metric in r else ""
                diffs = [
                    f"{m[6:]} {r[m]:+.3f} [{r[m + '_ci95'][0]:+.3f}, {r[m + '_ci95'][1]:+.3f}]"
                    for m in r
                    if m.startswith("minus_") and not m.endswith("_ci95")
                ]
                cells.append(cell + (" (vs " + "; ".join(diffs) + ")" if diffs else ""))
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n".join(out) + "\n"


def fresh_table(result: dict[str, Any], metrics: list[str] | None = None) -> str:
    """The position sweep on the questions not looked at while choosing the configuration."""
    fresh = result["fresh"]
    return (
        f"\nThe same, on test questions {fresh['from_question'] + 1} onwards only ({fresh['questions']} "
        "questions, not looked at while the configuration was chosen):\n\n"
        f"{table({'systems': fresh['systems']}, metrics)}\n"
    )


def _plot_position(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, s in result["systems"].items():
        ys = [s.get(f"recall@1@pos{i}") for i in range(1, 21)]
        if None not in ys:
            ax.plot(range(1, 21), ys, "o-", ms=3, label=name)
    ax.set_xlabel("slot of the gold passage (1 = first)")
    ax.set_ylabel("gold recall@1")
    ax.set_title(result["dataset"], fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bars(result: dict[str, Any], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in result["systems"].items() if metric in s]
    vals = [result["systems"][n][metric] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1))
    ax.barh(names[::-1], vals[::-1], color="C0")
    ax.set_xlabel(metric)
    ax.set_title(result["dataset"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scaling_points(result: dict[str, Any]) -> dict[str, dict[int, float]]:
    """``{system: {passages: seconds_per_query}}`` from the ``seconds_per_query@n`` metrics."""
    out: dict[str, dict[int, float]] = {}
    for name, s in result["systems"].items():
        pts = {}
        for metric, v in s.items():
            head, _, n = metric.partition("@")
            if head == "seconds_per_query" and n.isdigit() and isinstance(v, (int, float)):
                pts[int(n)] = float(v)
        if pts:
            out[name] = dict(sorted(pts.items()))
    return out


def scaling_table(result: dict[str, Any]) -> str:
    """Systems x passages table of seconds per query; ``skipped`` where a system refused that length."""
    points = _scaling_points(result)
    skipped = {
        name: {int(m.partition("@")[2]) for m in s if m.startswith("skipped@") and m[8:].isdigit()}
        for name, s in result["systems"].items()
    }
    lengths = sorted({n for pts in points.values() for n in pts} | set().union(*skipped.values()))
    lines = [
        "| system | " + " | ".join(f"{n} passages" for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for name in result["systems"]:
        pts = points.get(name, {})
        if not pts and not skipped[name]:
            continue
        cells = [_fmt(pts[n]) if n in pts else ("skipped" if n in skipped[name] else "") for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_scaling(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    points = _scaling_points(result)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in points.items():
        ax.plot(list(pts), list(pts.values()), "o-", ms=4, label=name)
    # Log-log: a straight line's slope is the growth exponent (1 = linear in passages, 2 = quadratic).
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted({n for pts in points.values() for n in pts}))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("passages in the list")
    ax.set_ylabel("seconds per query")
    ax.set_title(f"{result['dataset']}: seconds per query vs passages", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: Namespace) -> dict[str, Any]:
    opts = getattr(args, "opts", {}) or {}
    check_opts(opts, ["inputs", "out", "readme"])
    inputs = Path(get_opt(opts, "inputs", str(REPO_ROOT / "docs" / "results")))
    out = Path(get_opt(opts, "out", str(REPO_ROOT / "docs" / "results.md")))
    readme = Path(get_opt(opts, "readme", str(REPO_ROOT / "README.md")))
    files = sorted(inputs.glob("*.json"))
    img = out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Results\n",
        "Generated by `python -m eval report` from the JSON files in "
        f"`{inputs.relative_to(REPO_ROOT) if inputs.is_relative_to(REPO_ROOT) else inputs}`.\n",
    ]
    summary = []
    # The machine most results were measured on heads the summary; a table from another CPU says so.
    machines = [m for m in (json.loads(f.read_text(encoding="utf-8")).get("machine") for f in files) if m]
    cpus = Counter(m["cpu"] for m in machines if "cpu" in m)
    machine = next((m for m in machines if cpus and m.get("cpu") == cpus.most_common(1)[0][0]), None)
    for f in files:
        r = json.loads(f.read_text(encoding="utf-8"))
        if "systems" not in r or "suite" not in r:
            continue
        quick = " (QUICK subset)" if r.get("config", {}).get("quick") else ""
        shown = fusion_table(r) if r["suite"] == "fusion" else table(r)
        parts.append(f"\n## {r['suite']}: {r['dataset']}{quick}\n\nFile: `{f.name}`\n\n{shown}\n")
        failed = (r.get("config") or {}).get("errors") or {}
        if failed:
            # A system that could not run is reported as failed, not left out of the table silently.
            parts.append(
                "\nFailed in this run (no figures): "
                + "; ".join(f"`{name}`: {msg}" for name, msg in sorted(failed.items()))
                + "\n"
            )
        if r["suite"] == "position":
            p = img / f"{f.stem}.png"
            _plot_position(r, p)
            parts.append(f"\n![gold recall@1 by slot](img/{p.name})\n")
            if r.get("fresh"):
                parts.append(fresh_table(r))
        if r["suite"] == "speed" and _scaling_points(r):
            p = img / f"{f.stem}-scaling.png"
            _plot_scaling(r, p)
            parts.append(
                f"\nSeconds per query by list length:\n\n{scaling_table(r)}\n\n"
                f"![seconds per query vs passages](img/{p.name})\n"
            )
        if r["suite"] in ("rerank", "retrieval", "qa"):
            metric = {"rerank": "ndcg@10", "retrieval": "ndcg@10", "qa": "accuracy"}[r["suite"]]
            p = img / f"{f.stem}.png"
            _plot_bars(r, metric, p)
            parts.append(f"\n![{metric}](img/{p.name})\n")
        key = {
            "retrieval": ["ndcg@10", "recall@100", "seconds_per_query"],
            "rerank": ["ndcg@10", "mrr@10", "seconds_per_query", "p_vs_bm25", "p_vs_hybrid"],
            "position": [
                "recall@1",
                "bin_spread",
                "recall@1@bin1",
                "recall@1@bin3",
                "recall@1@bin5",
                "seconds_per_query",
            ],
            "qa": ["accuracy", "gold_in_context", "seconds_per_query"],
            "speed": None,
            "heads": ["ndcg@10"],
        }.get(r["suite"])
        if r["suite"] == "speed" and _scaling_points(r):
            summary.append(
                f"**speed** (`{f.name}`) — {r['dataset']}{quick}: seconds per query by list length\n\n"
                f"{scaling_table(r)}\n"
            )
        elif r["suite"] == "fusion":
            summary.append(f"**fusion** (`{f.name}`) — {r['dataset']}\n{fusion_table(r)}")
        elif r["suite"] != "speed":
            where = " — on the lent GPU" if r["suite"] == "gpu-speed" else ""
            cpu = (r.get("machine") or {}).get("cpu")
            if not where and machine and cpu and cpu != machine.get("cpu"):
                where = f" — on {cpu}"
            summary.append(
                f"**{r['suite']}** (`{f.name}`{where}) — {r['dataset']}{quick}\n\n{table(r, key)}\n"
            )
            if r["suite"] == "position" and r.get("fresh"):
                summary.append(fresh_table(r, key))
    if machine:
        parts.append("\n## Machine\n\n```json\n" + json.dumps(machine, indent=1) + "\n```\n")
    out.write_text("\n".join(parts), encoding="utf-8")
    if readme.is_file() and summary:
        text = readme.read_text(encoding="utf-8")
        cpu = (machine or {}).get("cpu", "this machine")
        block = (
            f"{START}\nMeasured on {cpu} (2 cores, no GPU) unless a table says otherwise; full tables and "
            "figures: [docs/results.md](docs/results.md).\n\n" + "\n".join(summary) + END
        )
        if START in text and END in text:
            text = text.split(START)[0] + block + text.split(END, 1)[1]
            readme.write_text(text, encoding="utf-8")
    return {
        "dataset": f"{len(files)} result files",
        "config": {"inputs": str(inputs), "out": str(out)},
        "systems": {},
    }
