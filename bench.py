"""
Benchmarks: the cost of every token-reduction method, side by side, measured on this machine.

Three tables: ToMe off the shelf (inference images/s of a ViT with and without merging); the
EVLGen captioner's training step per bridge (merged, unmerged, learned queries) and where its time
goes; the CLIP training step under each method (below).

Read first: `count_tokens` (how many tokens each block's attention and MLP see, measured through
the seam), then `forward_flops` (the analytic count), then `bench_model`.

For each method and model it reports, relative to `none` measured in the same run:
- the measured time of one training step (forward, backward, AdamW), median over repeats;
- the FLOPs of the step counted analytically: 3x the forward of everything that gets gradients
  (backward ~ 2x forward) plus 1x ELIP's look-ahead (forward only, under no_grad); the speed
  ratio the FLOP count allows is printed beside the measured one;
- the activation memory of the step: the bytes of all tensors autograd saves for backward
  (device-independent; on CUDA the allocator's peak is printed too);
- the largest batch whose activations, parameters, gradients and AdamW state fit `--mem-budget-gb`.

    python bench.py                 # all three tables
    python bench.py --tome vit_s16 --no-captioner --models ''   # ToMe's row alone
    python bench.py --loader --data caps.csv --image-root DIR --workers 2   # the data loader's images/s

Accuracy against cost, the Patch Ranking table, the probes and the harness that reruns every
results table live in `experiments/` (`python -m experiments --help`).
"""
import argparse
import dataclasses
import statistics
import time

import torch

import shapes
from captioner import Captioner, CaptionerConfig
from checkpoint import ReducerConfig, elip_schedule, make_reducer, tome_schedule
from data import DataError
from loading import bench_loader
from merge import merge_schedule
from model import CLIP, CLIPConfig
from text import LMConfig, TextConfig, Tokenizer
from vit import Observed, vit_config

VARIANTS = {  # name -> ReducerConfig (train.py's flags of the same names)
    "none": dict(method="none"),
    "evit --fused-prop-attn": dict(method="evit", fused_prop_attn=True),
    "elip --fused-prop-attn --rollout": dict(method="elip", fused_prop_attn=True, rollout=True),
    "elip --no-lookahead --fused-prop-attn": dict(method="elip", lookahead=False, fused_prop_attn=True),
    "elip --fused-prop-attn": dict(method="elip", fused_prop_attn=True),  # the last block's [CLS] row, as published
    "elip (as published)": dict(method="elip"),
    "tome": dict(method="tome"),
}


class TokenCounter(Observed):
    """Records, per block, the token count its attention and its MLP see under the wrapped reducer."""

    def __init__(self, inner=None):
        super().__init__(inner)
        self.attn, self.mlp = {}, {}

    def observe(self, i, hook, before, after):
        (self.attn if hook == "before_block" else self.mlp)[i] = after.x.shape[1]


def block_flops(n_attn, n_mlp, d, mlp_ratio=4.0, context=0, d_context=0) -> float:
    """Forward FLOPs (2 per multiply-add) of one pre-norm block: qkv, scores, weighted sum and
    projection at n_attn tokens, MLP at n_mlp; with `context` tokens, a cross-attention too."""
    f = 2 * n_attn * d * 3 * d + 2 * 2 * n_attn * n_attn * d + 2 * n_attn * d * d
    f += 2 * 2 * n_mlp * d * int(mlp_ratio * d)
    if context:
        f += 2 * n_attn * d * d + 2 * context * d_context * 2 * d + 2 * 2 * n_attn * context * d + 2 * n_attn * d * d
    return f


def count_tokens(model, cfg: ReducerConfig, images, ids):
    """(per-block attention and MLP token counts, tokens leaving the ViT) of one guided forward."""
    make = make_reducer(cfg, model.cfg.vision)  # past any warm-up
    text = model.text_guidance(model.text(ids))
    counter = TokenCounter(make(text) if make else None)
    with torch.no_grad():
        out = model.visual.forward_tokens(images, counter)
    return counter, out.x.shape[1]


def vit_forward_flops(vit, counter) -> float:
    """Forward FLOPs of the ViT: the patch embedding, then each block at the token counts seen."""
    v = vit.cfg
    return 2 * v.num_patches * 3 * v.patch_size ** 2 * v.width + sum(
        block_flops(counter.attn[i], counter.mlp[i], v.width, v.mlp_ratio) for i in range(v.depth))


def forward_flops(model, cfg: ReducerConfig, counter, n_out, text_len) -> dict:
    """Per-sample forward FLOPs of a training step, by part."""
    v, t = model.cfg.vision, model.cfg.text
    P = v.num_patches
    vit = vit_forward_flops(model.visual, counter)
    lookahead = 0.0
    if cfg.method == "elip" and cfg.lookahead:
        s = elip_schedule(cfg, v.depth)
        for b, n in zip(s.begin_layers, s.num_layers):
            N = counter.mlp[b - 1] if b else 1 + P  # the sequence entering block b, unpruned
            # n - 1 whole blocks, then the last block's qkv projection and one row of logits
            lookahead += (n - 1) * block_flops(N, N, v.width, v.mlp_ratio) + 2 * N * v.width * 3 * v.width + 2 * N * v.width
            if cfg.rollout:  # each earlier block's attention logits again, and the row carried back through them
                lookahead += (n - 1) * (2 * N * N * v.width + 2 * N * N)
    text = t.depth * block_flops(text_len, text_len, t.width, t.mlp_ratio)
    objectives = model.cfg.objectives
    fusion_one = model.cfg.fusion_depth * block_flops(text_len, text_len, t.width, 4.0, n_out, v.width)
    fusion = (3 if "itm" in objectives else 0) * fusion_one + (1 if "mlm" in objectives else 0) * fusion_one
    text *= 2 if "mlm" in objectives else 1  # the masked text is encoded again
    return dict(vit=vit, lookahead=lookahead, text=text, fusion=fusion)


def saved_activation_bytes(fn, model) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs, the model's
    own parameters (which Linear layers save too) excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def clip_config(preset: str, objectives: str) -> CLIPConfig:
    """train.py's CLIP for a ViT preset: its default text tower on tiny64, CLIP ViT-B/16's otherwise."""
    wide = preset != "tiny64"
    text = TextConfig(vocab_size=100, context_length=40, width=768 if wide else 128, depth=2, heads=12 if wide else 2)
    return CLIPConfig(vision=vit_config(preset), text=text, embed_dim=512 if wide else 128,
                      objectives=tuple(objectives.split(",")))


def bench_model(preset, batch_size, objectives, repeats, budget_gb, device):
    rows = {}
    for name, overrides in VARIANTS.items():
        cfg = ReducerConfig(**overrides)
        torch.manual_seed(0)
        model = CLIP(clip_config(preset, objectives)).to(device)
        v = model.cfg.vision
        images = torch.randn(batch_size, 3, v.image_size, v.image_size, device=device)
        ids = torch.randint(5, 100, (batch_size, 24), device=device)
        ids[:, 0], ids[:, -1] = 2, 3
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        make = make_reducer(cfg, v)

        def step():
            out = model(images, ids, make, torch.Generator(device=device).manual_seed(0))
            return out["loss"]

        times = []
        for r in range(repeats + 1):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss, act = saved_activation_bytes(step, model) if r == 0 else (step(), None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r == 0:
                activation = act
            else:
                times.append(time.perf_counter() - t0)
        counter, n_out = count_tokens(model, cfg, images[:2], ids[:2])
        f = forward_flops(model, cfg, counter, n_out, ids.shape[1])
        train_flops = 3 * (f["vit"] + f["text"] + f["fusion"]) + f["lookahead"]
        state = 4 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights, grads, 2 Adam moments
        rows[name] = dict(step_s=statistics.median(times), train_gflops=train_flops / 1e9,
                          lookahead_share=f["lookahead"] / train_flops, activation_mb=activation / 2 ** 20,
                          tokens_out=n_out, largest_batch=int((budget_gb * 2 ** 30 - state) / (activation / batch_size)),
                          cuda_peak_mb=torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None)
    return rows


def markdown(preset, batch_size, rows, budget_gb) -> str:
    base = rows["none"]
    lines = [f"**{preset}**, batch {batch_size}:", "",
             "| method | step (s) | measured speed-up | FLOP-allowed speed-up | train GFLOPs/img | look-ahead share "
             f"| activations (MB) | largest batch in {budget_gb:g} GB | tokens out |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {base['step_s'] / r['step_s']:.2f}x | "
                     f"{base['train_gflops'] / r['train_gflops']:.2f}x | {r['train_gflops']:.2f} | "
                     f"{100 * r['lookahead_share']:.0f}% | {r['activation_mb']:.0f} "
                     f"({r['activation_mb'] / base['activation_mb']:.2f}x) | {r['largest_batch']} | {r['tokens_out']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# ToMe off the shelf: inference throughput of a ViT with and without merging

def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_tome(preset: str, batch_size: int, r: str, repeats: int, device) -> dict:
    """Images per second of the plain ViT and of ToMe with r per block, in the same run (timed in
    alternation so that both see the same machine), and the forward FLOPs of each."""
    from merge import ToMe
    from vit import ViT, vit_config
    torch.manual_seed(0)
    vit = ViT(vit_config(preset)).to(device).eval()
    images = torch.randn(batch_size, 3, vit.cfg.image_size, vit.cfg.image_size, device=device)
    schedule, note = tome_schedule(ReducerConfig(tome_r=r), vit.cfg.depth, 1 + vit.cfg.num_patches)
    reducers = dict(none=None, tome=ToMe(schedule))
    times = {k: [] for k in reducers}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, reducer in reducers.items():
                times[name].append(timed(lambda: vit(images, reducer), 1))
    rows = {}
    for name, reducer in reducers.items():
        counter = TokenCounter(reducer)
        with torch.inference_mode():
            out = vit.forward_tokens(images[:1], counter)
        rows[name] = dict(img_s=batch_size / statistics.median(times[name]), gflops=vit_forward_flops(vit, counter) / 1e9,
                          tokens_out=out.x.shape[1])
    rows["tome"]["r"] = schedule
    return rows


def tome_markdown(preset, batch_size, rows) -> str:
    base = rows["none"]
    lines = [f"**{preset}** inference, batch {batch_size}, ToMe r per block {rows['tome']['r']}:", "",
             "| model | img/s | measured speed-up | FLOP-allowed speed-up | GFLOPs/img | tokens out |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['img_s']:.1f} | {r['img_s'] / base['img_s']:.2f}x | "
                     f"{base['gflops'] / r['gflops']:.2f}x | {r['gflops']:.2f} | {r['tokens_out']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# EVLGen: the captioner's training step, merged and unmerged, and where its time goes

CAPTIONERS = {  # name -> the bridge (train.py's --bridge, --bridge-r, --stage1-steps)
    "evlgen (merge r=16)": dict(bridge="merge", r=16),
    "no merging (r=0)": dict(bridge="merge", r=0),
    "learned queries (32)": dict(bridge="query"),
    "learned queries, stage 1 (ITC+ITM)": dict(bridge="query", stage1=True),
}


def bench_captioner(batch_size: int, repeats: int, device) -> dict:
    """Per bridge: seconds of a training step, split into the frozen ViT's forward, the bridge
    (forward + backward of its output alone) and the rest (the frozen LM's forward and backward
    to the prompt); tokens entering the LM. Default model sizes, frozen ViT, random weights and captions."""
    rows = {}
    for name, bridge in CAPTIONERS.items():
        vision = vit_config("tiny64")  # train.py's defaults: the tiny ViT, a 2-layer bridge, a 128-position LM
        r = merge_schedule(bridge.get("r", 16), 2, 1 + vision.num_patches)[0]
        mcfg = CaptionerConfig(vision=vision, lm=LMConfig(vocab_size=100, context_length=128),
                               text=TextConfig(vocab_size=100, context_length=128), bridge=bridge["bridge"],
                               bridge_depth=2, r=tuple(r), freeze_vit=True, stage1=bridge.get("stage1", False))
        torch.manual_seed(0)
        model = Captioner(mcfg).to(device).train()  # the ViT frozen, as when loaded with --clip
        v = model.cfg.vision
        images = torch.randn(batch_size, 3, v.image_size, v.image_size, device=device)
        ids = torch.randint(5, 100, (batch_size, 24), device=device)
        ids[:, 0], ids[:, -1] = 2, 3
        model.stage = 1 if mcfg.stage1 else 2
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            model(images, ids, generator=torch.Generator().manual_seed(0))["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        features = model.visual_tokens(images).detach()

        def bridge_only():
            model.bridge(features).x.sum().backward()

        t_step = timed(step, repeats)
        t_vit = timed(lambda: model.visual_tokens(images), repeats)
        t_bridge = timed(bridge_only, repeats)
        opt.zero_grad(set_to_none=True)
        rows[name] = dict(step_s=t_step, vit_s=t_vit, bridge_s=t_bridge, rest_s=t_step - t_vit - t_bridge,
                          lm_tokens=model.prompt(images[:1]).x.shape[1] if model.stage == 2 else 0)
    return rows


def captioner_markdown(batch_size, rows) -> str:
    base = rows["no merging (r=0)"]
    lines = [f"**captioner training step** (default sizes), batch {batch_size}:", "",
             "| bridge | step (s) | speed vs no merging | frozen ViT fwd (s) | bridge fwd+bwd (s) | rest: LM / heads (s) "
             "| visual tokens into the LM |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {base['step_s'] / r['step_s']:.2f}x | {r['vit_s']:.3f} | "
                     f"{r['bridge_s']:.3f} | {r['rest_s']:.3f} | {r['lm_tokens'] or '- (no LM in stage 1)'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# A check for whoever has a GPU: every method trains, how fast, in how much memory

# dense bf16 peak of common GPUs, TFLOP/s (their data sheets), for the model FLOPs utilisation
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10": 125, "L4": 121, "4090": 165,
                    "3090": 71, "V100": 125}


def gpu_check(preset: str, batch_size: int, steps: int, device, peak_tflops: float = 0.0) -> list:
    """Each method trains `steps` steps on one batch of shapes images at the preset's size (bf16
    autocast on CUDA): images/s over the steps after the third, peak memory, model FLOPs
    utilisation (the analytic training FLOPs over the peak), and whether the loss fell."""
    v = vit_config(preset)
    scenes = shapes.ShapesDataset("train", batch_size, v.image_size, v.patch_size)
    tokenizer = Tokenizer.build(c for i in range(batch_size) for c in scenes.captions(i))
    images = torch.stack([scenes[i]["image"] for i in range(batch_size)]).to(device)
    ids = tokenizer([scenes.captions(i)[0] for i in range(batch_size)]).to(device)
    if not peak_tflops and device.type == "cuda":
        peak_tflops = next((p for name, p in PEAK_BF16_TFLOPS.items() if name in torch.cuda.get_device_name(device)), 0)
    rows = []
    for method in ("none", "elip", "evit", "tome"):
        rc = ReducerConfig(method=method)
        torch.manual_seed(0)
        cfg = clip_config(preset, "itc" if method == "none" else "itc,itm,mlm")
        model = CLIP(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(tokenizer)))).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        make = make_reducer(rc, model.cfg.vision)
        losses, t0 = [], 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(steps):
            if step == 3:  # the first steps warm up (allocator, kernels); time the rest
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(images, ids, make, torch.Generator(device=device).manual_seed(step))["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - t0) / (steps - 3)
        counter, n_out = count_tokens(model, rc, images[:2], ids[:2])
        f = forward_flops(model, rc, counter, n_out, ids.shape[1])
        flops = batch_size * (3 * (f["vit"] + f["text"] + f["fusion"]) + f["lookahead"]) / 2  # counted for 2 images
        first, last = losses[0].item(), losses[-1].item()
        rows.append(dict(method=method, img_s=batch_size / seconds, first=first, last=last,
                         peak_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
                         mfu=flops / seconds / (peak_tflops * 1e12) if peak_tflops else None))
    return rows


def gpu_check_markdown(preset: str, batch_size: int, steps: int, rows: list) -> str:
    none = rows[0]["img_s"]
    lines = [f"{preset}, batch {batch_size}, {steps} steps on one batch", "",
             "| method | img/s | speed vs none | peak memory | MFU | loss: first → last |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['img_s']:.0f} | {r['img_s'] / none:.2f}x | "
                     + (f"{r['peak_gb']:.1f} GB" if r["peak_gb"] is not None else "—") + " | "
                     + (f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "—") + f" | {r['first']:.3f} → {r['last']:.3f} |")
    fell = [r["method"] for r in rows if r["last"] < r["first"]]
    lines += ["", "gpu check: " + ("the loss fell for every method" if len(fell) == len(rows) else
                                   "the loss did NOT fall for " + ", ".join(r["method"] for r in rows if r["method"] not in fell))]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="ToMe's inference speed-up; the captioner's training step per bridge; "
                                            "the CLIP training step under none / evit / elip / elip without "
                                            "look-ahead / tome.")
    p.add_argument("--models", default="tiny64,vit_b16", help="comma-separated ViT presets ('' to skip)")
    p.add_argument("--tome", default="vit_s16,vit_b16", help="ViT presets for ToMe's inference rows ('' to skip)")
    p.add_argument("--tome-r", default="13", help="ToMe's r (a number, one per block, or auto)")
    p.add_argument("--tome-batch", type=int, default=16)
    p.add_argument("--captioner", action=argparse.BooleanOptionalAction, default=True,
                   help="the captioner's training step per bridge (EVLGen)")
    p.add_argument("--captioner-batch", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=0, help="0: 64 for tiny64, 8 for the 224-px presets")
    p.add_argument("--objectives", default="itc,itm,mlm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-budget-gb", type=float, default=16.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="", help="also write the Markdown tables to this file")
    p.add_argument("--gpu-check", action="store_true",
                   help="instead: each method 20 steps on one batch of ViT-B/16 at 224 px (bf16 on CUDA): img/s, "
                        "peak memory, model FLOPs utilisation, and whether the loss falls")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="--gpu-check: the GPU's dense bf16 peak for the MFU (0: looked up by the GPU's name)")
    p.add_argument("--loader", action="store_true",
                   help="instead: images/s of train.py's data loader on --data against the naive path")
    p.add_argument("--data", default="", help="--loader: a caption file (as train.py --data)")
    p.add_argument("--image-root", default="", help="--loader: the folder its image paths are relative to")
    p.add_argument("--workers", type=int, default=2, help="--loader: DataLoader worker processes")
    p.add_argument("--image-size", type=int, default=224, help="--loader: the training crop's side")
    p.add_argument("--batches", type=int, default=20, help="--loader: batches timed (of --batch-size, default 64)")
    args = p.parse_args(argv)
    if args.gpu_check:
        preset, steps = args.models.split(",")[-1] or "vit_b16", max(5, args.batches)  # the last preset named
        B = args.batch_size or (64 if preset == "tiny64" else 32)
        rows = gpu_check(preset, B, steps, torch.device(args.device), args.peak_tflops)
        print(gpu_check_markdown(preset, B, steps, rows))
        return
    if args.loader:
        if not args.data:
            raise DataError("--loader reads a caption file: give --data FILE (and --image-root DIR)")
        B = args.batch_size or 64
        r = bench_loader(args.data, args.image_root, args.image_size, args.workers, B, args.batches,
                         torch.device(args.device))
        print(f"naive path (full-size decode, float32, normalised in this process): {r['naive']:.0f} img/s")
        print(f"train.py's loader ({args.workers} workers, {r['carried']} batches, draft decoding, normalised on "
              f"{args.device}): {r['loader'] / r['naive']:.2f}x the naive path, {args.batches} batches of {B} "
              f"at {args.image_size} px")
        print(f"loader: {r['loader']:.0f} img/s")
        return
    tables = []
    device = torch.device(args.device)
    for preset in filter(None, args.tome.split(",")):
        tables.append(tome_markdown(preset, args.tome_batch,
                                    bench_tome(preset, args.tome_batch, args.tome_r, max(args.repeats, 5), device)))
        print(tables[-1] + "\n", flush=True)
    if args.captioner:
        tables.append(captioner_markdown(args.captioner_batch, bench_captioner(args.captioner_batch, args.repeats, device)))
        print(tables[-1] + "\n", flush=True)
    for preset in filter(None, args.models.split(",")):
        B = args.batch_size or (64 if preset == "tiny64" else 8)
        rows = bench_model(preset, B, args.objectives, args.repeats, args.mem_budget_gb, torch.device(args.device))
        tables.append(markdown(preset, B, rows, args.mem_budget_gb))
        print(tables[-1] + "\n", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"objectives {args.objectives}, device {args.device}, {args.repeats} timed repeats\n\n")
            f.write("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # a missing or unreadable checkpoint: one sentence, not a traceback
        raise SystemExit(f"error: {e}") from None
