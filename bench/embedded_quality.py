"""Quality benchmark of the embedded model (models/sd-emoji-tiny).

For a fixed list of 100 prompts taken from the training captions, 4 seeds each, generate at the
native 64x64 with 20 steps, then find each image's 5 nearest training images in a plain feature space
(32x32 RGB on white, Euclidean). A *hit* is when one of the 5 shows the prompted emoji (either style).
Chance rate: the probability that 5 random training images include it.

    python bench/embedded_quality.py                 # all 100 prompts (400 images)
    python bench/embedded_quality.py --prompts 20    # quick subset (the first 20 of the list)

Prints hit rate, chance rate and seconds per image; writes grids of prompts x seeds beside the
training images of that emoji to bench/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

# (emoji id as in emoji.json "unified", caption) -- drawn once with random.Random(2026) from the
# training captions of training/prepare_data.py's default data set, then frozen here.
PROMPTS = [
    ("1F3C5", "sports medal emoji"),
    ("1F4F5", "no mobile phones emoji"),
    ("1F90E", "brown heart emoji"),
    ("1F921", "clown face emoji"),
    ("1F9E8", "firecracker emoji"),
    ("1F3AA", "circus tent emoji"),
    ("1F469-200D-1F393", "female student"),
    ("1F9C9", "mate drink emoji"),
    ("1F9D1-200D-1F9BD", "person in manual wheelchair"),
    ("1F96E", "moon cake emoji"),
    ("1F638", "smile cat"),
    ("2734-FE0F", "eight pointed black star"),
    ("1F98F", "rhinoceros"),
    ("1F95C", "peanuts"),
    ("25B6-FE0F", "black right pointing triangle emoji"),
    ("2708-FE0F", "airplane emoji"),
    ("26E9-FE0F", "shinto shrine emoji"),
    ("1F6F4", "scooter emoji"),
    ("2660-FE0F", "black spade suit"),
    ("26F9-FE0F", "person with ball"),
    ("1F9AC", "bison emoji"),
    ("1F684", "bullettrain side"),
    ("1F469-200D-2764-FE0F-200D-1F468", "couple with heart: woman, man emoji"),
    ("0033-FE0F-20E3", "three"),
    ("1F9D1-200D-1F4BB", "technologist emoji"),
    ("1F377", "wine glass"),
    ("1F3BA", "trumpet emoji"),
    ("1F4B3", "credit card emoji"),
    ("1F3A0", "carousel horse emoji"),
    ("1F695", "taxi"),
    ("1F193", "free"),
    ("1FAAE", "hair pick emoji"),
    ("1F6F3-FE0F", "passenger ship emoji"),
    ("1FAA2", "knot"),
    ("1F4EA", "mailbox closed"),
    ("1F468-200D-1F469-200D-1F467-200D-1F466", "family: man, woman, girl, boy emoji"),
    ("1F60B", "yum"),
    ("1F474", "older man"),
    ("1F530", "japanese symbol for beginner emoji"),
    ("1F54D", "synagogue emoji"),
    ("1F58B-FE0F", "lower left fountain pen"),
    ("264A", "gemini emoji"),
    ("1F924", "drooling face"),
    ("1F9DC-200D-2640-FE0F", "mermaid"),
    ("1F36E", "custard emoji"),
    ("23EA", "black left pointing double triangle"),
    ("1F521", "abcd"),
    ("1F389", "party popper"),
    ("1F970", "smiling face with smiling eyes and three hearts"),
    ("1F948", "second place medal"),
    ("1F4BD", "minidisc emoji"),
    ("1F4B4", "banknote with yen sign emoji"),
    ("1F6A3-200D-2642-FE0F", "man rowing boat"),
    ("1F3EC", "department store"),
    ("1F9E3", "scarf"),
    ("1FADB", "pea pod"),
    ("2194-FE0F", "left right arrow"),
    ("1F999", "llama emoji"),
    ("1F4DF", "pager emoji"),
    ("1F304", "sunrise over mountains"),
    ("1FAF1", "rightwards hand"),
    ("1F567", "clock1230"),
    ("1F55C", "clock face one thirty emoji"),
    ("1F6AC", "smoking symbol emoji"),
    ("1F63B", "smiling cat face with heart shaped eyes emoji"),
    ("1F38B", "tanabata tree emoji"),
    ("1F60E", "smiling face with sunglasses emoji"),
    ("1F9AA", "oyster"),
    ("1F96A", "sandwich"),
    ("1F7E6", "large blue square emoji"),
    ("1F3C3-200D-2642-FE0F-200D-27A1-FE0F", "man running facing right"),
    ("1F642", "slightly smiling face emoji"),
    ("1F916", "robot face"),
    ("2653", "pisces emoji"),
    ("1F9C8", "butter"),
    ("1F60D", "smiling face with heart shaped eyes"),
    ("1F937", "shrug emoji"),
    ("1F480", "skull emoji"),
    ("1F637", "mask"),
    ("1F97E", "hiking boot"),
    ("1F6CD-FE0F", "shopping bags"),
    ("1F923", "rolling on the floor laughing emoji"),
    ("1F92B", "face with finger covering closed lips"),
    ("1F305", "sunrise"),
    ("1F995", "sauropod emoji"),
    ("1F469-200D-1F3A8", "woman artist"),
    ("26CF-FE0F", "pick"),
    ("1F3D4-FE0F", "snow capped mountain emoji"),
    ("1F338", "cherry blossom emoji"),
    ("1FADF", "splatter"),
    ("1F935-200D-2640-FE0F", "woman in tuxedo"),
    ("1FA90", "ringed planet emoji"),
    ("2196-FE0F", "arrow upper left"),
    ("1F9D1-200D-1F9D1-200D-1F9D2", "family: adult, adult, child emoji"),
    ("1F646", "ok woman"),
    ("1F6B6-200D-2642-FE0F-200D-27A1-FE0F", "man walking facing right emoji"),
    ("1F3EF", "japanese castle emoji"),
    ("1F6D5", "hindu temple"),
    ("1F469-200D-1F469-200D-1F466-200D-1F466", "woman woman boy boy"),
    ("1F3CA-200D-2640-FE0F", "woman swimming emoji"),
]
SEEDS = [0, 1, 2, 3]
FEAT = 32  # feature space: 32x32 RGB


def features(images: list[Image.Image]) -> np.ndarray:
    """32x32 RGB in [0, 1], flattened. Emoji are drawn on white, so background matches too."""
    arr = [np.asarray(im.convert("RGB").resize((FEAT, FEAT), Image.BILINEAR), dtype=np.float32) / 255.0 for im in images]
    return np.stack(arr).reshape(len(arr), -1)


def chance_rate(n_total: int, n_match: int, k: int) -> float:
    """P(at least one of k images drawn without replacement from n_total shows the emoji)."""
    return 1.0 - math.comb(n_total - n_match, k) / math.comb(n_total, k)


def label(img: Image.Image, text: str, width: int = 200) -> Image.Image:
    """The image with a text strip on its left (prompt names in the grid)."""
    out = Image.new("RGB", (width + img.width, img.height), "white")
    ImageDraw.Draw(out).multiline_text((4, 4), "\n".join(text[i:i + 30] for i in range(0, len(text), 30)), fill="black")
    out.paste(img, (width, 0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "sd-emoji-tiny"))
    ap.add_argument("--data", default="/work/emoji-data/prepared", help="output of training/prepare_data.py")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.0, help="CFG scale (the model card's recommended value)")
    ap.add_argument("--k", type=int, default=5, help="nearest neighbours checked")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline

    # Training images and which emoji each shows.
    data = Path(args.data)
    records = [json.loads(line) for line in open(data / "metadata.jsonl", encoding="utf-8")]
    train_imgs = [Image.open(data / r["file"]).convert("RGB") for r in records]
    train_feat = features(train_imgs)
    train_emoji = np.array([r["emoji"] for r in records])
    prompts = PROMPTS[: args.prompts]
    missing = [e for e, _ in prompts if e not in set(train_emoji)]
    if missing:
        raise SystemExit(f"prompt emoji not in the training data {data}: {missing[:5]}")

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    info_path = Path(args.model) / "training_info.json"
    guidance = args.guidance

    # Warm-up, then time single-image generations (what one user click costs).
    pipe("red apple", num_inference_steps=args.steps, guidance_scale=guidance, height=64, width=64)
    t0 = time.perf_counter()
    for i in range(3):
        pipe(prompts[i % len(prompts)][1], num_inference_steps=args.steps, guidance_scale=guidance, height=64, width=64,
             generator=torch.Generator().manual_seed(i))
    single_s = (time.perf_counter() - t0) / 3

    hits, chance, rows, gen_s = [], [], [], 0.0
    for emoji, caption in prompts:
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        t0 = time.perf_counter()
        images = pipe([caption] * len(SEEDS), num_inference_steps=args.steps, guidance_scale=guidance,
                      height=64, width=64, generator=gens).images
        gen_s += time.perf_counter() - t0
        d = ((features(images)[:, None, :] - train_feat[None]) ** 2).sum(-1)
        nearest = np.argsort(d, axis=1)[:, : args.k]
        hits += [bool((train_emoji[nn] == emoji).any()) for nn in nearest]
        chance.append(chance_rate(len(records), int((train_emoji == emoji).sum()), args.k))
        # Grid row: the seeds' images | the training images of this emoji | nearest neighbour of seed 0.
        refs = [train_imgs[i] for i in np.flatnonzero(train_emoji == emoji)[:2]]
        row = Image.new("RGB", (64 * (len(SEEDS) + 3) + 16, 64), "white")
        for j, im in enumerate(images):
            row.paste(im.resize((64, 64)), (64 * j, 0))
        for j, im in enumerate(refs + [train_imgs[nearest[0][0]]]):
            row.paste(im, (64 * (len(SEEDS) + j) + 16, 0))
        mark = "".join("x" if h else "." for h in hits[-len(SEEDS):])
        rows.append(label(row, f"{caption} [{mark}]"))

    n = len(hits)
    result = {
        "model": args.model, "prompts": len(prompts), "seeds": len(SEEDS), "images": n, "steps": args.steps,
        "guidance_scale": guidance, "scheduler": type(pipe.scheduler).__name__,
        "hit_rate": round(sum(hits) / n, 4), "chance_rate": round(float(np.mean(chance)), 5),
        "s_per_image_batched": round(gen_s / n, 3), "s_per_image_single": round(single_s, 3),
        "load_s": round(load_s, 2), "torch_threads": torch.get_num_threads(),
        "training": json.loads(info_path.read_text()) if info_path.exists() else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for page in range(0, len(rows), 25):  # 25 prompts per PNG, so each grid is readable
        chunk = rows[page: page + 25]
        grid = Image.new("RGB", (chunk[0].width, 66 * len(chunk)), "white")
        for i, r in enumerate(chunk):
            grid.paste(r, (0, 66 * i))
        grid.save(out / f"embedded_quality_{page // 25:02d}.png")
    (out / "embedded_quality.json").write_text(json.dumps(result, indent=1))
    print(f"hit rate {result['hit_rate']:.3f} ({sum(hits)}/{n}), chance {result['chance_rate']:.4f}, "
          f"{result['s_per_image_single']:.2f} s/image single, {result['s_per_image_batched']:.2f} s/image batched "
          f"({args.steps} steps, 64x64, CFG {guidance}, {result['scheduler']}, {torch.get_num_threads()} threads)")
    print(f"grids: {out}/embedded_quality_*.png")


if __name__ == "__main__":
    main()
