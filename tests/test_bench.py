import json
import re
import sys
import time

import pytest
import numpy as np
import torch

import bench
from experiments import points, reproduce
import prepare
from model import CLIP
from train import TrainConfig


def tiny(method, **kw):
    cfg = TrainConfig(method=method, model_kwargs="width=32,heads=2,text_width=32,text_depth=1,embed_dim=16", **kw)
    return cfg, CLIP(prepare.model_config(cfg, vocab_size=20))


def test_token_counts_follow_the_schedules():
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(5, 20, (2, 10))
    cfg, model = tiny("elip")
    counter, n_out = bench.count_tokens(model, cfg, images, ids)
    # depth 6: prune before blocks 1, 2, 5 to 57, 41, 25 patches (+ [CLS] + the fused token)
    assert [counter.attn[i] for i in range(6)] == [65, 59, 43, 43, 43, 27] and n_out == 27
    assert counter.attn == counter.mlp
    cfg, model = tiny("evit")
    counter, _ = bench.count_tokens(model, cfg, images, ids)
    # EViT prunes inside blocks 2, 3, 4 (its layers 3, 6, 9 of 12 scaled to 6): MLP sees fewer
    assert [counter.attn[i] for i in range(6)] == [65, 65, 65, 46, 33, 23]
    assert [counter.mlp[i] for i in range(6)] == [65, 65, 46, 33, 23, 23]


def test_flop_count_by_hand():
    # one block, 5 tokens, width 8, MLP 32: qkv 2*5*8*24, scores+sum 2*2*25*8, proj 2*5*64, MLP 2*2*5*8*32
    assert bench.block_flops(5, 5, 8) == 2 * 5 * 8 * 24 + 4 * 25 * 8 + 2 * 5 * 64 + 4 * 5 * 8 * 32
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(5, 20, (2, 10))
    cfg, model = tiny("none")
    counter, n = bench.count_tokens(model, cfg, images, ids)
    f = bench.forward_flops(model, cfg, counter, n, 10)
    assert f["vit"] == 2 * 64 * 3 * 64 * 32 + 6 * bench.block_flops(65, 65, 32) and f["lookahead"] == 0
    # look-ahead: stages of 1, 3 and 1 blocks entered by 65, 59 and 43 tokens; the last block of
    # each stage costs its qkv projection and one row of attention logits
    last = lambda n: 2 * n * 32 * 96 + 2 * n * 32
    # with --rollout (ours) the stage-2 blocks before its last again compute their logits,
    # 2*59*59*32, and carry the row back through them, 2*59*59
    rollout = 2 * (2 * 59 * 59 * 32 + 2 * 59 * 59)
    for extra, kw in ((0, {}), (rollout, dict(rollout=True))):
        cfg, model = tiny("elip", **kw)
        counter, n = bench.count_tokens(model, cfg, images, ids)
        f = bench.forward_flops(model, cfg, counter, n, 10)
        assert f["lookahead"] == last(65) + 2 * bench.block_flops(59, 59, 32) + last(59) + last(43) + extra


def test_saved_activation_bytes_counts_inputs_not_parameters():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(32, 16)
    out, nbytes = bench.saved_activation_bytes(lambda: lin(x).relu().sum(), lin)
    # Linear saves its input (32 x 16 floats) and weight (a parameter: not counted); relu saves its
    # output (32 x 8 floats)
    assert nbytes == 32 * 16 * 4 + 32 * 8 * 4
    assert out.ndim == 0


def test_tome_token_counts_and_rows():
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(5, 20, (2, 10))
    cfg, model = tiny("tome", tome_r="8")
    counter, n_out = bench.count_tokens(model, cfg, images, ids)
    # attention sees the tokens before the block's merge, the MLP those after: 65, 57, 49 ...
    assert [counter.attn[i] for i in range(6)] == [65, 57, 49, 41, 33, 25]
    assert [counter.mlp[i] for i in range(6)] == [57, 49, 41, 33, 25, 17] and n_out == 17
    rows = bench.bench_tome("tiny64", 2, "8", 1, torch.device("cpu"))
    assert rows["tome"]["tokens_out"] == 17 and rows["none"]["tokens_out"] == 65
    assert rows["none"]["gflops"] > rows["tome"]["gflops"] > 0 and "1.00x" in bench.tome_markdown("tiny64", 2, rows)


def test_all_reruns_every_table_and_figure_end_to_end(tmp_path):
    """`python -m experiments --all --quick`: every run, table and figure of the README at toy size."""
    import os
    text = reproduce.reproduce_all(str(tmp_path), quick=True)
    for heading in ("ELIP and EViT against no pruning", "ToMe off the shelf", "Captioners: final metrics",
                    "Cost (bench.py)", "Patch Ranking on the default CLIP"):
        assert heading in text
    assert "| elip (as published) |" in text and "| 8 |" in text
    assert "| EVLGen (merge, r = 16, --bridge-merge wavg) | 0 |" in text
    assert text.count("| predictor + 4 learnable tokens | 3 |") == 2  # pruned patches dropped, and fused
    assert "fused into one token: --rank-fuse" in text and "`elip` as published" in text
    assert "| the object patches (ground truth) | proportional (ours) |" in text  # the fused-attention probe
    assert "`elip --fused-prop-attn`" in text and "Token relevance (3 seeds)" in text
    assert "| trained with `--method elip --fused-prop-attn` | ELIP (look-ahead" in text
    assert text.count("|  | random |") == 3  # the relevance table: one random row per model
    assert text.count("|  | ELIP without the text (lambda 1) |") == 6  # relevance and steering: one per model each
    assert "| gap (named minus other), stages 1 / 2 / 3 |" in text
    assert "| the temporal contextualizer (trained with the reader), then averaging | attention |" in text  # the probe
    assert "| a video captioner's contextualizer (frozen, as the LM's loss trained it), then averaging | layout |" in text
    for png in ("masks_elip", "masks_tome", "masks_ranking", "captioner_curves", "tradeoff_tome", "tradeoff_methods"):
        assert os.path.getsize(tmp_path / f"{png}.png") > 1000
    points = {p["name"]: p for p in json.loads((tmp_path / "method_points.json").read_text())}
    assert {"none", "ELIP (pruned)", "EViT (pruned)", "ToMe r=8"} <= set(points)
    assert all(p["seeds"] == 3 for p in points.values())
    assert points["EViT (pruned)"]["gflops"] < points["none"]["gflops"]
    assert points["ELIP (pruned)"]["gflops"] > points["EViT (pruned)"]["gflops"]  # its look-ahead is counted
    evals = json.loads((tmp_path / "eval_elip_prune.json").read_text().strip().splitlines()[-1])["mean"]
    assert points["ELIP (pruned)"]["accuracy"] == pytest.approx(  # the same numbers as eval.py's table
        50 * (evals["image_to_text_R@1"]["mean"] + evals["text_to_image_R@1"]["mean"]))
    assert os.path.exists(tmp_path / "results.md")
    times = json.loads((tmp_path / "timings.json").read_text())  # every step timed, runs and tables
    runs = [f"train.py {name}" for name in reproduce.all_runs(str(tmp_path), quick=True)]
    assert set(runs) <= set(times) and {"elip table", "experiments --ranking (ranking_fuse)", "viz.py masks_elip.png"} <= set(times)
    assert all(t > 0 for t in times.values())
    stated = float(re.search(r"each timed when it last ran: ([0-9.]+) min", text).group(1))
    assert stated == pytest.approx(sum(times.values()) / 60, abs=0.051) and "finished before timings.json" not in text
    with pytest.MonkeyPatch.context() as mp:  # a second --all keeps the finished runs: nothing is retrained
        mp.setattr(reproduce, "run_logged", lambda cmd, *rest: pytest.fail(f"{cmd[:2]} ran again"))
        again = reproduce.train_all(str(tmp_path), True, reproduce.StepTimes(str(tmp_path)), t0=0.0)
    assert again == list(reproduce.all_runs(str(tmp_path), quick=True))
    check_elip_table_of_a_folder(tmp_path, text)


def test_step_times_keep_earlier_steps_across_invocations(tmp_path):
    """An interrupted --all continues in a new process: the steps timed before stay in timings.json,
    a step run again gets its new time."""
    first = reproduce.StepTimes(str(tmp_path))
    assert first.run("train.py a", lambda x: x + 1, 1) == 2
    first.run("table", time.sleep, 0.05)
    second = reproduce.StepTimes(str(tmp_path))  # a later invocation
    second.run("table", lambda: None)
    second.run("train.py b", time.sleep, 0.01)
    saved = json.loads((tmp_path / "timings.json").read_text())
    assert saved["train.py a"] == first.seconds["train.py a"] and saved["table"] < first.seconds["table"]
    assert set(saved) == {"train.py a", "train.py b", "table"}
    assert "not counted, finished before timings.json existed: c" in second.summary(["a", "b", "c"])


def check_elip_table_of_a_folder(root, all_text):
    """--elip-table on a folder of some of --all's runs: the same rows --all wrote for them; unequal
    budgets or no baseline stop with one sentence."""
    import shutil
    sub = root / "one_off"
    for name in ("none", "elip"):
        for seed in (0, 1, 2):
            shutil.copytree(root / f"{name}_{seed}", sub / f"{name}_{seed}")
    table = reproduce.elip_table_of_folder(str(sub), n_test=20)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split(" |")[0] for r in rows] == ["| `none`", "| `elip --fused-prop-attn --rollout` (ours: proportional attention and rollout)"]
    assert all(row in all_text for row in rows) and table.startswith("2 runs x 3 seeds, 3 steps each")
    ckpt = torch.load(sub / "elip_1" / "ckpt.pt", weights_only=True)
    ckpt["config"]["steps"] = 4
    torch.save(ckpt, sub / "elip_1" / "ckpt.pt")
    with pytest.raises(SystemExit, match="different numbers of steps.*elip_1 4"):
        reproduce.elip_table_of_folder(str(sub), n_test=20)
    shutil.rmtree(sub / "none_2")
    with pytest.raises(SystemExit, match="needs none_0, none_1 and none_2"):
        reproduce.elip_table_of_folder(str(sub), n_test=20)


@pytest.mark.parametrize("in_process", [False, True])
def test_a_failed_step_of_all_names_itself_and_its_log(tmp_path, monkeypatch, in_process):
    """--all runs each script in a process of its own, --all --quick in this one: a failure reads
    the same either way, one sentence naming the step and its log, the script's own error in the log."""
    monkeypatch.setattr(reproduce, "IN_PROCESS", in_process)
    from test_train import ROOT
    monkeypatch.chdir(ROOT)
    log = tmp_path / "step.txt"
    for cmd, code, said in ((["eval.py", "--ckpt", str(tmp_path / "none.pt")], 1, "none.pt does not exist"),
                            (["experiments", "--direction-probe", str(tmp_path / "none.pt")], 1, "none.pt does not exist"),
                            (["train.py", "--steps", "x"], 2, "train.py: error: argument --steps: invalid int")):
        with pytest.raises(SystemExit, match=re.escape(f"error: the step failed (exit {code}); its output is in {log}")):
            reproduce.run_logged(cmd, str(log), "the step")
        assert said in log.read_text() and "Traceback" not in log.read_text()
    assert reproduce.IN_PROCESS == in_process and sys.argv[0] != "train.py"  # nothing of a step stays behind


def test_a_missing_checkpoint_stops_with_one_sentence(tmp_path):
    import subprocess
    from test_train import ROOT
    r = subprocess.run([sys.executable, "-m", "experiments", "--direction-probe", str(tmp_path / "none.pt")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "none.pt does not exist" in r.stderr and "Traceback" not in r.stderr


def test_pooled_difference_by_hand():
    z = points.Z95
    # standard errors 1 and 2: weights 1 and 1/4, pooled (1 * 1 + 4 / 4) / 1.25 = 1.6, se 1 / sqrt(1.25)
    mean, low, high = points.pooled_difference([(1.0, 1 - z, 1 + z), (4.0, 4 - 2 * z, 4 + 2 * z)])
    assert mean == pytest.approx(1.6) and high - mean == pytest.approx(mean - low) == pytest.approx(z / 1.25 ** 0.5)
    # the same estimate twice: the same mean, the interval narrower by sqrt(2)
    mean, low, high = points.pooled_difference([(0.5, -0.5, 1.5)] * 2)
    assert mean == pytest.approx(0.5) and high - low == pytest.approx(2 / 2 ** 0.5)
    with pytest.raises(points.DataError, match="empty interval"):
        points.pooled_difference([(0.5, 0.5, 0.5), (0.5, -0.5, 1.5)])


def ranking_points_file(path, scene_seed, shift):
    row = lambda method, name, d: dict(method=method, name=name, scene_seed=scene_seed, paired_r1=d, paired_r1_low=d - 1,
                                       paired_r1_high=d + 1, paired_loss=-d / 100, paired_loss_low=-d / 100 - 0.01,
                                       paired_loss_high=-d / 100 + 0.01)
    points = [row("none", "unpruned", 0.5 + shift), row("ToMe", f"ToMe r={5 + shift}", 0.0),
              row("predictor", "predictor + 4 learnable tokens", 1.0 + shift)]
    path.write_text(json.dumps(points))
    return str(path)


def test_pool_ranking_pools_every_row_but_tome_and_refuses_shared_galleries(tmp_path):
    a, b = ranking_points_file(tmp_path / "a.json", 0, 0.0), ranking_points_file(tmp_path / "b.json", 1, 1.0)
    rows = points.pool_ranking([a, b]).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| unpruned", "| predictor + 4 learnable tokens"]
    # equal intervals: the pooled difference is the plain mean, (1.0 + 2.0) / 2, on R@1 and on the loss
    assert "| +1.00 [+0.00, +2.00] | +2.00 [+1.00, +3.00] | +1.50 [+0.79, +2.21] | -0.0150 [-0.0221, -0.0079] |" in rows[1]
    with pytest.raises(points.DataError, match="share test images"):
        points.pool_ranking([a, ranking_points_file(tmp_path / "c.json", 0, 1.0)])
    with pytest.raises(points.DataError, match="two or more"):
        points.pool_ranking([a])
    (tmp_path / "bad.json").write_text('[{"name": "unpruned"}]')
    with pytest.raises(points.DataError, match=r"bad\.json is not the --points file"):
        points.pool_ranking([a, str(tmp_path / "bad.json")])


def test_loader_benchmark_reads_a_caption_file_and_ends_with_its_rate(tmp_path):
    import re
    import subprocess
    import sys
    from PIL import Image
    from test_train import ROOT
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "caps.csv").write_text("".join(f"{i}.jpg,picture {i}\n" for i in range(10)))
    r = subprocess.run([sys.executable, "bench.py", "--loader", "--data", str(tmp_path / "caps.csv"), "--image-root",
                        str(tmp_path), "--workers", "2", "--batch-size", "4", "--batches", "3", "--image-size", "32",
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"loader: \d+ img/s", lines[-1]) and "uint8 batches" in r.stdout and "x the naive path" in r.stdout
    r = subprocess.run([sys.executable, "bench.py", "--loader"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "give --data FILE" in r.stderr and "Traceback" not in r.stderr



def test_gpu_check_trains_every_method_and_says_whether_the_loss_fell():
    import subprocess
    import sys
    from test_train import ROOT
    r = subprocess.run([sys.executable, "bench.py", "--gpu-check", "--models", "tiny64", "--batch-size", "4",
                        "--batches", "5", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "→" in line and "method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["none", "elip", "evit", "tome"]
    assert r.stdout.strip().splitlines()[-1] == "gpu check: the loss fell for every method"
