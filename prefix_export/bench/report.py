"""bench's report: the decisions (keep a fused graph? targets met?), the table, the plot.

Decisions read the rows' typed fields (kind, layout, precision, provider), never their display names.
Targets are limits the caller passes (`--targets tools/bench_targets.json`); without them the same
ratios are reported with no verdict.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .backends import backend_name

log = logging.getLogger(__name__)

# The ratios reported at the headline config (batch 1, context nearest 32); each may get a limit.
MEASURES = ("export_vs_eager", "prefix_cost", "export_vs_floor", "int8_vs_fp32", "int4_vs_fp32", "int4_vs_int8",
            "int4_vs_eager", "int8_top1_agreement", "int4_top1_agreement", "int8_exact_match_drop",
            "int4_exact_match_drop")
HIGHER_IS_BETTER = ("int8_top1_agreement", "int4_top1_agreement")


def _matches(row: dict, kind: str, layout: str, precision: str, provider: str) -> bool:
    return (row["kind"], row["layout"], row["precision"], row["provider"]) == (kind, layout, precision, provider)


def _headline_config(rows) -> tuple[int, int] | None:
    batch1 = [r for r in rows if r["batch"] == 1] or rows
    if not batch1:
        return None
    context = min({r["context"] for r in batch1}, key=lambda c: abs(c - 32))
    return batch1[0]["batch"], context


def _pick(rows, kind: str, layout: str, precision: str, provider: str = "cpu",
          config: tuple[int, int] | None = None) -> dict | None:
    config = config or _headline_config(rows)
    return next((r for r in rows if _matches(r, kind, layout, precision, provider)
                 and (r["batch"], r["context"]) == config), None)


def _fusion_decision(rows, fused: tuple, plain: tuple) -> dict | None:
    """Fused vs plain decode p50 as a geometric mean of the ratios over every config both ran."""
    ratios = []
    for row in (r for r in rows if _matches(r, *fused)):
        other = _pick(rows, *plain, config=(row["batch"], row["context"]))
        if other is not None:
            ratios.append(row["decode_p50_ms"] / other["decode_p50_ms"])
    if not ratios:
        return None
    ratio = float(np.exp(np.mean(np.log(ratios))))
    return {"kept": bool(ratio < 1.0), "fused_over_plain": round(ratio, 3),
            "why": f"decode p50 fused / plain = {ratio:.3f} (geometric mean over {len(ratios)} configs)"}


def optimize_decision(rows, optimize: bool) -> dict | None:
    """Keep a fused graph when it validated and its decode p50 is lower, as a geometric mean of the
    fused/plain ratios over every measured config (one config alone is too noisy on a shared machine).

    Decided per export backend (layout and provider); the top-level answer is the folded CPU one,
    `by_backend` holds every one, keyed by the plain backend's name. The cache layout runs the base
    graphs, so without its own plain row it is decided by the bare base rows.
    """
    if not optimize:
        return None
    decisions = {}
    fused_rows = [r for r in rows if r["kind"] == "export" and r["precision"] == "fp32+fused"]
    for layout, provider in dict.fromkeys((r["layout"], r["provider"]) for r in fused_rows):
        decision = _fusion_decision(rows, ("export", layout, "fp32+fused", provider),
                                    ("export", layout, "fp32", provider))
        if decision is None and layout == "cache":
            decision = _fusion_decision(rows, ("base", "-", "fp32+fused", provider), ("base", "-", "fp32", provider))
            if decision is not None:
                decision["why"] += ", measured on the same graphs without the prefix (the base rows)"
        if decision is not None:
            decisions[backend_name("export", layout, "fp32", provider)] = decision
    if not decisions:
        return {"kept": False, "why": "the fused graph failed to build or to validate", "by_backend": {}}
    head = decisions.get(backend_name("export", "folded", "fp32", "cpu")) or next(iter(decisions.values()))
    return {**head, "by_backend": decisions}


def eager_matches(rows) -> dict | None:
    """Greedy tokens of row 0 from eager vs our fp32 export at each config: is eager really prefixed?"""
    out = {}
    for row in (r for r in rows if r["kind"] == "eager"):
        device = row["provider"].split(":", 1)[1]
        config = (row["batch"], row["context"])
        candidates = (("export", "folded", "fp32", device), ("export", "cache", "fp32", device),
                      ("export", "folded", "fp32", "cpu"))
        ours = next((found for c in candidates if (found := _pick(rows, *c, config=config)) is not None), None)
        if ours is not None:
            a, b = row["tokens_row0"], ours["tokens_row0"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            label = f"{'' if device == 'cpu' else f'[{device}] '}B={row['batch']} C={row['context']}"
            out[label] = f"{same}/{len(a)} leading tokens equal"
    return out or None


def peers_match(rows) -> dict | None:
    """Greedy tokens of row 0 from each peer runtime vs our runner on the same graph and config."""
    out = {}
    for row in (r for r in rows if r["kind"] in ("genai", "openvino")):
        config = (row["batch"], row["context"])
        ours = _pick(rows, "export", row["layout"], row["precision"], "cpu", config)
        if ours is not None:
            a, b = row["tokens_row0"], ours["tokens_row0"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            out[f"{row['backend']} B={row['batch']} C={row['context']}"] = f"{same}/{len(a)} leading tokens equal"
    return out or None


def evaluate_targets(result: dict, limits: dict | None = None) -> dict:
    """The headline ratios on the CPU rows, per layout, each against its limit when `limits` has one;
    the top level is the faster layout ("ours"), `by_layout` holds both."""
    rows = result.get("rows", [])
    config = _headline_config(rows)
    if config is None:
        return {}
    limits = limits or {}
    decisions = (result.get("optimize_decision") or {}).get("by_backend", {})
    eager = _pick(rows, "eager", "-", "fp32", "torch:cpu", config)
    embedded = result.get("agreement_embedded") or {}

    def entry(key, value):
        limit = limits.get(key)
        met = None if limit is None else bool(value >= limit if key in HIGHER_IS_BETTER else value <= limit)
        return {"value": round(value, 3), "target": limit, "met": met}

    by_layout = {}
    for layout in ("folded", "cache"):
        kept = decisions.get(backend_name("export", layout, "fp32", "cpu"), {}).get("kept")
        ours = _pick(rows, "export", layout, "fp32+fused" if kept else "fp32", config=config)
        if ours is None:  # the cache layout's plain graph is not run when the fused one is (see run._backends)
            ours = _pick(rows, "export", layout, "fp32+fused", config=config)
        if ours is None:
            continue
        fused = ours["precision"] == "fp32+fused"
        base = _pick(rows, "base", "-", "fp32+fused" if fused else "fp32", config=config)
        reduced = {p: _pick(rows, "export", layout, p, config=config) for p in ("int8", "int4")}
        targets = {"ours": ours["backend"], "decode_p50_ms": ours["decode_p50_ms"]}
        if eager:
            targets["export_vs_eager"] = entry("export_vs_eager", ours["decode_p50_ms"] / eager["decode_p50_ms"])
        if base:
            targets["prefix_cost"] = entry("prefix_cost", ours["decode_p50_ms"] / base["decode_p50_ms"] - 1)
        if ours["x_floor"] is not None:
            targets["export_vs_floor"] = entry("export_vs_floor", ours["x_floor"])
        for precision, row in reduced.items():
            if row:
                targets[f"{precision}_vs_fp32"] = entry(f"{precision}_vs_fp32",
                                                        row["decode_p50_ms"] / ours["decode_p50_ms"])
        if reduced["int4"] and reduced["int8"]:
            targets["int4_vs_int8"] = entry("int4_vs_int8", reduced["int4"]["decode_p50_ms"] /
                                            reduced["int8"]["decode_p50_ms"])
        if reduced["int4"] and eager:
            targets["int4_vs_eager"] = entry("int4_vs_eager", reduced["int4"]["decode_p50_ms"] / eager["decode_p50_ms"])
        for precision in ("int8", "int4"):
            agreement = (embedded.get(precision) or {}).get("agreement") or {}
            fp32 = agreement.get("against", {}).get("fp32 graph")
            if fp32:
                targets[f"{precision}_top1_agreement"] = entry(f"{precision}_top1_agreement", fp32["top1_agreement"])
            task = agreement.get("task")
            if task:
                targets[f"{precision}_exact_match_drop"] = entry(f"{precision}_exact_match_drop",
                                                                 task["reference_exact_match"] - task["exact_match"])
        by_layout[layout] = targets
    if not by_layout:
        return {}
    best = min(by_layout, key=lambda layout: by_layout[layout]["decode_p50_ms"])
    return {"config": {"batch": config[0], "context": config[1]}, "layout": best, **by_layout[best],
            "by_layout": by_layout, "limits": limits}


# ---- output --------------------------------------------------------------------------------------


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def _agreement_text(agreement: dict) -> str:
    parts = [f"top-1 vs {label} {row['top1_agreement']:.3f}, greedy equal {row['greedy_equal']}/"
             f"{agreement['greedy_prompts']}" for label, row in agreement["against"].items()]
    task = agreement.get("task")
    if task:
        parts.append(f"task exact match {task['exact_match']:.3f} (fp32 {task['reference_exact_match']:.3f})")
    return "; ".join(parts)


def format_table(result: dict) -> str:
    width = max([24, *(len(r["backend"]) for r in result.get("rows", []))])
    header = (f"{'backend':<{width}} {'B':>2} {'ctx':>5} {'prefill ms':>10} {'decode p50':>10} {'p90':>7} "
              f"{'tok/s':>7} {'floor ms':>8} {'x floor':>7} {'session s':>9} {'build s':>7} {'mem MB':>7}")
    lines = [header, "-" * len(header)]
    for r in result.get("rows", []):
        lines.append(f"{r['backend']:<{width}} {r['batch']:>2} {r['context']:>5} {r['prefill_ms']:>10.1f} "
                     f"{r['decode_p50_ms']:>10.2f} {r['decode_p90_ms']:>7.2f} {r['tokens_per_s']:>7.1f} "
                     f"{_cell(r['floor_ms'], 8)} {_cell(r['x_floor'], 7)} {r['session_s']:>9.2f} {r['build_s']:>7.1f} "
                     f"{r.get('memory_mb', float('nan')):>7.0f}")
    lines.append("decode p50/p90: ms per step over all rounds; floor: (weights read per step + KV cache) / read "
                 "bandwidth; mem MB: RSS growth while the backend was created and run once on the smallest config (eager: + "
                 "its weights), "
                 "approximate: memory freed earlier in the process is reused without showing")
    machine, bandwidth = result.get("machine", {}), result.get("bandwidth", {})
    lines.append("")
    lines.append(f"machine: {machine.get('cpu', machine.get('machine'))}, {machine.get('cpu_count')} cores, "
                 f"{machine.get('memory_gb')} GB; threads {result.get('threads')}; read bandwidth "
                 f"{bandwidth.get('gb_per_s')} GB/s (best of the probes before/after: "
                 f"{bandwidth.get('probes_gb_per_s')}); load average before {result.get('load_average_before')} "
                 f"after {result.get('load_average_after')}")
    gpu = result.get("gpu_bandwidth")
    if gpu:
        lines.append(f"GPU: {gpu['device']}, {gpu['gb_per_s']} GB/s (device-to-device copy, read + write): the "
                     "floor of the GPU rows")
    for variant in result.get("variants", []):
        validation = variant.get("validation")
        status = "" if validation is None else (" validated" if validation.get("passed") else " FAILED validation")
        cache = variant.get("cache_layout_validation")
        if cache is not None:
            status += "; with the prefix as past (cache layout) " + ("validated against PEFT" if cache.get("passed")
                                                                     else "FAILED validation")
        extra = ""
        fusion = (variant.get("compile") or {}).get("fusion")
        if fusion:
            extra = "; fused " + ", ".join(f"{k} {v['matched']}/{v['expected']}" for k, v in fusion["expected"].items())
            extra += f"; nodes {fusion['nodes_before']} -> {fusion['nodes_after']}"
        agreement = (validation or {}).get("agreement")
        if agreement:
            extra += "; " + _agreement_text(agreement)
        if variant.get("below_thresholds"):
            extra += "; BELOW its default agreement thresholds (compile would refuse it): " + \
                ", ".join(variant["below_thresholds"])
        lines.append(f"{variant['name']}: build {variant['build_s']:.1f}s, reads "
                     f"{variant['weights_read_per_token'] / 1e6:.1f} MB of weights per token{status}{extra}")
    lines.extend(f"note: {note}" for note in result.get("notes", []))
    if result.get("optimize_decision"):
        d = result["optimize_decision"]
        for name, each in (d.get("by_backend") or {"export fp32": d}).items():
            lines.append(f"--optimize, {name}: fused graph {'KEPT' if each['kept'] else 'discarded'} ({each['why']})")
    for failed in result.get("peers_failed", []):
        lines.append(f"{failed['backend']}: cannot run {Path(failed['graph']).parent.name}: {failed['error']}")
    if result.get("peers_match_export"):
        lines.append("peer runtimes vs our runner, greedy tokens: " + "; ".join(
            f"{k}: {v}" for k, v in result["peers_match_export"].items()))
    if result.get("eager_matches_export"):
        lines.append("eager vs export greedy tokens: " + "; ".join(f"{k}: {v}" for k, v in
                                                                   result["eager_matches_export"].items()))
    for failed in result.get("failed_variants", []):
        lines.append(f"{failed['name']}: NOT measured, {failed['failed']}")
    embedded = result.get("agreement_embedded") or {}
    for precision, each in embedded.items():
        if precision != "model" and each.get("agreement"):
            lines.append(f"{precision} on {embedded['model']}: {_agreement_text(each['agreement'])}"
                         f"{'' if each['passed'] else ' (FAILED its thresholds)'}")
    targets = result.get("targets") or {}
    if targets:
        config = targets["config"]
        lines.append(f"targets (B={config['batch']}, ctx={config['context']}, CPU), per layout; ours = the faster, "
                     f"{targets['layout']} ({targets['ours']}){'' if targets.get('limits') else '; no --targets given'}:")
        layouts = targets["by_layout"]
        lines.append(f"  {'target':<20} {'limit':>9}  " + "  ".join(f"{layout + ' (' + t['ours'] + ')':>34}"
                                                                   for layout, t in layouts.items()))
        limits = targets.get("limits") or {}
        for key in MEASURES:
            cells = []
            for t in layouts.values():
                value = t.get(key)
                verdict = "" if value is None or value["met"] is None else ("met" if value["met"] else "MISSED")
                cells.append(f"{'-':>34}" if value is None else f"{value['value']:>26.3f} {verdict:>7}")
            if any(key in t for t in layouts.values()):
                op = ">=" if key in HIGHER_IS_BETTER else "<="
                limit = f"{op} {limits[key]}" if key in limits else "-"
                lines.append(f"  {key:<20} {limit:>9}  " + "  ".join(cells))
    return "\n".join(lines)


def write_plot(result: dict, path: Path) -> None:
    """bench.png: see `plot_figure`."""
    import matplotlib.pyplot as plt

    fig = plot_figure(result)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_figure(result: dict):
    """Decode latency (p50) per backend, one panel per batch: against context length when several were
    measured, else as bars; the fp32 bandwidth floor as a dashed line either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("rows", [])
    batches = sorted({r["batch"] for r in rows}) or [1]
    contexts = sorted({r["context"] for r in rows})
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    floor_rows = [r for r in rows if r["kind"] == "export" and r["precision"] == "fp32" and r["provider"] == "cpu"
                  and r["floor_ms"]]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        floor = sorted((r["context"], r["floor_ms"]) for r in floor_rows if r["batch"] == batch)
        if len(contexts) > 1:
            for backend in backends:
                points = sorted((r["context"], r["decode_p50_ms"]) for r in rows
                                if r["backend"] == backend and r["batch"] == batch)
                if points:
                    ax.plot(*zip(*points), marker="o", label=backend)
            if floor:
                ax.plot(*zip(*dict(floor).items()), linestyle="--", color="black", label="fp32 bandwidth floor")
            ax.set_xlabel("context length (prompt tokens)")
        else:
            # One context: a line over one point says nothing; one bar per backend, the floor across.
            values = [next((r["decode_p50_ms"] for r in rows if r["backend"] == b and r["batch"] == batch), 0.0)
                      for b in backends]
            ax.bar(range(len(backends)), values, color=[f"C{i}" for i in range(len(backends))])
            ax.set_xticks(range(len(backends)), backends, rotation=30, ha="right", fontsize=7)
            if floor:
                ax.axhline(floor[0][1], linestyle="--", color="black", label="fp32 bandwidth floor")
                ax.legend(fontsize=7)
            ax.set_xlabel(f"backend (context {contexts[0] if contexts else '?'} tokens)")
        ax.set_ylabel("decode latency per step, p50 (ms)")
        ax.set_title(f"batch {batch}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if len(contexts) > 1:
            ax.legend(fontsize=7)
    machine = result.get("machine", {})
    fig.suptitle(f"prefix-export bench: {machine.get('cpu', '')} ({machine.get('cpu_count')} cores), "
                 f"{result.get('bandwidth', {}).get('gb_per_s')} GB/s", fontsize=9)
    fig.tight_layout()
    return fig
