"""Train the embedded tiny Stable Diffusion (sd-emoji-tiny) from scratch.

Three steps, each resumable (run the same command again and it continues from the checkpoint):

    python training/train.py vae    --data /work/emoji-data/prepared --run /work/train-runs/emoji --minutes 8
    python training/train.py unet   --data /work/emoji-data/prepared --run /work/train-runs/emoji --minutes 120
    python training/train.py export --run /work/train-runs/emoji --out models/sd-emoji-tiny

`vae` trains the AutoencoderKL (64x64x3 -> 16x16x4). `unet` trains the UNet and a small CLIPTextModel
jointly on the frozen VAE's latents. `export` writes a diffusers StableDiffusionPipeline folder in fp16.

Why v-prediction + zero terminal SNR + trailing spacing: with SD's default epsilon objective the tiny
model learns to use the signal that the scaled-linear schedule leaves at the last step, which sampling
never provides, and gives seed-dependent noise (see /work/shared/embedded-model-notes.md). Rescaling the
betas to zero terminal SNR and predicting v removes that leak; trailing spacing makes sampling start at
the pure-noise step. All of it lives in scheduler_config.json, so every diffusers sampler picks it up.

Runs on CUDA (bf16 autocast) or CPU (fp32). Stop with Ctrl-C or `kill -TERM <pid>`: it saves a
checkpoint before exiting.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "webui" / "engine" / "model_configs" / "clip-tokenizer"

# ---------------------------------------------------------------------------------------------
# Model sizes. "emoji" is the shipped model; "tiny" is for tests (seconds on a CPU).
# ---------------------------------------------------------------------------------------------
CONFIGS = {
    "emoji": {
        "vae": dict(block_out_channels=(32, 64, 64), layers_per_block=1),  # 0.95 M params
        # ~6 M params. No attention at the 16x16 level: it tripled the CPU step time, and the prompt
        # still reaches every pixel through the cross-attention at 8x8 and 4x4.
        "unet": dict(block_out_channels=(32, 64, 128), layers_per_block=2, attention_head_dim=8, attention=(False, True, True)),
        # hidden 96 instead of 128 keeps the whole folder under 30 MB (the token table dominates)
        "text": dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4),
    },
    "tiny": {
        "vae": dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8),
        "unet": dict(block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
                     attention=(False, True, True)),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    },
}
IMAGE_SIZE = 64  # native resolution; latents are 16x16

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    steps_offset=1,
)

SAMPLE_PROMPTS = ["red apple", "grinning face", "snowman", "dog face", "pizza", "rocket", "tulip", "heavy black heart"]


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> tuple[torch.device, torch.dtype | None]:
    """CUDA with bf16 autocast when there is a GPU, else CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device.type, dtype=amp_dtype)


def save_atomic(obj, path: Path) -> None:
    """Write to a temp name and rename, so a kill mid-save never corrupts the checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it and saves a checkpoint before exiting."""

    def __init__(self):
        self.stop = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, *_):
        log("stop requested: saving checkpoint")
        self.stop = True


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_dataset(data_dir: Path) -> tuple[torch.Tensor, list[list[str]], list[dict]]:
    """All images as one uint8 tensor [N, 3, 64, 64] (the data set is small), plus captions."""
    records = [json.loads(line) for line in open(data_dir / "metadata.jsonl", encoding="utf-8")]
    arrays = [np.asarray(Image.open(data_dir / r["file"]).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))) for r in records]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, [r["captions"] for r in records], records


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    # Same call as StableDiffusionPipeline.encode_prompt: pad to 77, no attention mask.
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def make_vae(cfg: dict):
    from diffusers import AutoencoderKL

    n = len(cfg["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
                         down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n, **cfg)


def make_unet(cfg: dict, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    cfg = dict(cfg)
    attention = cfg.pop("attention")  # per level, from the highest resolution down
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return UNet2DConditionModel(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4,
                                cross_attention_dim=cross_attention_dim, down_block_types=down, up_block_types=up, **cfg)


def make_text_encoder(cfg: dict, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    # bos/eos/pad ids of the real CLIP tokenizer; eos_token_id decides where the pooled output is taken
    config = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407, projection_dim=cfg["hidden_size"], **cfg)
    return CLIPTextModel(config)


def make_noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def save_grid(rows: list[list[Image.Image]], path: Path, labels: list[str] | None = None) -> None:
    """Paste a list of rows of equally sized PIL images into one PNG."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(img, (j * w, i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


# ---------------------------------------------------------------------------------------------
# Stage 1: VAE
# ---------------------------------------------------------------------------------------------
def train_vae(args) -> dict:
    device, amp = pick_device()
    seed_everything(args.seed)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    images, _, _ = load_dataset(Path(args.data))
    # Hold out every 20th image to report honest PSNR.
    idx = torch.arange(len(images))
    val_idx, train_idx = idx[::20], idx[idx % 20 != 0]
    vae = make_vae(CONFIGS[args.config]["vae"]).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    step, ckpt_path = 0, run / "vae_ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); gen.set_state(ck["gen"])
        step = ck["step"]
        log(f"resumed VAE from step {step}")

    def checkpoint():
        save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step}, ckpt_path)

    stop, t0, last_ck = StopFlag(), time.time(), time.time()
    from tqdm import tqdm

    bar = tqdm(total=args.max_steps, initial=step, desc="vae", mininterval=5, disable=not args.progress)
    vae.train()
    while step < args.max_steps and not stop.stop and (time.time() - t0) < args.minutes * 60:
        batch = to_model_range(images[train_idx[torch.randint(len(train_idx), (args.batch,), generator=gen)]]).to(device)
        with autocast(device, amp):
            post = vae.encode(batch).latent_dist
            z = post.sample(generator=None)
            rec = vae.decode(z).sample.float()
        # L1 keeps emoji edges sharp; a tiny KL keeps the latent well scaled for diffusion.
        loss = F.l1_loss(rec, batch) + F.mse_loss(rec, batch) + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            with open(run / "vae_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "time": time.time()}) + "\n")
        if time.time() - last_ck > args.checkpoint_minutes * 60:
            checkpoint(); last_ck = time.time()
    bar.close()
    checkpoint()

    # Held-out PSNR and the latent scaling factor (1 / std of the latents, as SD does).
    vae.eval()
    with torch.no_grad():
        val = to_model_range(images[val_idx]).to(device)
        rec = vae(val, sample_posterior=False).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (val + 1) / 2).item()
        psnr = 10 * math.log10(1.0 / max(mse, 1e-10))
        lat = torch.cat([vae.encode(to_model_range(images[i:i + 256]).to(device)).latent_dist.mean
                         for i in range(0, len(images), 256)])
        scale = 1.0 / lat.std().item()
    vae.register_to_config(scaling_factor=round(scale, 4))
    vae.save_pretrained(run / "vae")
    save_grid([tensor_to_pil(val[:16].cpu()), tensor_to_pil(rec[:16].cpu())], run / "vae_recon.png")
    info = {"step": step, "psnr_db": round(psnr, 2), "latent_std": lat.std().item(), "scaling_factor": scale}
    (run / "vae_info.json").write_text(json.dumps(info, indent=1))
    log(f"VAE done: {info}")
    return info


# ---------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_latents(vae, images_u8: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-compute posterior mean/std once: the VAE is frozen, so this saves its cost every step."""
    means, stds = [], []
    for i in range(0, len(images_u8), 256):
        dist = vae.encode(to_model_range(images_u8[i:i + 256]).to(device)).latent_dist
        means.append(dist.mean.cpu()); stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


class EMA:
    """Exponential moving average of the weights; sampling from it gives cleaner images."""

    def __init__(self, modules: dict, decay: float):
        self.decay = decay
        self.shadow = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights are forgotten fast
        for k, m in modules.items():
            for pe, p in zip(self.shadow[k].parameters(), m.parameters()):
                pe.lerp_(p.detach(), 1 - d)


def build_pipeline(unet, text_encoder, vae, tokenizer, scheduler_name: str = "DPMSolverMultistepScheduler"):
    import diffusers
    from diffusers import StableDiffusionPipeline

    # clip_sample=False is kept in the saved config although this scheduler ignores it: a DDIMScheduler
    # made from it with from_config would otherwise clip latents to [-1, 1] and draw garbage.
    scheduler = getattr(diffusers, scheduler_name).from_config({**SCHEDULER_CONFIG, "clip_sample": False})
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seeds: list[int], path: Path, guidance: float, steps: int = 20) -> None:
    rows = []
    for seed in seeds:
        g = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                   height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pil")
        rows.append(out.images)
    save_grid(rows, path)


def learning_rate(args, step: int) -> float:
    """Linear warm-up, constant, then (when asked) a linear decay to --lr-end.

    The run length is not known when training starts, so the decay is set on the resume that is to
    be the last: --decay-start is an absolute step, so the schedule survives further resumes.
    """
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.decay_start is not None and step >= args.decay_start:
        done = min(1.0, (step - args.decay_start) / max(1, args.decay_steps))
        lr = args.lr + (args.lr_end - args.lr) * done
    return lr


def train_unet(args) -> dict:
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    device, amp = pick_device()
    seed_everything(args.seed)
    run = Path(args.run)
    cfg = CONFIGS[args.config]
    images, captions, records = load_dataset(Path(args.data))
    vae = AutoencoderKL.from_pretrained(run / "vae").to(device).eval().requires_grad_(False)
    scale = vae.config.scaling_factor
    lat_mean, lat_std = encode_latents(vae, images, device)
    tokenizer = load_tokenizer()
    # Tokenize every caption variant once; each step picks one variant per image at random.
    flat = [c for caps in captions for c in caps]
    flat_ids = tokenize(tokenizer, flat)
    offsets = torch.tensor([0] + [len(c) for c in captions]).cumsum(0)
    counts = torch.tensor([len(c) for c in captions])
    empty_ids = tokenize(tokenizer, [""])[0]

    text_encoder = make_text_encoder(cfg["text"], len(tokenizer)).to(device)
    unet = make_unet(cfg["unet"], cfg["text"]["hidden_size"]).to(device)
    modules = {"unet": unet, "text_encoder": text_encoder}
    # torch.compile fuses the many small CPU ops of a tiny UNet; checkpoints use the plain modules.
    unet_fwd = torch.compile(unet) if args.compile else unet
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = EMA(modules, args.ema_decay)
    noise_sched = make_noise_scheduler()
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    gen = torch.Generator().manual_seed(args.seed)

    step, seen, train_seconds = 0, 0, 0.0
    ckpt_path = run / "unet_ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(ck[k]); ema.shadow[k].load_state_dict(ck["ema_" + k])
        opt.load_state_dict(ck["opt"]); gen.set_state(ck["gen"]); torch.set_rng_state(ck["torch_rng"])
        step, seen, train_seconds = ck["step"], ck["seen"], ck["train_seconds"]
        log(f"resumed UNet from step {step} ({seen} samples, {train_seconds / 60:.1f} min)")
    meta = {"config": args.config, "text": cfg["text"], "unet": cfg["unet"], "batch": args.batch, "lr": args.lr,
            "ema_decay": args.ema_decay, "data": str(args.data), "n_images": len(images)}
    (run / "unet_meta.json").write_text(json.dumps(meta, indent=1))

    def checkpoint():
        ck = {k: m.state_dict() for k, m in modules.items()}
        ck.update({"ema_" + k: m.state_dict() for k, m in ema.shadow.items()})
        ck.update(opt=opt.state_dict(), gen=gen.get_state(), torch_rng=torch.get_rng_state(), step=step, seen=seen,
                  train_seconds=train_seconds, meta=meta)
        save_atomic(ck, ckpt_path)

    def samples():
        pipe = build_pipeline(ema.shadow["unet"], ema.shadow["text_encoder"], vae, tokenizer)
        pipe.set_progress_bar_config(disable=True)
        sample_grid(pipe, SAMPLE_PROMPTS, [0, 1], run / "samples" / f"step{step:07d}.png", args.guidance)

    stop, t_start, last_ck, last_sample = StopFlag(), time.time(), time.time(), time.time()
    bar = tqdm(total=args.max_steps, initial=step, desc="unet", mininterval=10, disable=not args.progress)
    losses = []
    unet.train(); text_encoder.train()
    while step < args.max_steps and not stop.stop and (time.time() - t_start) < args.minutes * 60:
        t_step = time.time()
        idx = torch.randint(len(images), (args.batch,), generator=gen)
        pick = offsets[idx] + (torch.rand(args.batch, generator=gen) * counts[idx]).long()
        ids = flat_ids[pick]
        drop = torch.rand(args.batch, generator=gen) < args.uncond_prob  # empty prompt -> classifier-free guidance
        ids[drop] = empty_ids
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=gen)
        x0, noise, t, ids = x0.to(device), noise.to(device), t.to(device), ids.to(device)
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        xt, target = a * x0 + s * noise, a * noise - s * x0  # v-prediction target
        with autocast(device, amp):
            cond = text_encoder(ids)[0]
            pred = unet_fwd(xt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g_ in opt.param_groups:
            g_["lr"] = learning_rate(args, step)
        opt.step()
        ema.update(modules, step)
        step += 1
        seen += args.batch
        train_seconds += time.time() - t_step
        losses.append(loss.item())
        bar.update(1)
        if step % args.log_every == 0:
            avg = sum(losses) / len(losses); losses = []
            bar.set_postfix(loss=f"{avg:.4f}")
            with open(run / "unet_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "seen": seen, "loss": avg, "train_min": train_seconds / 60,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
            if not args.progress:
                log(f"step {step} seen {seen} loss {avg:.4f} ({train_seconds / 60:.1f} min)")
        if time.time() - last_ck > args.checkpoint_minutes * 60:
            checkpoint(); last_ck = time.time()
        if args.sample_minutes and time.time() - last_sample > args.sample_minutes * 60:
            samples(); last_sample = time.time()
    bar.close()
    checkpoint()
    if args.sample_minutes:
        samples()
    info = {"step": step, "seen": seen, "train_minutes": round(train_seconds / 60, 1),
            "epochs": round(seen / len(images), 1), "last_loss": losses[-1] if losses else None}
    log(f"UNet stage stopped: {info}")
    return info


# ---------------------------------------------------------------------------------------------
# Stage 3: export a diffusers folder
# ---------------------------------------------------------------------------------------------
def export(args) -> Path:
    """Write the EMA weights as a StableDiffusionPipeline folder (fp16 safetensors)."""
    from diffusers import AutoencoderKL

    run, out = Path(args.run), Path(args.out)
    ck = torch.load(run / "unet_ckpt.pt", weights_only=False, map_location="cpu")
    meta = ck["meta"]
    cfg = CONFIGS[meta["config"]]
    tokenizer = load_tokenizer()
    text_encoder = make_text_encoder(cfg["text"], len(tokenizer))
    unet = make_unet(cfg["unet"], cfg["text"]["hidden_size"])
    prefix = "" if args.no_ema else "ema_"
    text_encoder.load_state_dict(ck[prefix + "text_encoder"]); unet.load_state_dict(ck[prefix + "unet"])
    vae = AutoencoderKL.from_pretrained(run / "vae")
    pipe = build_pipeline(unet, text_encoder, vae, tokenizer, args.scheduler)
    pipe.to(torch.float16)
    tmp = out.with_name(out.name + ".export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # Keep hand-written files (README.md card, LICENSE) of an earlier export.
    for keep in ("README.md", "LICENSE", "LICENSE-Apache-2.0.txt"):
        if (out / keep).exists():
            shutil.copy2(out / keep, tmp / keep)
    # Tokenizer: exactly the files built by training/build_tokenizer.py. save_pretrained would add a
    # 3.6 MB tokenizer.json that the 30 MB budget cannot afford (vocab.json + merges.txt suffice).
    # transformers loads a model in the dtype named in its config, diffusers in fp32: with "float16"
    # there, a plain from_pretrained(folder) would mix fp16 and fp32 and fail on the CPU.
    te_cfg = json.loads((tmp / "text_encoder" / "config.json").read_text())
    te_cfg["dtype"] = "float32"
    (tmp / "text_encoder" / "config.json").write_text(json.dumps(te_cfg, indent=2) + "\n")
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
    (tmp / "training_info.json").write_text(json.dumps(
        {"step": ck["step"], "samples_seen": ck["seen"], "train_minutes": round(ck["train_seconds"] / 60, 1),
         "ema": not args.no_ema, **meta}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"exported step {ck['step']} to {out} ({size / 1e6:.1f} MB)")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "unet", "export"])
    ap.add_argument("--data", default="/work/emoji-data/prepared")
    ap.add_argument("--run", default="/work/train-runs/emoji", help="checkpoints, logs and sample grids")
    ap.add_argument("--out", default=str(REPO / "models" / "sd-emoji-tiny"), help="export folder")
    ap.add_argument("--config", default="emoji", choices=list(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--minutes", type=float, default=1e9, help="stop this run after so many wall minutes")
    ap.add_argument("--max-steps", type=int, default=10**9, help="total steps (counts those before a resume)")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--sample-minutes", type=float, default=15.0, help="0 = no sample grids")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--decay-start", type=int, default=None, help="absolute step where the linear LR decay begins")
    ap.add_argument("--decay-steps", type=int, default=5000, help="steps of the decay, from --lr to --lr-end")
    ap.add_argument("--lr-end", type=float, default=0.0)
    ap.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the sample grids")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (faster steps after a warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="plain log lines instead of tqdm")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    ap.add_argument("--scheduler", default="DPMSolverMultistepScheduler", help="scheduler class written on export")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "vae":
        args.batch, args.lr = args.batch or 32, args.lr or 1e-3
        train_vae(args)
    elif args.stage == "unet":
        args.batch, args.lr = args.batch or 64, args.lr or 1e-3
        train_unet(args)
    else:
        export(args)


if __name__ == "__main__":
    sys.exit(main())
