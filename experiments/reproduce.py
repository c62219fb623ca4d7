"""
`python -m experiments --all DIR`: every run behind docs/results.md, then its tables and figures.
The runs are listed in `all_runs` (train.py's flags, so each table names the options it used).
Studies of ours: not on the reading path.
"""
import json
import statistics
import time

import torch

import train
from checkpoint import read_checkpoint
from data import DataError


# ----------------------------------------------------------------------------------------------
# --all: every run behind docs/RESULTS.md, its tables and figures, end to end

QUICK = ["--model-kwargs", "width=32,depth=6,heads=2,text_width=32,text_depth=1,embed_dim=16,lm_width=32",
         "--train-size", "64", "--test-size", "20", "--warmup", "2", "--batch-size", "8"]
OURS = ["--fused-prop-attn", "--rollout"]  # ELIP with both additions of ours
PRUNING_RUNS = {"none": ("none", []), "elip": ("elip", OURS),
                "elip_last_row": ("elip", ["--fused-prop-attn"]),
                "evit": ("evit", ["--fused-prop-attn"]),  # name: (method, extra flags)
                "elip_paper": ("elip", []),
                "evit_paper": ("evit", [])}
PRUNING_NAMES = {"none": "`none`",
                 "elip": "`elip --fused-prop-attn --rollout` (ours: proportional attention and rollout)",
                 "elip_last_row": "`elip --fused-prop-attn` (proportional attention; the last block's row, as published)",
                 "elip_paper": "`elip` as published",
                 "evit": "`evit --fused-prop-attn` (ours: the fused token with proportional attention)",
                 "evit_paper": "`evit` as published"}
RANKING_STEPS = 300  # the learnable tokens' training steps in the Patch Ranking runs of docs/RESULTS.md
RANKING_RUNS = {"ranking": [], "ranking_fuse": ["--rank-fuse"]}  # the pruned patches dropped (the paper) / fused
CAPTIONERS_RUN = {"evlgen": ["--bridge-merge", "wavg"], "nomerge": ["--bridge-r", "0"], "query1": ["--bridge", "query"],
                  "query2": ["--bridge", "query", "--stage1-steps", "{stage1}"]}

LM_STEPS = 2000  # the frozen LMs': enough to learn to use their context (450 are not)
VIDEO_STEPS, VIDEO_BATCH, VIDEO_SEEDS = 2000, 64, (0,)  # the video captioners' (their LM: LM_STEPS of 128)
# All three with bridge positions: without them the merging bridge sees a set of tokens, and a
# captioner on a contextualizer that carries the direction did not word it.
VIDEO_RUNS = {"video_avg": ["--bridge-merge", "wavg", "--bridge-pos", "--no-temporal"],
              "video_ctx": ["--bridge-merge", "wavg", "--bridge-pos", "--frame-embed", "--temporal-lr-scale", "10"]}
VIDEO_NAMES = {"video_avg": "frame averaging only (the ViT untouched; `--no-temporal --bridge-pos --bridge-merge wavg`)",
               "video_ctx": "+ temporal contextualizer (`--frame-embed --temporal-lr-scale 10 --bridge-pos --bridge-merge wavg`)"}


def all_runs(root: str, quick: bool) -> dict:
    """name -> train.py arguments of every run docs/RESULTS.md's tables come from (quick: tiny models
    and a few steps, to check the pipeline, not the figures)."""
    q = QUICK if quick else []
    steps = (lambda n: ["--steps", "3"]) if quick else (lambda n: ["--steps", str(n)])
    runs = {"clip": q + steps(450), "lm": ["--method", "lm"] + q + steps(LM_STEPS)}
    for name, (method, extra) in PRUNING_RUNS.items():
        for seed in (0, 1, 2):
            runs[f"{name}_{seed}"] = (["--method", method, "--objectives", "itc,itm,mlm", "--seed", str(seed)] + q
                                      + steps(300) + extra)
    cap = ["--method", "evlgen", "--lm", f"{root}/lm/ckpt.pt", "--clip", f"{root}/clip/ckpt.pt", "--eval-every",
           "1" if quick else "25"] + q + steps(300)  # each curve point on 500 test images
    for seed in (0, 1):
        for name, extra in CAPTIONERS_RUN.items():
            runs[f"{name}_{seed}"] = cap + ["--seed", str(seed)] + [e.format(stage1=3 if quick else 300) for e in extra]
    runs["lm_video"] = ["--method", "lm", "--video"] + q + steps(LM_STEPS)
    for seed in VIDEO_SEEDS:
        for name, extra in VIDEO_RUNS.items():
            runs[f"{name}_{seed}"] = (["--method", "evlgen", "--video", "--lm", f"{root}/lm_video/ckpt.pt", "--clip",
                                       f"{root}/clip/ckpt.pt", "--seed", str(seed)] + q + steps(VIDEO_STEPS) + extra
                                      + ([] if quick else ["--batch-size", str(VIDEO_BATCH)]))
    for name, extra in RANKING_RUNS.items():  # Patch Ranking on the default CLIP: one search, three predictors and token sets
        for seed in (0, 1, 2):
            runs[f"{name}_{seed}"] = (["--method", "ranking", "--init", f"{root}/clip/ckpt.pt", "--seed", str(seed)] + steps(RANKING_STEPS) + extra
                                      + (QUICK[-8:] + ["--rank-images", "10", "--predictor-steps", "3"] if quick else []))
    return {name: args + ["--out", f"{root}/{name}", "--overwrite"] for name, args in runs.items()}


# --all --quick runs each script's main() in this interpreter instead of a new process: at toy size
# Python's and torch's start-up (about 1.7 s on 2 CPU cores) is half of every call, and the test
# suite makes 81 of them. The full --all keeps a process per call, so no run's memory or state
# can reach the next.
IN_PROCESS = False


def run_logged(cmd: list, log_path: str, what: str):
    """Run a script of the repository (cmd = ["train.py", *args]; ["experiments", *args] is
    `python -m experiments`), its output to log_path; stop naming the run and the log if it fails."""
    import subprocess
    import sys
    with open(log_path, "w") as log:
        if IN_PROCESS:
            code = run_in_process(cmd, log)
        else:
            script = ["-m", "experiments"] if cmd[0] == "experiments" else cmd[:1]
            code = subprocess.run([sys.executable, *script, *cmd[1:]], stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"error: {what} failed (exit {code}); its output is in {log_path}")


def run_in_process(cmd: list, log) -> int:
    """cmd's script's main(args) here, stdout and stderr to log; the exit code its process would give."""
    import contextlib
    import importlib
    import sys
    import traceback
    module = importlib.import_module("experiments.__main__" if cmd[0] == "experiments" else cmd[0].removesuffix(".py"))
    argv, sys.argv = sys.argv, list(cmd)  # argparse names the script in its messages from sys.argv[0]
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            module.main(cmd[1:])
        except SystemExit as e:  # argparse, or a script's one-sentence error
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(e.code, file=log)
            return 1
        except DataError as e:  # as the scripts' __main__ says it
            print(f"error: {e}", file=log)
            return 1
        except Exception:  # a process would print the traceback and exit 1
            traceback.print_exc(file=log)
            return 1
        finally:
            sys.argv = argv
    return 0


CAPTIONER_NAMES = {"evlgen": "EVLGen (merge, r = 16, --bridge-merge wavg)", "nomerge": "(a) no merging",
                   "query1": "(b) learned queries, one stage", "query2": "(c) learned queries, two stages"}


def captioner_table(root: str, seeds=(0, 1)) -> str:
    """Markdown: the captioners of --all, one row per seed — final metrics (the last evaluation of
    each log), training time, and the time each first reached the two-stage baseline's (c) final
    CIDEr-D on its curve — then the CIDEr-D curves side by side, seed by seed ((c) counted from the
    start of its LM loss)."""
    import captioning
    logs = {(n, s): [json.loads(line) for line in open(f"{root}/{n}_{s}/log.jsonl")] for n in CAPTIONERS_RUN
            for s in seeds}
    curves = {k: captioning.read_curve(f"{root}/{k[0]}_{k[1]}/log.jsonl", "cider_d") for k in logs}
    rows = ["| captioner | seed | BLEU-4 | CIDEr-D | Q&A acc. | training time | time to reach (c)'s final CIDEr-D "
            "| share of (c)'s total |", "|---|---|---|---|---|---|---|---|"]
    for name, label in CAPTIONER_NAMES.items():
        for s in seeds:
            last = [r for r in logs[name, s] if "eval" in r][-1]
            stage1 = [r["time"] for r in logs[name, s] if "itc" in r]
            target, total = curves["query2", s][-1][2], curves["query2", s][-1][1]
            reach = captioning.time_to_reach(curves[name, s], target)
            m = last["eval"]
            rows.append(f"| {label if s == seeds[0] else ''} | {s} | {100 * m['bleu4']:.1f} | {100 * m['cider_d']:.1f}"
                        f" | {100 * m['vqa_accuracy']:.1f} | {last['time']:.0f} s"
                        + (f" (stage 1: {stage1[-1]:.0f} s)" if stage1 else "")
                        + (" | never | — |" if reach is None else f" | {reach:.0f} s | {reach / total:.2f} |"))
    targets = ", ".join(f"{100 * curves['query2', s][-1][2]:.1f} for seed {s}" for s in seeds)
    steps = sorted({st for (n, _), c in curves.items() if n != "query2" for st, _, _ in c})
    stage1_steps = {s: max([r["step"] for r in logs["query2", s] if "itc" in r], default=0) for s in seeds}
    head = ["", f"(c)'s final CIDEr-D: {targets}. CIDEr-D along the curves (seed " + " / ".join(map(str, seeds))
            + "; steps of the LM loss):", "", "| captioner | " + " | ".join(map(str, steps)) + " |",
            "|---|" + "---|" * len(steps)]
    for name, label in CAPTIONER_NAMES.items():
        cells = []
        for st in steps:
            vals = [[v for at, _, v in curves[name, s] if at == st + (stage1_steps[s] if name == "query2" else 0)]
                    for s in seeds]
            cells.append(" / ".join(f"{100 * v[0]:.0f}" if v else "—" for v in vals))
        head.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows + head)


def elip_table(root: str, n_test: list, names=tuple(PRUNING_NAMES)) -> str:
    """Markdown: R@1 of the ITC+ITM+MLM runs ROOT/NAME_S of --all (3 seeds each), evaluated with all
    tokens and with the pruning each trained with, and the gap of the pruned mean R@1 to `none`'s."""
    rows = ["| run | i2t R@1, all tokens | t2i R@1, all tokens | i2t R@1, pruned | t2i R@1, pruned | "
            "zero-shot top-1, all tokens | mean R@1, pruned, minus none's |", "|---|---|---|---|---|---|---|"]
    cell = lambda m, k: f"{100 * m[k]['mean']:.1f} ± {100 * m[k]['std']:.1f}" if m else "—"
    mean_r1 = lambda m: 50 * (m["image_to_text_R@1"]["mean"] + m["text_to_image_R@1"]["mean"])
    baseline = None
    for name in names:
        label, ckpts = PRUNING_NAMES[name], [f"{root}/{name}_{seed}/ckpt.pt" for seed in (0, 1, 2)]
        full = eval_json(["--ckpt", *ckpts, *n_test], root, f"eval_{name}")["mean"]
        pruned = eval_json(["--ckpt", *ckpts, "--prune", *n_test], root, f"eval_{name}_prune")["mean"] \
            if name != "none" else None
        baseline = mean_r1(full) if name == "none" else baseline
        gap = f"{mean_r1(pruned) - baseline:+.1f}" if pruned else "—"
        rows.append(f"| {label} | {cell(full, 'image_to_text_R@1')} | {cell(full, 'text_to_image_R@1')} | "
                    f"{cell(pruned, 'image_to_text_R@1')} | {cell(pruned, 'text_to_image_R@1')} | "
                    f"{cell(full, 'zeroshot_top1')} | {gap} |")
    return "\n".join(rows)


def elip_table_of_folder(root: str, n_test: int) -> str:
    """--elip-table DIR: the table above for the runs DIR holds (none_S, and any of the other names
    of --all, S = 0, 1, 2), trained outside --all at some other budget. Stops unless `none` is
    there and every run trained for the same number of steps."""
    import os
    present = [n for n in PRUNING_NAMES if all(os.path.exists(f"{root}/{n}_{s}/ckpt.pt") for s in (0, 1, 2))]
    if "none" not in present:
        raise SystemExit(f"error: --elip-table {root}: needs none_0, none_1 and none_2 (DIR/none_S/ckpt.pt), "
                         "the baseline every gap is measured against")
    steps = {f"{n}_{s}": train.TrainConfig.from_checkpoint(read_checkpoint(f"{root}/{n}_{s}/ckpt.pt")).steps
             for n in present for s in (0, 1, 2)}
    if len(set(steps.values())) > 1:
        raise SystemExit(f"error: --elip-table {root}: the runs trained for different numbers of steps "
                         f"({', '.join(f'{k} {v}' for k, v in steps.items())}); the table compares equal budgets")
    return (f"{len(present)} runs x 3 seeds, {steps['none_0']} steps each, {n_test}-image gallery\n\n"
            + elip_table(root, ["--n-test", str(n_test)], present))


RELEVANCE_MODELS = {"none": "trained with `--method none`", "elip": "trained with `--method elip --fused-prop-attn --rollout`",
                    "elip_last_row": "trained with `--method elip --fused-prop-attn`"}
SCORINGS = {"elip": "ELIP (look-ahead, text, scored as the model trained; `none`: rollout)",
            "elip_no_text": "ELIP without the text (lambda 1)", "elip_no_rollout": "ELIP, the last block's row alone",
            "elip_no_lookahead": "ELIP without look-ahead", "evit_scoring": "EViT's ([CLS] attention of the previous block)",
            "random": "random"}


def relevance_markdown(root: str, n: int = 500) -> str:
    """Markdown: token relevance (object coverage after each ELIP stage) of the none / elip /
    elip --fused-prop-attn runs of --all, mean ± std over their 3 seeds, for every scoring."""
    rows = ["| model (3 seeds) | kept tokens chosen by | stage 1 | stage 2 | stage 3 |", "|---|---|---|---|---|"]
    steering = []
    for model, label in RELEVANCE_MODELS.items():
        ckpts = [f"{root}/{model}_{seed}/ckpt.pt" for seed in (0, 1, 2)]
        runs = eval_json(["--ckpt", *ckpts, "--relevance", "--n-test", str(n)], root, f"relevance_{model}")["runs"]
        for name, scoring in SCORINGS.items():
            if name not in runs[0]["token_relevance"]:
                continue
            c = torch.tensor([r["token_relevance"][name]["coverage"] for r in runs]) * 100  # (seeds, stages)
            cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(c.mean(0).tolist(), c.std(0).tolist()))
            rows.append(f"| {label if name == 'elip' else ''} | {scoring} | {cells} |")
        steering.append((label, runs))
    return "\n".join(rows) + "\n\n" + steering_markdown(steering)


def steering_markdown(models: list) -> str:
    """Markdown: text steering (relevance.text_steering) of each model's runs, (label, runs) pairs: the
    named object's coverage, the other object's, and the gap, per stage, mean ± std over the seeds."""
    rows = ["| model (3 seeds) | kept tokens chosen by | stage 1: named / other | stage 2: named / other | "
            "stage 3: named / other | gap (named minus other), stages 1 / 2 / 3 |", "|---|---|---|---|---|---|"]
    for label, runs in models:
        for name in ("elip", "elip_no_text"):
            named, other = (torch.tensor([r["text_steering"][name][side] for r in runs]) * 100 for side in ("named", "unnamed"))
            gap = named - other  # (seeds, stages)
            cells = " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(named.mean(0).tolist(), other.mean(0).tolist()))
            gaps = " / ".join(f"{m:+.1f} ± {s:.1f}" for m, s in zip(gap.mean(0).tolist(), gap.std(0).tolist()))
            rows.append(f"| {label if name == 'elip' else ''} | {SCORINGS[name]} | {cells} | {gaps} |")
    return "\n".join(rows)


def eval_json(args: list, root: str, name: str) -> dict:
    run_logged(["eval.py", "--json", *args], f"{root}/{name}.json", f"eval.py {' '.join(args)}")
    with open(f"{root}/{name}.json") as f:
        return json.loads(f.read().strip().splitlines()[-1])


class StepTimes:
    """Wall seconds of every step of an --all folder, kept in ROOT/timings.json across invocations:
    a folder built in several sittings (an interrupted --all continues) still says what it cost.
    A finished training run keeps the time it took when it ran; tables and figures are rebuilt
    by every invocation and keep their latest time."""

    def __init__(self, root: str):
        import os
        self.path = f"{root}/timings.json"
        self.seconds = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.seconds = json.load(f)

    def run(self, name: str, fn, *args):
        """fn(*args), its wall time recorded under `name`."""
        import os
        t0 = time.time()
        out = fn(*args)
        self.seconds[name] = time.time() - t0
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.seconds, f, indent=1)
        os.replace(self.path + ".tmp", self.path)
        return out

    def summary(self, runs: list) -> str:
        """One sentence: the folder's total, split into training runs and the rest."""
        train_s = sum(self.seconds.get(f"train.py {name}", 0.0) for name in runs)
        untimed = [name for name in runs if f"train.py {name}" not in self.seconds]
        rest_s = sum(v for k, v in self.seconds.items() if not k.startswith("train.py "))
        return (f"every step of this folder, each timed when it last ran: {(train_s + rest_s) / 60:.1f} min "
                f"({train_s / 60:.1f} training runs, {rest_s / 60:.1f} tables and figures)"
                + (f"; not counted, finished before timings.json existed: {', '.join(untimed)}" if untimed else ""))


def section_from_file(times: StepTimes, name: str, cmd: list, md: str, log: str, title: str) -> str:
    """A table another script writes to `md`, timed, under a heading."""
    times.run(name, run_logged, cmd, log, name)
    with open(md) as f:
        return f"### {title}\n\n" + f.read()


def tome_off_the_shelf(root: str, n_test: list) -> str:
    rows = ["| r per block | image→text R@1 | text→image R@1 | zero-shot top-1 |", "|---|---|---|---|"]
    for r in ("0", "4", "8", "12"):
        m = eval_json(["--ckpt", f"{root}/clip/ckpt.pt", *n_test] + (["--tome-r", r] if r != "0" else []), root, f"tome_{r}")
        rows.append(f"| {r} | {100 * m['image_to_text_R@1']:.1f} | {100 * m['text_to_image_R@1']:.1f} | "
                    f"{100 * m['zeroshot_top1']:.1f} |")
    return "\n".join(rows)


def share_search(root: str, name: str):
    """The Patch Ranking seeds of one CLIP search its golden rankings once: seed 0's cache is copied
    into the other seeds' folders (train.py checks the cache's identity when it reads it)."""
    import os
    import shutil
    base, _, seed = name.rpartition("_")
    first = f"{root}/{base}_0/rankings.pt"
    if base in RANKING_RUNS and seed != "0" and os.path.exists(first):
        os.makedirs(f"{root}/{name}", exist_ok=True)
        shutil.copyfile(first, f"{root}/{name}/rankings.pt")


def train_all(root: str, quick: bool, times: StepTimes, t0: float) -> list:
    """Every training run of all_runs not finished yet, each timed. Returns the runs' names."""
    import os
    os.makedirs(root, exist_ok=True)
    runs = all_runs(root, quick)
    for name, args in runs.items():
        if os.path.exists(f"{root}/{name}/ckpt.pt"):
            continue  # finished before: rerunning is a matter of deleting the folder
        print(f"[{(time.time() - t0) / 60:5.1f} min] train.py {name}", flush=True)
        share_search(root, name)
        times.run(f"train.py {name}", run_logged, ["train.py", *args], f"{root}/{name}.txt", f"train.py {name}")
    return list(runs)


def reproduce_all(root: str, quick: bool = False) -> str:
    """Every training run (skipping those already finished), then the tables (Markdown, in
    ROOT/results.md) and the figures (ROOT/*.png), each step timed (ROOT/timings.json).
    Returns the Markdown."""
    global IN_PROCESS
    was, IN_PROCESS = IN_PROCESS, quick
    try:
        return run_every_step(root, quick)
    finally:
        IN_PROCESS = was


def run_every_step(root: str, quick: bool) -> str:
    """reproduce_all's work: the training runs, the tables, the figures."""
    import os
    t0, sections, times = time.time(), [], StepTimes(root)
    runs = train_all(root, quick, times, t0)  # makes the folder
    print(f"[{(time.time() - t0) / 60:5.1f} min] tables and figures", flush=True)
    n_test = ["--n-test", "20" if quick else "1000"]
    sections.append("### ELIP and EViT against no pruning (3 seeds)\n\n" + times.run("elip table", elip_table, root, n_test))
    sections.append("### Token relevance (3 seeds)\n\n"
                    + times.run("relevance table", relevance_markdown, root, 20 if quick else 500))
    sections.append(section_from_file(
        times, "experiments --fused-probe", ["experiments", "--fused-probe", f"{root}/none_0/ckpt.pt", "--out",
                                          f"{root}/probe.md", *n_test], f"{root}/probe.md", f"{root}/probe.txt",
        "The none_0 CLIP pruned at inference: which tokens, and the fused token's attention"))
    sections.append("### ToMe off the shelf on the default CLIP\n\n" + times.run("tome table", tome_off_the_shelf, root, n_test))
    sections.append("### Captioners: final metrics, time to reach (c)'s final CIDEr-D, curves\n\n"
                    + times.run("captioner table", captioner_table, root))
    sections.append("### Video captioning: the temporal contextualizer\n\n" + times.run("video table", video_table, root, n_test))
    sections.append(section_from_file(
        times, "experiments --direction-probe",
        ["experiments", "--direction-probe", f"{root}/clip/ckpt.pt", f"{root}/video_ctx_{VIDEO_SEEDS[0]}/ckpt.pt",
         "--out", f"{root}/direction.md", *n_test] + (["--probe-steps", "3"] if quick else []),
        f"{root}/direction.md", f"{root}/direction.txt", "Video: where the direction of motion goes (a probe)"))
    for name, title in (("ranking", "dropped, as published"), ("ranking_fuse", "fused into one token: --rank-fuse")):
        sections.append(section_from_file(
            times, f"experiments --ranking ({name})",
            ["experiments", "--ranking", *[f"{root}/{name}_{s}/ckpt.pt" for s in (0, 1, 2)], "--points",
             f"{root}/{name}_points.json", "--out", f"{root}/{name}.md", *n_test], f"{root}/{name}.md",
            f"{root}/{name}.txt", f"Patch Ranking on the default CLIP (40% of the patches pruned at the layer, {title})"))
    sections.append(section_from_file(
        times, "bench.py", ["bench.py", "--out", f"{root}/bench.md"] + (
            ["--tome", "tiny64", "--models", "tiny64", "--repeats", "1", "--captioner-batch", "8", "--batch-size", "8"]
            if quick else []), f"{root}/bench.md", f"{root}/bench.txt", "Cost (bench.py)"))
    small = ["--n-test", "20"] if quick else []
    times.run("experiments --tome-sweep", run_logged, ["experiments", "--tome-sweep", f"{root}/clip/ckpt.pt", "--points",
                                                     f"{root}/points.json", *small], f"{root}/sweep.txt", "experiments --tome-sweep")
    times.run("experiments --method-points", run_logged, ["experiments", "--method-points", root, "--points",
                                                        f"{root}/method_points.json", *small],
              f"{root}/method_points.txt", "experiments --method-points")
    for args in (["--ckpt", f"{root}/elip_paper_0/ckpt.pt", "--n", "6", "--out", f"{root}/masks_elip.png"],
                 ["--ckpt", f"{root}/clip/ckpt.pt", "--method", "tome", "--n", "4", "--out", f"{root}/masks_tome.png"],
                 ["--ckpt", f"{root}/ranking_0/ckpt.pt", "--n", "4", "--out", f"{root}/masks_ranking.png"],
                 ["--curves", *[f"{root}/{n}_0/log.jsonl" for n in CAPTIONERS_RUN], "--metric", "cider_d", "--x", "time",
                  "--out", f"{root}/captioner_curves.png"],
                 ["--tradeoff", f"{root}/points.json", "--out", f"{root}/tradeoff_tome.png"],
                 ["--tradeoff", f"{root}/method_points.json", "--out", f"{root}/tradeoff_methods.png"]):
        name = f"viz.py {os.path.basename(args[-1])}"
        times.run(name, run_logged, ["viz.py", *args], f"{root}/viz.txt", name)
    minutes = (time.time() - t0) / 60
    text = "\n\n".join(sections) + (f"\n\n(python -m experiments --all{' --quick' if quick else ''}: {minutes:.1f} min this "
                                      f"invocation; {times.summary(runs)})\n")
    with open(f"{root}/results.md", "w") as f:
        f.write(text)
    return text


def video_table(root: str, n_test: list) -> str:
    """Markdown: CIDEr-D, BLEU-4 and the motion accuracies of the video captioners of --all (mean
    and std over their seeds), the gates they learned and their training time."""
    import eval as evaluation
    keys = ("cider_d", "bleu4", "motion_accuracy", "direction_accuracy", "direction_accuracy_one_object")
    rows = ["| model | seeds | CIDEr-D | BLEU-4 | motion accuracy (5 choices) | direction accuracy (moving "
            "objects, 4) | direction, clips of one moving object | mean abs(alpha) | training min/run |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, label in VIDEO_NAMES.items():
        ckpts = [f"{root}/{name}_{seed}/ckpt.pt" for seed in VIDEO_SEEDS]
        runs = [eval_json(["--ckpt", c, *n_test], root, f"eval_{name}_{s}") for c, s in zip(ckpts, VIDEO_SEEDS)]
        m = evaluation.mean_over_runs(runs)
        cells = " | ".join(f"{100 * m[k]['mean']:.1f}" + (f" ± {100 * m[k]['std']:.1f}" if len(runs) > 1 else "")
                           for k in keys)
        gates = [abs(a) for run in runs for a in run.get("temporal_alpha", [])]
        alpha = f"{sum(gates) / len(gates):.3f}" if gates else "—"
        minutes = statistics.mean(torch.load(c, map_location="cpu", weights_only=True)["train_seconds"] / 60 for c in ckpts)
        rows.append(f"| {label} | {len(runs)} | {cells} | {alpha} | {minutes:.1f} |")
    return "\n".join(rows)
