"""The demo's HTML report: tables and matplotlib figures from the summary, in one self-contained file."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from clipheads.heads import head_label, parse_head  # noqa: E402
from clipheads.report import Report  # noqa: E402

SPLITS = ("val_ood", "test_ood", "test_iid", "test_anti")
SPLIT_NOTES = {"val_ood": "search split, cue random", "test_ood": "held out, cue random",
               "test_iid": "held out, cue as in training", "test_anti": "held out, cue always wrong"}


def heatmap(values: torch.Tensor, title: str, cmap: str = "RdBu_r", center: bool = True, label: str = ""):
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * values.shape[1], 0.8 + 0.45 * values.shape[0]))
    limit = float(values.abs().max()) or 1.0
    image = ax.imshow(values.numpy(), cmap=cmap, vmin=-limit if center else None, vmax=limit if center else None,
                      aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    return fig


def _bars_per_layer(summary: dict, n_layers: int):
    fig, ax = plt.subplots(figsize=(6, 3))
    names = [n for n in summary["ablated"] if n != "vanilla"]
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        counts = [0] * n_layers
        for label in summary["ablated"][name]:
            counts[parse_head(label)[0]] += 1
        ax.bar([layer + i * width for layer in range(n_layers)], counts, width=width, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("heads ablated")
    ax.set_xticks([layer + 0.4 - width / 2 for layer in range(n_layers)], [str(v) for v in range(n_layers)])
    ax.legend()
    return fig


def _curves(summary: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
    history = summary["ga_history"]
    left.plot([h["generation"] for h in history], [h["best_fitness"] for h in history], label="best")
    left.plot([h["generation"] for h in history], [h["mean_fitness"] for h in history], label="mean")
    left.set_xlabel("generation")
    left.set_ylabel("fitness (val_ood mean-R - beta x fraction, 0-1)")
    left.set_title("AAT-GA")
    left.legend()
    right.plot([h["epoch"] for h in summary["bp_history"]], [h["loss"] for h in summary["bp_history"]])
    right.set_xlabel("epoch")
    right.set_ylabel("contrastive loss + beta x mean(1 - gate)")
    right.set_title("AAT-BP")
    return fig


def _scatter(deltas: torch.Tensor, deltas_test: torch.Tensor):
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(deltas.flatten(), deltas_test.flatten(), s=12)
    ax.axhline(0, color="#999", lw=0.8)
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_xlabel("change of mean-R on val_ood")
    ax.set_ylabel("change of mean-R on test_ood")
    ax.set_title("single-head ablation: validation vs test")
    return fig


def write_report(path: str | Path, summary: dict, deltas: torch.Tensor, share: torch.Tensor, ccs) -> Path:
    n_layers, n_heads = deltas.shape
    report = Report("clipheads demo: which heads of the bundled CLIP hurt, and why",
                    subtitle=f"model {summary['model']}, world seed {summary['config']['seed']}, "
                             f"{summary['wall_time_s']:.0f} s")
    results = summary["mean_recall"]
    vanilla_ood, best_name = results["vanilla"]["test_ood"], max(
        (n for n in results if n != "vanilla"), key=lambda n: results[n]["val_ood"])
    gain = results[best_name]["test_ood"] - vanilla_ood
    iid_change = results[best_name]["test_iid"] - results["vanilla"]["test_iid"]
    anti_change = results[best_name]["test_anti"] - results["vanilla"]["test_anti"]
    report.heading("Result")
    report.paragraph(
        f"The bundled model follows a marker in the image corner that predicted the first object's shape in "
        f"training. Masks were searched on val_ood only. On held-out test_ood the best validation strategy "
        f"({best_name}) changes mean-R by {gain:+.1f} points ({vanilla_ood:.1f} -> "
        f"{results[best_name]['test_ood']:.1f}); test_iid, where the cue is right, changes by {iid_change:+.1f} and "
        f"test_anti, where it is always wrong, by {anti_change:+.1f}. "
        + ("" if gain > 0 else "On this run ablation did not improve the held-out metric."), note=True)
    rows = [[name, *(results[name][s] for s in SPLITS), len(summary["ablated"][name]),
             ", ".join(summary["ablated"][name]) or "-"] for name in results]
    report.table(rows, ["mask", *SPLITS, "heads", "ablated heads (identity operator)"],
                 caption="mean-R (mean of R@1/5/10, both directions), percent")
    report.paragraph("; ".join(f"{s}: {n}" for s, n in SPLIT_NOTES.items()))

    report.heading("Single-head scan")
    report.figure(heatmap(deltas, "change of val_ood mean-R when one head is ablated", label="mean-R points"),
                  caption="red: ablating the head helps; blue: it hurts")
    deltas_test = torch.tensor(summary["single_head_delta_test_ood"])
    report.figure(_scatter(deltas, deltas_test), caption=f"correlation {summary['scan_val_test_correlation']:.2f}")
    report.figure(_bars_per_layer(summary, n_layers), caption="ablated heads per layer")
    report.figure(_curves(summary), caption="search curves")
    plt.close("all")

    report.heading("Do the ablated heads carry the planted cue?")
    report.paragraph(
        "Counterfactual groups render one scene with every marker colour, so only the cue changes inside a group. "
        "Each head's share is the part of that cue-driven change of the image embedding which the head writes "
        "directly (its decomposed contribution projected on the change); the shares of all terms sum to 1. "
        f"All heads together write {100 * summary['cue_share_all_heads']:.0f}% of it directly.")
    report.figure(heatmap(share, "direct share of the cue-driven embedding change", label="share"))
    ranks = {label: i + 1 for i, label in enumerate(
        head_label(*divmod(int(j), n_heads)) for j in share.flatten().argsort(descending=True))}
    rows = [[name, label, float(share[parse_head(label)]) * 100, ranks[label]]
            for name in results if name != "vanilla" for label in summary["ablated"][name]]
    report.table(rows, ["mask", "head", "cue share (%)", f"rank of {n_layers * n_heads}"])

    report.heading("Layer scan: cancelling attention (identity) layer by layer, caption selection on test_ood")
    first = summary["layer_scan"]
    report.table([[r["cancelled"], r["accuracy"], r["clip_score"], r["cosine"], r["selected_first"]] for r in first],
                 ["cancelled layers", "selection accuracy (%)", "CLIP score", "cosine", "caption picked (image 1)"])
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar([r["cancelled"] for r in first], [r["accuracy"] for r in first])
    ax.set_ylabel("selection accuracy (%)")
    ax.tick_params(axis="x", rotation=45)
    report.figure(fig)
    plt.close(fig)

    report.heading("What the heads do: TextSpan descriptions and Concept Consistency Score")
    scores = ccs.scores() if hasattr(ccs, "scores") else torch.zeros(n_layers, n_heads)
    report.figure(heatmap(scores.float(), "CCS (0..k)", cmap="viridis", center=False))
    plt.close("all")
    rows = [[c.head_label, c.label, c.ccs, " | ".join(c.descriptions)] for c in ccs.heads]
    report.table(rows, ["head", "concept", "CCS", "TextSpan descriptions (most variance first)"])
    report.heading("Timings")
    report.table([[k, v] for k, v in summary["timings_s"].items()], ["stage", "seconds"])
    return report.save(path)
