"""PTB results table: dense baseline vs MoE models at equal ops/timestep.

`python -m benchmarks.lm_table [--epochs N] [--out DIR]` trains, the same
way on the full Penn Treebank, the dense baseline ("MoE-1-Wide") and MoE
language models with 4, 16, 64 and 256 experts (k=2) and a hierarchical
MoE (8 groups of 8, k=2 per level, so 4 experts per position with half the
hidden units: the same expert multiply-adds), and writes
`benchmarks/results/lm_table.md` and `.json`.
"""

import argparse
import json
import os
import sys

from benchmarks.run import RESULTS, machine_description

CONFIGS = [
    ("dense", ["--experts", "0"]),
    ("MoE-4", ["--experts", "4"]),
    ("MoE-16", ["--experts", "16"]),
    ("MoE-64", ["--experts", "64"]),
    ("MoE-256", ["--experts", "256"]),
    ("MoE-64-h", ["--experts", "64", "--hierarchical", "8", "--hidden-units", "128"]),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="runs/lm_table")
    parser.add_argument("--only", help="comma-separated config names")
    args, extra = parser.parse_known_args(argv)
    os.environ.setdefault("KERAS_MOE_QUIET", "1")
    from keras_moe import train

    common = [
        "--preset", "ptb", "--model-dim", "128", "--hidden-units", "256",
        "--k", "2", "--dropout", "0.2", "--epochs", str(args.epochs),
        "--verbose", "2",
    ] + extra
    rows = []
    for name, options in CONFIGS:
        if args.only and name not in args.only.split(","):
            continue
        print(f"=== {name}", flush=True)
        (row,) = train.run(common + options + ["--out", os.path.join(args.out, name)])
        row["name"] = name
        rows.append(row)
        write_table(rows, args, common, argv)


def write_table(rows, args, common, argv):
    """Writes the rows so far (a long run keeps what it has finished)."""
    command = "python -m benchmarks.lm_table " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f"PTB word-level language models, up to {args.epochs} epochs each "
        "(learning rate halved when validation perplexity stalls, stopped "
        "after 2 epochs without improvement, best-validation weights kept), "
        f"trained identically (`{' '.join(common)}`), on "
        f"{machine_description()}. Command: `{command.strip()}`.",
        "",
        "| model | parameters | ops/timestep | epochs | valid ppl | test ppl | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['parameters']:,} | {row['ops_per_timestep']:,} "
            f"| {row['epochs_trained']} "
            f"| {row['valid_perplexity']:.1f} | {row['test_perplexity']:.1f} "
            f"| {row['train_seconds']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "lm_table.md"), "w") as handle:
        handle.write(table)
    with open(os.path.join(RESULTS, "lm_table.json"), "w") as handle:
        json.dump(
            [{k: v for k, v in row.items()
              if k not in ("config", "routing", "saved_model")}
             for row in rows],
            handle, indent=2,
        )
    print(table)


if __name__ == "__main__":
    main()
