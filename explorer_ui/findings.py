"""What the measurements say, in one place: the variant controls' help and the Overview page quote it.

Every number here is copied from a result file under ``benchmarks/results/`` (named beside it) with
its set-up; nothing is computed at run time.  When a benchmark is re-run, update the text here.
"""

from __future__ import annotations

FIDELITY = "benchmarks/results/fidelity.md"  # SmolLM2-135M, 2,048-token pydoc pieces, k=64 unless said
VARIANTS = "benchmarks/results/accuracy.md"  # SmolLM2-135M, 4 × 1,024-token pydoc documents, k=64 (variants_k64)

# ---- the variant controls' help: what it does · what it costs · what was measured -----------------
SDC_HELP = {
    "exact": "Softmax denominator compensation with each row's exact dropped mass Σ e^(a−m) of the dropped "
             "elements, summed from the scores the θ compare computes anyway, so kept probabilities keep their "
             "dense values. Cost: one exp and one add per element; no extra memory traffic in decode. "
             f"Measured: +0.80% perplexity at 1/13.6 kept (k=64, {FIDELITY}). The default.",
    "offline": "The paper's SDC: a calibrated mean dropped mass C[layer, head, length] added to the denominator. "
               "Cost: a table lookup. Measured: +5.9% perplexity at 1/13.1 kept (k=64) — most of Top-θ's loss "
               f"comes from this term, because a row's real dropped mass varies as much as its kept count ({FIDELITY}).",
    "exp-threshold": "An upper bound on the dropped mass: |dropped| · e^(θ − m). Cost: a count per row. "
                     f"Measured with VMC: +21.9% perplexity (k=64, {VARIANTS}).",
    "none": "No compensation: kept probabilities are renormalised to sum to 1 (VMC then has nothing to do). "
            f"Measured: +3.3% perplexity at k=64 ({VARIANTS}).",
}
VMC_HELP = ("V-mean compensation: the weight SDC leaves unassigned goes to the mean of the row's visible V rows "
            "(a running sum in decode: O(d) per step). Needs SDC or post-softmax. Measured with exact SDC: +1.0% "
            f"perplexity with VMC, +4.2% without (k=64, {VARIANTS}).")
CAPK_HELP = ("Keep at most k survivors per row, the most recent first. Cost: a per-row rank. "
             f"Measured: +41% perplexity with offline SDC + VMC at k=64 ({VARIANTS}): it drops the strongest "
             "distant keys.")
FLOOR_HELP = ("What a row keeps when nothing passes θ: 'max' keeps its largest element (a tiled kernel honours it "
              "through the running max); 'none' keeps nothing (VMC then outputs the row's V mean). "
              f"On SmolLM2 at k=64 about 780 rows per 12k tokens are empty ({FIDELITY}).")
K_HELP = ("Target kept elements per row; rows with L ≤ k stay dense, so short prompts are untouched. Top-θ keeps "
          "the threshold set's per-layer (layers 0-1 at 512, as in the paper) and per-head k.")
PREFILL_HELP = ("Decode-only mode: 'dense' runs the prompt with the model's dense attention (its time to first "
                "token and the prompt's accuracy are dense's) and Top-θ only in decode steps, where it saves V "
                "reads. 'Top-θ' sparsifies the prompt too. See benchmarks/results/kernels.md for when to pick "
                "which.")
THETA_REFERENCE_HELP = ("row-max keeps what lies within a calibrated distance of each row's largest score: it "
                        "matched exact top-k's accuracy with 1.06-1.26× its kept elements where score > θ needed "
                        f"1.35-1.7× ({FIDELITY}). On CUDA the decode kernel applies it exactly (two launches, slower "
                        "than absolute θ: benchmarks/results/kernels.md); the tiled prefill cannot, so the prompt "
                        "runs the PyTorch path. Pre-softmax only.")
SELECTION_HELP = ("Top-θ keeps elements above a calibrated threshold (one compare, tile-able); top-k keeps the k "
                  "largest of each row (the paper's baseline; needs the whole row first); dense keeps all.")
PLACEMENT_HELP = ("Pre-softmax compares logits and renormalises over the kept set (SDC applies); post-softmax "
                  "compares dense probabilities and keeps them unnormalised. Top-θ uses the placement its "
                  "thresholds were calibrated for.")

# ---- the Overview page --------------------------------------------------------------------------
WHAT_IT_DOES = (
    "**Top-θ attention** (Berestizshevsky et al., arXiv 2502.08363) keeps an attention element only if its score "
    "beats a threshold θ calibrated per (layer, head, row length), then compensates numerically for what it "
    "dropped. Unlike top-k, the decision is one compare per element, with no row-wide sort, so a tiled GPU "
    "kernel can make it on the fly and, in decode, read only the V rows that survive. Calibration runs the "
    "model once on a few dozen texts; inference only reads the resulting thresholds."
)
KEY_FINDINGS = [
    ("The paper's offline SDC term causes most of Top-θ's loss; exact SDC fixes it.",
     "At k=64 on 2,048-token documents: offline SDC +5.9% perplexity at 1/13.1 kept; exact SDC + VMC +0.80% at "
     f"1/13.6 and +0.98% at 1/15.0 — better than exact top-k's +2.9% at 1/16.3 ({FIDELITY})."),
    ("Against top-k with the same compensation, a static θ still keeps 1.3-1.5× the elements for equal KL.",
     "The per-row kept count of one θ varies (p10 0.36·k, p90 2.3·k). θ relative to each row's maximum closes most "
     f"of that gap (1.06-1.26× top-k); the decode kernel runs it exactly, the prefill only on the PyTorch path "
     f"({FIDELITY})."),
    ("Multiple choice at full size: within 1 point of dense at 5-6× fewer prefill elements.",
     "ARC-Easy (545 items) and HellaSwag (990): −0.4 / −1.0 points; at about 10× both Top-θ and exact top-k lose "
     "about a point (benchmarks/results/mc_large.md)."),
    ("Thresholds transfer across data.",
     f"Calibrated on code, evaluated on pydoc: +1.79% vs +1.62% in-domain; kept fractions equal ({VARIANTS})."),
]
WHERE_TO_START = [
    ("calibrate", "Calibrate", "Calibrate thresholds on bundled text or your own upload (runs in the background)."),
    ("thresholds", "Thresholds", "θ against row length per head; change σ and save it as a new set."),
    ("sparsity", "Sparsity", "What each layer and head keeps for one prompt."),
    ("accuracy", "Accuracy", "Dense vs Top-θ on tasks, live per item; several variants side by side."),
    ("compare", "Compare", "Dense and Top-θ generations side by side."),
    ("kernels", "Kernels", "Measured GPU speed of the Triton kernels."),
    ("runs", "Runs", "Rename, delete, import and download threshold sets; export saved results as CSV."),
]
