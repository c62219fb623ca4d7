"""
Pretrained weights: OpenAI / open_clip CLIPs and Hugging Face GPT-2s, converted into this project's
models and written as train.py checkpoints (nothing is downloaded: the files are the user's).

    python pretrained.py --openai ViT-B-16.pt --bpe bpe_simple_vocab_16e6.txt.gz --out clip_b16
    python pretrained.py --openai open_clip_model.safetensors --act gelu --bpe bpe_simple_vocab_16e6.txt.gz --out laion
    python pretrained.py --gpt2 gpt2/pytorch_model.bin --vocab gpt2/vocab.json --merges gpt2/merges.txt --out lm_gpt2

Read first: `openai_to_ours` (the rename table), then `clip_from_openai`. timm ViTs load with
vit.py's `load_timm`, GPT-2 with text.py's `CausalLM.from_gpt2`.
"""
import json
import math
import os
from dataclasses import asdict

import torch

from captioner import LanguageModel
from checkpoint import save_checkpoint
from model import CLIP, CLIPConfig
from bpe import CLIPTokenizer, GPT2Tokenizer
from text import CausalLM, TextConfig
from vit import ViTConfig, load_exactly


def clip_from_openai(state: dict, act: str = "quick_gelu") -> CLIP:
    """A CLIP with the weights of an OpenAI CLIP state dict (the layout open_clip uses too:
    visual.conv1, visual.class_embedding, visual.transformer.resblocks.N.attn.in_proj_weight,
    token_embedding, text_projection, logit_scale ...), its config read off the shapes.
    Vision, text and the logit scale are loaded; the text tower is causal and pools the
    end-of-text token, as CLIP's is. A key left over or missing stops with the list. `act`: OpenAI's
    releases use QuickGELU; open_clip's LAION releases GELU, but for its "-quickgelu" models."""
    cfg = openai_config(state, act)
    model = CLIP(cfg)
    load_exactly(model, openai_to_ours(state, cfg), "the OpenAI CLIP state dict")
    return model.eval()


OPENAI_META = ("input_resolution", "context_length", "vocab_size")  # integers some releases store beside the weights


def openai_config(state: dict, act: str = "quick_gelu") -> CLIPConfig:
    """CLIPConfig of an OpenAI-layout state dict: widths, depths, patch and image size, context,
    vocabulary and embedding size from the shapes; heads = width / 64, QuickGELU, LayerNorm eps
    1e-5, a pre-norm on the patches (ln_pre), a causal text tower pooled at end-of-text; `act`
    the activation of both towers (quick_gelu or gelu: the file cannot tell)."""
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"activation {act!r} is not quick_gelu or gelu")
    if "visual.conv1.weight" not in state:
        raise ValueError("not an OpenAI ViT CLIP state dict: no visual.conv1.weight (ResNet CLIPs are not supported)")
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    D, _, p, _ = state["visual.conv1.weight"].shape
    side = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vision = ViTConfig(image_size=side * p, patch_size=p, width=D, depth=count("visual.transformer.resblocks."),
                       heads=D // 64, act=act, ln_eps=1e-5, pre_norm=True)
    V, W = state["token_embedding.weight"].shape
    text = TextConfig(vocab_size=V, context_length=state["positional_embedding"].shape[0], width=W,
                      depth=count("transformer.resblocks."), heads=W // 64, act=act, ln_eps=1e-5,
                      causal=True, pool="eot")
    return CLIPConfig(vision=vision, text=text, embed_dim=state["text_projection"].shape[1])


def openai_to_ours(state: dict, cfg: CLIPConfig) -> dict:
    """Rename an OpenAI-layout state dict to this project's names (timm's for the ViT)."""
    block = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
             "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    fixed = {"visual.conv1.weight": "visual.patch_embed.proj.weight", "visual.ln_pre": "visual.norm_pre",
             "visual.ln_post": "visual.norm", "ln_final": "text.norm", "token_embedding": "text.token_embedding"}
    out = {}
    for key, value in state.items():
        if key in OPENAI_META:
            continue
        name = key
        for prefix, ours in (("visual.transformer.resblocks.", "visual.blocks."), ("transformer.resblocks.", "text.blocks.")):
            if key.startswith(prefix):
                n, rest = key[len(prefix):].split(".", 1)
                rest = next((rest.replace(a, b, 1) for a, b in block.items() if rest.startswith(a)), rest)
                name = f"{ours}{n}.{rest}"
        name = next((name.replace(a, b, 1) for a, b in fixed.items() if name.startswith(a + ".") or name == a), name)
        out[name] = value
    special = {"visual.class_embedding": ("visual.cls_token", lambda t: t.reshape(1, 1, -1)),
               "visual.positional_embedding": ("visual.pos_embed", lambda t: t.unsqueeze(0)),
               "positional_embedding": ("text.pos_embed", lambda t: t.unsqueeze(0)),
               "visual.proj": ("visual_proj.weight", lambda t: t.T), "text_projection": ("text_proj.weight", lambda t: t.T)}
    for key, (name, f) in special.items():
        if key in out:
            out[name] = f(out.pop(key)).contiguous()
    if "visual.patch_embed.proj.weight" in out:  # OpenAI's patch embedding has no bias
        out["visual.patch_embed.proj.bias"] = torch.zeros(cfg.vision.width)
    return out




# ----------------------------------------------------------------------------------------------
# Converted models as train.py checkpoints

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path: str) -> dict:
    """A .safetensors file: an 8-byte little-endian header length, a JSON header of each tensor's
    dtype, shape and byte offsets (counted from the end of the header), then the raw little-endian
    bytes. A bad or truncated file stops with one sentence."""
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    if not 0 <= n <= len(blob) - 8:
        raise ValueError(f"{path} is not a safetensors file or is truncated (a header of {n} bytes in {len(blob)})")
    try:
        header = json.loads(blob[8:8 + n])
    except ValueError as e:
        raise ValueError(f"{path}: the safetensors header is not JSON ({e})") from None
    data, out = memoryview(blob)[8 + n:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}, not one read here")
        (begin, end), shape = info["data_offsets"], info["shape"]
        if end - begin != math.prod(shape) * dtype.itemsize or end > len(data):
            raise ValueError(f"{path}: tensor {name} is truncated or its offsets do not fit its shape {shape}")
        out[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape) if end > begin \
            else torch.empty(shape, dtype=dtype)
    return out


def read_weights(path: str) -> dict:
    """A state dict from a file: safetensors, a plain (open_clip) state dict, one nested under
    "state_dict", or OpenAI's TorchScript archive. Half-precision weights are read as float32."""
    try:
        state = read_safetensors(path) if path.endswith(".safetensors") else \
            torch.load(path, map_location="cpu", weights_only=True)
    except ValueError:
        raise
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except Exception:
        try:
            state = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise ValueError(f"{path} is neither a state dict nor a TorchScript archive ({e})") from None
    except Exception:
        try:
            state = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise ValueError(f"{path} is neither a state dict nor a TorchScript archive ({e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()}


def convert_openai(weights: str, bpe: str, out: str, act: str = "quick_gelu") -> str:
    """Write OUT/ckpt.pt: the CLIP of an OpenAI-layout file with CLIP's BPE tokenizer, readable
    by eval.py, viz.py, bench.py and `train.py --method ranking --init`."""
    model = clip_from_openai(read_weights(weights), act)
    tokenizer = CLIPTokenizer.from_file(bpe, context_length=model.cfg.text.context_length)
    if len(tokenizer) != model.cfg.text.vocab_size:
        raise ValueError(f"{bpe} makes {len(tokenizer)} tokens but {weights} embeds {model.cfg.text.vocab_size}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ckpt.pt")
    v = model.cfg.vision
    # the flags train.py would have had (its other flags read back as their defaults)
    config = dict(method="none", image_size=v.image_size, patch_size=v.patch_size, width=v.width, depth=v.depth,
                  heads=v.heads, steps=0)
    save_checkpoint(path, dict(kind="clip", config=config, model_config=asdict(model.cfg), model=model.state_dict(),
                                     step=0, tokenizer=tokenizer.state_dict(), train_seconds=0.0,
                                     converted_from=os.path.abspath(weights)))
    return path


def convert_gpt2(weights: str, vocab: str, merges: str, out: str) -> str:
    """Write OUT/ckpt.pt: a GPT-2 (Hugging Face layout) with its tokenizer as a `--method lm`
    checkpoint, so that `train.py --method evlgen --lm OUT/ckpt.pt` captions with it frozen."""
    lm = CausalLM.from_gpt2(read_weights(weights))
    tokenizer = GPT2Tokenizer.from_files(vocab, merges, context_length=lm.cfg.context_length)
    if len(tokenizer) != lm.cfg.vocab_size:
        raise ValueError(f"{vocab} holds {len(tokenizer)} tokens but {weights} embeds {lm.cfg.vocab_size}")
    lm.cfg.eos_id = tokenizer.eos_id
    model = LanguageModel(lm.cfg)
    model.lm.load_state_dict(lm.state_dict())
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ckpt.pt")
    config = dict(method="lm", steps=0, lm_width=lm.cfg.width, lm_depth=lm.cfg.depth, lm_heads=lm.cfg.heads,
                  lm_context=lm.cfg.context_length)
    save_checkpoint(path, dict(kind="lm", config=config, model_config=asdict(lm.cfg), model=model.state_dict(),
                                     step=0, tokenizer=tokenizer.state_dict(), train_seconds=0.0,
                                     converted_from=os.path.abspath(weights)))
    return path


if __name__ == "__main__":
    import argparse
    import sys
    p = argparse.ArgumentParser(description="Convert pretrained weights into a train.py checkpoint: a CLIP "
                                            "(OpenAI / open_clip layout) or a GPT-2 (Hugging Face layout).")
    p.add_argument("--openai", help="CLIP weights: an open_clip state dict or OpenAI's TorchScript file")
    p.add_argument("--bpe", help="with --openai: CLIP's merges file, bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--act", default="quick_gelu", choices=("quick_gelu", "gelu"),
                   help="with --openai: OpenAI's releases use quick_gelu; open_clip's LAION ones gelu (but its -quickgelu)")
    p.add_argument("--gpt2", help="GPT-2 weights (GPT2Model or GPT2LMHeadModel state dict)")
    p.add_argument("--vocab", help="with --gpt2: vocab.json")
    p.add_argument("--merges", help="with --gpt2: merges.txt")
    p.add_argument("--out", required=True, help="folder for ckpt.pt")
    a = p.parse_args()
    if bool(a.openai) == bool(a.gpt2) or (a.openai and not a.bpe) or (a.gpt2 and not (a.vocab and a.merges)):
        p.error("give --openai WEIGHTS --bpe FILE, or --gpt2 WEIGHTS --vocab FILE --merges FILE")
    try:
        print(convert_openai(a.openai, a.bpe, a.out, a.act) if a.openai else convert_gpt2(a.gpt2, a.vocab, a.merges, a.out))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
