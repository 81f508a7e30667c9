"""The demo's HTML report: tables and matplotlib figures from the summary, in one self-contained file; every figure
is also written as a PNG beside the report (``fig_<name>.png``), with alt text and a caption."""

from __future__ import annotations

from pathlib import Path

import torch

from clipheads.explain.plots import ccs_figure
from clipheads.heads import head_label, parse_head
from clipheads.report import Report
from clipheads.report.figures import heads_heatmap, new_figure
from clipheads.search.plots import head_effects_figure

SPLITS = ("val_ood", "test_ood", "test_iid", "test_anti")
SPLIT_NOTES = {"val_ood": "search split, cue random", "test_ood": "held out, cue random",
               "test_iid": "held out, cue as in training", "test_anti": "held out, cue always wrong"}


def heatmap(values: torch.Tensor, title: str, label: str = ""):
    """A layers x heads heat map of non-negative values (e.g. shares) on a sequential scale from 0, values written in
    the cells (:func:`clipheads.report.figures.heads_heatmap`)."""
    n_layers, n_heads = values.shape
    top = float(values.max()) if float(values.max()) > 0 else 1.0
    fig, _, _, _ = heads_heatmap(values, (1.4 + 0.6 * n_heads, 0.9 + 0.45 * n_layers), title, label,
                                 scale={"cmap": "Purples", "vmin": min(0.0, float(values.min())), "vmax": top},
                                 fmt=lambda value: f"{value:.2f}",
                                 text_color=lambda value, _: "white" if value > 0.6 * top else "black")
    return fig


def selection_chance(layer_scan: list[dict]) -> float:
    """Chance accuracy (%) of caption selection: the mean over images of 1 / number of candidates (each row of the
    layer scan holds every image's candidate logits)."""
    logits = layer_scan[0]["logits"]
    return 100 * sum(1 / len(candidates) for candidates in logits) / len(logits)


def _bars_per_layer(summary: dict, n_layers: int):
    fig = new_figure((6, 3))
    ax = fig.add_subplot()
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
    fig = new_figure((10, 3))
    left, right = fig.subplots(1, 2)
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
    fig = new_figure((4.2, 4))
    ax = fig.add_subplot()
    ax.scatter(deltas.flatten(), deltas_test.flatten(), s=12)
    ax.axhline(0, color="#999", lw=0.8)
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_xlabel("change of mean-R on val_ood")
    ax.set_ylabel("change of mean-R on test_ood")
    ax.set_title("single-head ablation: validation vs test")
    return fig


def write_report(path: str | Path, summary: dict, deltas: torch.Tensor, share: torch.Tensor, ccs,
                 atlas: str | None = None) -> Path:
    """Write the report to ``path`` and its figures beside it; ``atlas``: the head atlas's file name beside the
    report (``atlas.html``), linked from the report if given."""
    n_layers, n_heads = deltas.shape
    folder = Path(path).parent
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
    marked = {name: heads for name, heads in summary["ablated"].items() if name != "vanilla"}
    helpful = int((deltas > 0).sum())
    figure(report, folder, head_effects_figure(deltas, "change of val_ood mean-R when one head is ablated",
                                       label="mean-R points (two-slope scale centred at 0)", marked=marked),
           "head_effects",
           caption=f"Change of val_ood mean-R (points) when one head is ablated alone; red: ablating the head helps "
                   f"({helpful} of {n_layers * n_heads} heads), blue: it hurts. Each sign has its own colour scale "
                   f"(centred at 0), so small gains stay visible beside large losses. Outlines: the heads each "
                   f"search ablated ({'; '.join(f'{n}: {len(h)}' for n, h in marked.items())}).",
           alt=f"Heat map, {n_layers} layers by {n_heads} heads, of the change of val_ood mean-R when each head is "
               f"ablated alone, values written in the cells; heads ablated by the searches are outlined: "
               + "; ".join(f"{n}: {', '.join(h) or 'none'}" for n, h in marked.items()) + ".")
    deltas_test = torch.tensor(summary["single_head_delta_test_ood"])
    correlation = summary["scan_val_test_correlation"]
    figure(report, folder, _scatter(deltas, deltas_test), "scan_val_vs_test",
           caption=f"Single-head effects on val_ood (search split) against held-out test_ood: correlation "
                   f"{correlation:.2f}, so the scan transfers.",
           alt=f"Scatter plot of each head's change of mean-R on val_ood (x) against test_ood (y), "
               f"{n_layers * n_heads} points, correlation {correlation:.2f}.")
    figure(report, folder, _bars_per_layer(summary, n_layers), "heads_per_layer",
           caption="Ablated heads per layer, for each search strategy.",
           alt="Grouped bar chart of the number of heads each search strategy ablated in each layer.")
    figure(report, folder, _curves(summary), "search_curves",
           caption="Search curves: AAT-GA best and mean fitness per generation (left), AAT-BP training loss per "
                   "epoch (right).",
           alt="Two line charts: AAT-GA fitness over generations and AAT-BP loss over epochs.")

    report.heading("Do the ablated heads carry the planted cue?")
    report.paragraph(
        "Counterfactual groups render one scene with every marker colour, so only the cue changes inside a group. "
        "Each head's share is the part of that cue-driven change of the image embedding which the head writes "
        "directly (its decomposed contribution projected on the change); the shares of all terms sum to 1. "
        f"All heads together write {100 * summary['cue_share_all_heads']:.0f}% of it directly.")
    top = head_label(*divmod(int(share.flatten().argmax()), n_heads))
    figure(report, folder, heatmap(share, "direct share of the cue-driven embedding change", label="share (0-1)"),
           "cue_share",
           caption=f"Each head's direct share (0-1) of the cue-driven change of the image embedding; the largest is "
                   f"{top} ({float(share.max()):.2f}).",
           alt=f"Heat map, {n_layers} layers by {n_heads} heads, of each head's share of the cue-driven embedding "
               f"change, values in the cells; largest {top}.")
    ranks = {label: i + 1 for i, label in enumerate(
        head_label(*divmod(int(j), n_heads)) for j in share.flatten().argsort(descending=True))}
    rows = [[name, label, float(share[parse_head(label)]) * 100, ranks[label]]
            for name in results if name != "vanilla" for label in summary["ablated"][name]]
    report.table(rows, ["mask", "head", "cue share (%)", f"rank of {n_layers * n_heads}"])

    report.heading("Layer scan: cancelling attention (identity) layer by layer, caption selection on test_ood")
    first = summary["layer_scan"]
    chance = summary.get("selection_chance", selection_chance(first))
    report.table([[r["cancelled"], r["accuracy"], r["clip_score"], r["cosine"], r["selected_first"]] for r in first]
                 + [["chance", chance, "", "", ""]],
                 ["cancelled layers", "selection accuracy (%)", "CLIP score", "cosine", "caption picked (image 1)"],
                 caption=f"caption selection among each image's candidates; chance = mean of 1 / number of "
                         f"candidates = {chance:.1f}%")
    fig = new_figure((7, 3))
    ax = fig.add_subplot()
    ax.bar([r["cancelled"] for r in first], [r["accuracy"] for r in first])
    ax.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.1f}%")
    ax.set_xlabel("cancelled layers")
    ax.set_ylabel("selection accuracy (%)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    figure(report, folder, fig, "layer_scan",
           caption=f"Caption-selection accuracy on test_ood with the attention of each layer (range) replaced by the "
                   f"identity; dotted line: chance ({chance:.1f}%).",
           alt="Bar chart of caption-selection accuracy per cancelled layer or layer range, with the unablated "
               f"model first and a dotted chance line at {chance:.1f}%.")

    report.heading("What the heads do: TextSpan descriptions and Concept Consistency Score")
    scores = ccs.scores() if hasattr(ccs, "scores") else torch.zeros(n_layers, n_heads)
    k = int(getattr(ccs, "k", summary["config"].get("k", 5)))
    report.paragraph(judge_sentence(ccs, k))
    figure(report, folder, ccs_figure(scores.float(), k, f"CCS (0..{k})", marked=sorted({h for v in marked.values()
                                                                                  for h in v})),
           "ccs",
           caption=f"Concept Consistency Score of each described head on the fixed range 0..{k} (grey: not "
                   f"described); red outlines: heads ablated by any search.",
           alt=f"Heat map, {n_layers} layers by {n_heads} heads, of CCS from 0 to {k}, scores written in the cells, "
               "heads ablated by a search outlined.")
    rows = [[c.head_label, c.label, c.ccs, " | ".join(c.descriptions)] for c in ccs.heads]
    report.table(rows, ["head", "concept", "CCS", "TextSpan descriptions (most variance first)"])
    if atlas is not None:
        report.heading("Head atlas")
        report.link(atlas, atlas, before="Browse every head (grid coloured by scan effect, CCS or cue share; per head "
                    "its TextSpan texts, concept label, top images, spatial and attention maps) in the head atlas: ",
                    after=f" (one self-contained page beside this report, {summary.get('atlas_images', 'a few')} "
                          "val_ood images).")
    report.heading("Timings")
    report.table([[k, v] for k, v in summary["timings_s"].items()], ["stage", "seconds"])
    return report.save(path)


def figure(report: Report, folder: Path, fig, name: str, caption: str, alt: str) -> None:
    """Add ``fig`` to ``report`` with its caption and alt text, and write it as ``folder/fig_<name>.png``."""
    report.figure(fig, caption=caption, alt=alt, png=folder / f"fig_{name}.png")


def judge_sentence(ccs, k: int) -> str:
    """Which judge scored the descriptions, and how well it separated the calibration texts (from ``ccs.meta``)."""
    judges = list(getattr(ccs, "judges", []))
    calibration = getattr(ccs, "meta", {}).get("calibration", {})
    parts = []
    for name in judges:
        measured = calibration.get(name)
        if measured:
            parts.append(f"judge {name!r} (the model's own text tower against concept prototypes, threshold "
                         f"{measured['threshold']:.4f}; balanced accuracy {measured['balanced_accuracy']:.2f} on "
                         f"{measured['n_positive']} positive and {measured['n_negative']} negative held-out "
                         "calibration pairs of the default text pool)")
        else:
            parts.append(f"judge {name!r} (no calibration measured)")
    labeler = getattr(ccs, "labeler", "")
    return (f"CCS counts how many of a head's {k} TextSpan descriptions the judges find consistent with its concept "
            f"label{f' (labeler {labeler!r})' if labeler else ''}. Scored by " + ("; ".join(parts) or "no judge")
            + ". Its accuracy bounds how far a single head's CCS can be trusted.")
