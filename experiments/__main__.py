"""
`python -m experiments MODE ...`: the studies' command line (run from the repository's root).

    python -m experiments --all DIR          # every run behind the results, then their tables and figures
    python -m experiments --ranking out/ranking_0/ckpt.pt out/ranking_1/ckpt.pt out/ranking_2/ckpt.pt
    python -m experiments --pool-ranking a_points.json b_points.json
    python -m experiments --direction-probe out/clip/ckpt.pt out/video_ctx/ckpt.pt
"""
import argparse
import json

import torch

from data import DataError
from experiments.points import (fused_attention_probe, method_points, pool_ranking, probe_markdown, ranking_markdown,
                                ranking_points, tome_sweep)
from experiments.reproduce import elip_table_of_folder, reproduce_all
from experiments.video import PROBE_STEPS, direction_markdown, direction_probe_checkpoints, video_paired, video_runs



def print_and_save(table: str, out: str):
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments",
                                description="Our studies: every run and table behind docs/results.md (--all), "
                                            "accuracy against cost, the Patch Ranking table, the probes.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="", help="also write the Markdown table to this file")
    p.add_argument("--tome-sweep", metavar="CKPT", default="",
                   help="instead: accuracy, images/s and GFLOPs of ToMe off the shelf on this CLIP checkpoint for "
                        "r = 0, 2, ..., 10, written as JSON to --points (for viz.py --tradeoff)")
    p.add_argument("--method-points", metavar="DIR", default="",
                   help="instead: accuracy, images/s and GFLOPs of none / ELIP / EViT (3 seeds each) and ToMe off "
                        "the shelf on the none runs, from the runs of --all DIR, written as JSON to --points")
    p.add_argument("--ranking", nargs="+", metavar="CKPT", default=[],
                   help="instead: the Patch Ranking table (unpruned, random, [CLS] attention, ToMe at equal FLOPs, "
                        "golden oracle, predictor, predictor + tokens) from --method ranking checkpoints of one CLIP")
    p.add_argument("--pool-ranking", nargs="+", metavar="POINTS", default=[],
                   help="instead: the differences from ToMe of the --points files of `--ranking` runs on different "
                        "CLIPs (each its own test images), side by side and pooled by inverse variance")
    p.add_argument("--fused-probe", metavar="CKPT", default="",
                   help="instead: R@1 of this CLIP pruned at inference at ELIP's schedule, by ELIP / EViT / random / "
                        "ground-truth object scores, the fused token attending as one token or proportionally")
    p.add_argument("--direction-probe", nargs="+", metavar="CKPT", default=[],
                   help="instead: how well small readers name a video clip's direction of motion from the ViT tokens "
                        "of a CLIP (all frames, frame averaging, the temporal contextualizer + averaging) or through "
                        "the contextualizer of a video captioner (frozen)")
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS,
                   help="with --direction-probe: training steps per reader (its training clips: the first 4 x --n-test)")
    p.add_argument("--elip-table", metavar="DIR", default="",
                   help="instead: the ELIP/EViT-against-none table (all tokens and pruned) of the runs DIR/NAME_S, "
                        "S = 0, 1, 2, NAME none (required), elip, evit, ... as --all names them")
    p.add_argument("--video-paired", nargs="+", metavar="CKPT", default=[],
                   help="instead: pairs A B [A B ...] of video captioners of one seed, each pair on the same test "
                        "clips: their motion accuracy, one-mover direction and CIDEr-D, and A - B clip by clip with "
                        "95%% bootstrap intervals, a row per pair")
    p.add_argument("--video-runs", nargs="+", metavar="CKPT", default=[],
                   help="instead: a row per video captioner (seed, steps, temporal model, bridge positions as "
                        "trained): CIDEr-D, BLEU-4, the motion measures, one-mover clips on the right axis, gates")
    p.add_argument("--no-oracle", action="store_true", help="with --ranking: skip the (slow) golden-oracle row")
    p.add_argument("--points", default="points.json")
    p.add_argument("--n-test", type=int, default=1000, help="with --tome-sweep / --method-points / --fused-probe / --ranking / --elip-table / "
                                                                  "--video-paired / --video-runs: test gallery (or clips) size")
    p.add_argument("--all", metavar="DIR", default="",
                   help="instead: every run behind docs/RESULTS.md, then its tables (DIR/results.md) and "
                        "figures (DIR/*.png); finished runs are kept, so an interrupted --all continues")
    p.add_argument("--quick", action="store_true", help="with --all: tiny models, a few steps (checks the pipeline)")
    args = p.parse_args(argv)
    if args.all:
        print(reproduce_all(args.all, args.quick))
        return
    if args.elip_table:
        print_and_save(elip_table_of_folder(args.elip_table, args.n_test), args.out)
        return
    if args.fused_probe:
        table = probe_markdown(fused_attention_probe(args.fused_probe, args.n_test, args.device))
        print_and_save(table, args.out)
        return
    if args.direction_probe:
        table = direction_markdown(direction_probe_checkpoints(args.direction_probe, args.probe_steps, args.n_test,
                                                               args.device))
        print_and_save(table, args.out)
        return
    if args.video_paired:
        print_and_save(video_paired(args.video_paired, args.n_test, args.device), args.out)
        return
    if args.video_runs:
        print_and_save(video_runs(args.video_runs, args.n_test, args.device), args.out)
        return
    if args.pool_ranking:
        print_and_save(pool_ranking(args.pool_ranking), args.out)
        return
    if args.ranking:
        points = ranking_points(args.ranking, args.n_test, args.device, oracle=not args.no_oracle)
        with open(args.points, "w") as f:
            json.dump(points, f, indent=1)
        table = ranking_markdown(points)
        print_and_save(table, args.out)
        return
    if args.tome_sweep or args.method_points:
        kw = dict(n_test=args.n_test, device=args.device)
        points = tome_sweep(args.tome_sweep, **kw) if args.tome_sweep else method_points(args.method_points, **kw)
        with open(args.points, "w") as f:
            json.dump(points, f, indent=1)
        for pt in points:
            print(f"{pt['name']:<14} mean R@1 {pt['accuracy']:5.1f} | {pt['img_s']:7.0f} img/s | {pt['gflops']:.3f} GFLOPs")
        return
    p.error("choose a mode (see --help)")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # a missing or unreadable checkpoint: one sentence, not a traceback
        raise SystemExit(f"error: {e}") from None
