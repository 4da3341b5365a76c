"""Textual inversion training (A1111's Train tab): a new embedding made from an initialization text, and an
embedding's vectors trained on pictures while the rest of the model stays frozen.

An embedding is trained where prompts use it: loaded into the text encoder's token table (embeddings.py), its name
in a prompt reads as its rows there. A hook on that table's lookup puts the vectors being trained in place of those
rows, so the gradients reach them and nothing else. The loss is the one the model was trained with, as A1111
computes it: the pictures' VAE latents noised at random timesteps, and the UNet's prediction of the noise (or of v)
against the truth, by mean squared error; AdamW (no weight decay) takes the steps.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from webui.engine.embeddings import Embedding
from webui.engine.fast_path import uncompiled
from webui.engine.img2img import as_rgb, check_picture_size
from webui.engine.inpainting_model import takes_masked_picture
from webui.engine.prompts import encode_prompt_pair
from webui.schemas import MAX_PROMPT_CHARS, GenerationRequest, InvalidRequest

log = logging.getLogger(__name__)

MAX_VECTORS = 75  # A1111's slider: one chunk of the prompt
EMBEDDING_SUFFIX = ".pt"  # what training reads and writes: A1111's layout
LATENT_SAMPLING = ("once", "deterministic", "random")  # A1111's "Choose latent sampling method"
CLIP_GRAD_MODES = ("disabled", "value", "norm")  # A1111's "Gradient Clipping"
PREVIEW_STEPS = 20  # A1111's previews: the training prompt, 20 steps, at the training size


class TrainingError(InvalidRequest):
    """What keeps a training run from starting or going on, found once it runs; the message says what to change."""


# --- a new embedding ----------------------------------------------------------------------------
def init_vectors(pipe, init_text: str, count: int) -> torch.Tensor:
    """`count` vectors from the token embeddings of `init_text`, as A1111 makes them: its first `count` tokens, each
    repeated in turn where it has fewer (two tokens over four vectors: a a b b); zeros for a text of no tokens."""
    table = pipe.text_encoder.get_input_embeddings().weight
    if table.is_meta:
        raise TrainingError("the model's token table is offloaded layer by layer (--lowvram): start without "
                            "--lowvram to create or train embeddings")
    ids = pipe.tokenizer(init_text, add_special_tokens=False).input_ids[:count]
    if not ids:
        return torch.zeros(count, table.shape[1])
    with torch.no_grad():
        rows = table[torch.tensor(ids, device=table.device)].float().cpu()
    return torch.stack([rows[i * len(ids) // count] for i in range(count)])


def write_embedding_file(path: Path, vectors: torch.Tensor, name: str, step: int,
                         checkpoint_hash: str | None = None, checkpoint_name: str | None = None) -> None:
    """The vectors in A1111's .pt layout (its loader reads string_to_param; string_to_token is what A1111 writes),
    written whole or not at all: a temporary file, then renamed (hidden meanwhile: the loader skips dot files)."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.detach().float().cpu().clone()},
            "name": name, "step": step, "sd_checkpoint": checkpoint_hash, "sd_checkpoint_name": checkpoint_name}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".partial-{uuid.uuid4().hex}{EMBEDDING_SUFFIX}")
    try:
        torch.save(data, temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


# --- the learning rate ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RateSchedule:
    """A1111's learning rate syntax: "0.005" (one rate throughout), or "0.005:100, 1e-3:1000, 1e-5": each rate
    until the step after it, the last one (without a step, or with -1) to the end. A last rate with a step ends the
    training there, as in A1111."""

    phases: tuple[tuple[float, int | None], ...]  # (rate, the step it lasts until; None: the last step)

    @classmethod
    def parse(cls, text: str, field_name: str = "learn_rate") -> "RateSchedule":
        """The schedule, or InvalidRequest naming the field and what to write."""
        pieces = [piece.strip() for piece in str(text or "").split(",")]
        while pieces and not pieces[-1]:  # a comma at the end
            pieces.pop()
        if not pieces:
            raise InvalidRequest(f"{field_name}: give a rate such as 0.005, or a schedule such as "
                                 "0.005:100, 1e-3:1000, 1e-5")
        phases: list[tuple[float, int | None]] = []
        for number, piece in enumerate(pieces, start=1):
            rate_text, colon, step_text = piece.partition(":")
            rate, until = _rate(rate_text, piece, field_name), None
            if colon:
                until = _until(step_text, piece, field_name)
            if phases and phases[-1][1] is None:
                raise InvalidRequest(f"{field_name}: {pieces[number - 2]!r} runs to the end, so nothing may follow "
                                     "it; give it a step (rate:step) or end the schedule there")
            if until is not None and phases and until <= phases[-1][1]:
                raise InvalidRequest(f"{field_name}: the steps must grow: {piece!r} ends at step {until}, not after "
                                     f"the step before ({phases[-1][1]})")
            phases.append((rate, until))
        return cls(tuple(phases))

    def rate_at(self, done: int, steps: int) -> float | None:
        """The rate of the step that follows `done` steps, in a run of `steps`; None where the training ends."""
        if done >= steps:
            return None
        return next((rate for rate, until in self.phases if done < (steps if until is None else until)), None)

    def end(self, steps: int) -> int:
        """The step the training stops at: `steps`, or sooner where the last rate has a step of its own."""
        last = self.phases[-1][1]
        return steps if last is None else min(last, steps)


def _rate(text: str, piece: str, field_name: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise InvalidRequest(f"{field_name}: {piece!r} does not start with a rate above 0 (such as 0.005 or 1e-3)")
    return rate


def _until(text: str, piece: str, field_name: str) -> int | None:
    try:
        step = int(text.strip())
    except ValueError:
        step = 0
    if step == -1:
        return None
    if step < 1:
        raise InvalidRequest(f"{field_name}: in {piece!r} the step after the colon must be a whole number of steps "
                             "(1 or more; -1: to the end)")
    return step


# --- prompts from the template -----------------------------------------------------------------------
def prompt_text(line: str, name: str, filewords: str, shuffle_tags: bool = False, tag_drop_out: float = 0.0,
                rng: random.Random | None = None) -> str:
    """A template line with [name] as the embedding's name and [filewords] as the picture's words, as A1111 fills
    them in: the words are tags split at commas, each left out with chance `tag_drop_out`, shuffled on request."""
    rng = rng or random.Random()
    tags = filewords.split(",")
    if tag_drop_out:
        tags = [tag for tag in tags if rng.random() > tag_drop_out]
    if shuffle_tags:
        rng.shuffle(tags)
    return line.replace("[filewords]", ",".join(tags)).replace("[name]", name)


# --- a training run -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingPicture:
    path: Path
    filewords: str  # the words [filewords] stands for: its .txt file's, else its file name's


@dataclass(frozen=True)
class TrainingPlan:
    """A checked training run (webui/textual_inversion.py makes it from A1111's fields)."""

    name: str  # the embedding, by the name prompts use
    pictures: tuple[TrainingPicture, ...]
    template: tuple[str, ...]  # the prompt template's lines
    width: int
    height: int
    steps: int  # the step to train up to, counting the embedding's steps so far (A1111's Max steps)
    learn_rate: RateSchedule
    log_folder: Path  # <log directory>/<date>/<name>: the copies (embeddings/) and previews (images/)
    batch_size: int = 1
    gradient_steps: int = 1  # batches whose gradients add up to one step
    save_every: int = 0  # a copy of the embedding in the log folder every N steps; 0: none
    preview_every: int = 0  # a preview picture every N steps; 0: none
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    latent_sampling: str = "once"
    clip_grad: str = "disabled"
    clip_grad_value: RateSchedule | None = None

    @property
    def copies_folder(self) -> Path:
        return self.log_folder / "embeddings"

    @property
    def previews_folder(self) -> Path:
        return self.log_folder / "images"


@dataclass
class TrainingStatus:
    """Where a run stands after a step."""

    step: int  # the embedding's steps so far
    first_step: int  # where this run started (the embedding's steps before it)
    last_step: int  # where it will stop
    loss: float
    learn_rate: float
    prompt: str  # the last prompt trained on
    last_copy: Path | None = None  # the last copy saved in the log folder


@dataclass
class TrainingOutcome:
    path: Path  # the embedding's file, written with the trained vectors (untouched when nothing was trained)
    first_step: int
    step: int  # the embedding's steps now
    stopped: bool = False  # Interrupt ended it early
    already_trained: bool = False  # the embedding had reached the last step before the run


class TrainingHooks(Protocol):
    """What a run reports to, and asks, as it goes (webui/textual_inversion.py's TrainingRun)."""

    def stopped(self) -> bool: ...

    def stage(self, text: str) -> None: ...

    def step(self, status: TrainingStatus) -> None: ...

    def preview(self, step: int, request: GenerationRequest, seed: int, image: Image.Image) -> None: ...


def train_embedding(engine, plan: TrainingPlan, hooks: TrainingHooks) -> TrainingOutcome:
    """Train the embedding `plan.name` on the loaded model, on the worker thread; its file is written back with the
    trained vectors at the end, or at Interrupt (as A1111 does), and read again so that prompts use it. TrainingError
    for what the user must change (the embedding, a picture, the model); the file stays as it was then."""
    engine.restore_device()  # after an unload-checkpoint; ModelLoadError without a model
    pipe, model = engine.pipe, engine.require_model()
    _check_model(engine)
    engine.refresh_embeddings()  # the file as it is now, and a new one made since the model loaded
    embedding = _embedding_named(engine.embeddings, plan.name)
    first = embedding.step or 0
    last = plan.learn_rate.end(plan.steps)
    if first >= last:
        return TrainingOutcome(embedding.path, first, first, already_trained=True)
    engine.without_loras()  # the model as it is: a LoRA merged for the last picture must not train in
    dataset = _Dataset(_encode_pictures(pipe, plan, hooks), plan)
    device = pipe._execution_device
    vectors = embedding.vectors.to(device, torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([vectors], lr=plan.learn_rate.rate_at(first, plan.steps), weight_decay=0.0)
    # A half-precision model's gradients would underflow: scaled up for the backward pass, as A1111 does.
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and pipe.unet.dtype == torch.float16)
    trainer = _Trainer(pipe, plan, dataset, vectors, optimizer, scaler)
    step, last_copy = first, None
    hooks.stage(f"Training from step {first}")
    with _training_mode(pipe, embedding.vector_ids[0], vectors):
        while step < last and not hooks.stopped():
            rate = plan.learn_rate.rate_at(step, plan.steps)
            loss, prompt = trainer.step(rate, step)
            step += 1
            if plan.save_every and step % plan.save_every == 0:
                last_copy = plan.copies_folder / f"{plan.name}-{step}{EMBEDDING_SUFFIX}"
                write_embedding_file(last_copy, vectors, f"{plan.name}-{step}", step, model.short_hash,
                                     model.entry.name)
            hooks.step(TrainingStatus(step, first, last, loss, rate, prompt, last_copy))
            if plan.preview_every and step % plan.preview_every == 0:
                _preview(engine, plan, embedding, vectors, step, prompt, hooks)
    if step > first:  # (Interrupt may come before the first step: then the file stays as it was)
        write_embedding_file(embedding.path, vectors, plan.name, step, model.short_hash, model.entry.name)
        engine.refresh_embeddings()  # the file changed: prompts use the trained vectors from now on
    return TrainingOutcome(embedding.path, first, step, stopped=step < last)


def _check_model(engine) -> None:
    if takes_masked_picture(engine.pipe.unet):
        raise TrainingError("the loaded model is made for inpainting; load the model it was made from to train "
                            "embeddings")
    settings = engine.settings
    if engine.placement.device == "cuda" and (settings.medvram or settings.lowvram):
        # Offloading moves the text encoder off the GPU while the UNet runs, before the backward pass needs it.
        raise TrainingError("training needs the text encoder and the UNet on the GPU together: start the server "
                            "without --medvram and --lowvram to train embeddings")


def _embedding_named(embeddings, name: str) -> Embedding:
    """The loaded embedding to train, from an A1111 .pt file (what training writes back)."""
    embedding = embeddings.loaded.get(name)
    if embedding is None:
        skipped = embeddings.skipped.get(name)
        why = f" ({skipped.skipped})" if skipped is not None else ""
        raise TrainingError(f"embedding_name: no embedding {name!r} fits the loaded model{why}; create one first "
                            "(Create embedding), or load the model it was made for")
    if embedding.path.suffix.lower() != EMBEDDING_SUFFIX:
        raise TrainingError(f"embedding_name: {name} is read from {embedding.path.name}; training writes A1111's "
                            f"{EMBEDDING_SUFFIX} files: create an embedding to train")
    return embedding


def _encode_pictures(pipe, plan: TrainingPlan, hooks: TrainingHooks) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each picture at the training size, through the VAE, as (latents, spread): sampled once from the VAE's
    distribution, or its mean with "deterministic" (spread None); with "random" the mean and the spread, sampled
    again at each use. Kept on the CPU."""
    vae, device = pipe.vae, pipe._execution_device
    encoded = []
    for number, picture in enumerate(plan.pictures, start=1):
        if hooks.stopped():
            break
        hooks.stage(f"Preparing dataset: picture {number} of {len(plan.pictures)}")
        pixels = _pixels(picture.path, plan.width, plan.height).to(device, vae.dtype)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        scale = vae.config.scaling_factor
        mean, std = dist.mean.float().cpu()[0] * scale, dist.std.float().cpu()[0] * scale
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise TrainingError(f"the VAE gave NaN for {picture.path.name}; start with --no-half-vae")
        if plan.latent_sampling == "random":
            encoded.append((mean, std))
        elif plan.latent_sampling == "deterministic":
            encoded.append((mean, None))
        else:
            encoded.append((mean + std * torch.randn_like(mean), None))
    return encoded


def _pixels(path: Path, width: int, height: int) -> torch.Tensor:
    """The picture as RGB at the training size (stretched, as A1111 resizes it), in [-1, 1], one row."""
    try:
        with Image.open(path) as opened:
            check_picture_size(*opened.size)
            picture = as_rgb(opened).resize((width, height), Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise TrainingError(f"data_root: {path.name} cannot be read as a picture ({err}); remove it or save it "
                            "again") from None
    array = np.asarray(picture, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


class _Dataset:
    """The pictures' latents in batches, in a shuffled order drawn again at each pass over them."""

    def __init__(self, latents: list, plan: TrainingPlan):
        self.latents, self.plan = latents, plan
        self.rng = random.Random()
        self._order: list[int] = []

    def batch(self) -> tuple[torch.Tensor, list[str]]:
        """The next batch: its latents (batch, 4, h, w) and a prompt for each picture."""
        plan, indexes = self.plan, []
        while len(indexes) < plan.batch_size:
            if not self._order:
                self._order = self.rng.sample(range(len(self.latents)), len(self.latents))
            indexes.append(self._order.pop())
        latents = [mean if spread is None else mean + spread * torch.randn_like(mean)
                   for mean, spread in (self.latents[i] for i in indexes)]
        prompts = [prompt_text(self.rng.choice(plan.template), plan.name, plan.pictures[i].filewords,
                               plan.shuffle_tags, plan.tag_drop_out, self.rng) for i in indexes]
        return torch.stack(latents), prompts


class _Trainer:
    """One optimizer step: `gradient_steps` batches' losses, backward, and the step."""

    def __init__(self, pipe, plan: TrainingPlan, dataset: _Dataset, vectors: torch.Tensor, optimizer, scaler):
        from diffusers import DDPMScheduler

        self.pipe, self.plan, self.dataset, self.vectors = pipe, plan, dataset, vectors
        self.optimizer, self.scaler = optimizer, scaler
        # The model's training noise schedule (its betas and prediction type), whatever sampler it runs with.
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)
        self.device = pipe._execution_device

    def step(self, rate: float, done: int) -> tuple[float, str]:
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        loss_sum, prompt = 0.0, ""
        for _ in range(self.plan.gradient_steps):
            loss, prompts = self._loss()
            if loss.requires_grad:  # else no prompt of the batch named the embedding (a template line without it)
                self.scaler.scale(loss / self.plan.gradient_steps).backward()
            loss_sum += loss.item() / self.plan.gradient_steps
            prompt = prompts[0]
        if not math.isfinite(loss_sum):
            raise TrainingError(f"the loss became {loss_sum} at step {done + 1}; lower the learning rate, or start "
                                "with --no-half")
        if self.vectors.grad is None:  # no prompt of these batches named the embedding: nothing to learn
            return loss_sum, prompt
        if self.plan.clip_grad != "disabled":
            self.scaler.unscale_(self.optimizer)
            limit = self.plan.clip_grad_value.rate_at(done, self.plan.steps) or self.plan.clip_grad_value.phases[-1][0]
            clip = torch.nn.utils.clip_grad_value_ if self.plan.clip_grad == "value" else torch.nn.utils.clip_grad_norm_
            clip([self.vectors], limit)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, prompt

    def _loss(self) -> tuple[torch.Tensor, list[str]]:
        unet = self.pipe.unet
        latents, prompts = self.dataset.batch()
        latents = latents.to(self.device, unet.dtype)
        cond = encode_prompt_pair(self.pipe, prompts, [])[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise.config.num_train_timesteps, (len(prompts),), device=self.device)
        noisy = self.noise.add_noise(latents, noise, timesteps)
        if self.noise.config.prediction_type == "v_prediction":
            target = self.noise.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        predicted = unet(noisy, timesteps, encoder_hidden_states=cond.to(unet.dtype)).sample
        return F.mse_loss(predicted.float(), target.float()), prompts


@contextlib.contextmanager
def _training_mode(pipe, first_row: int, vectors: torch.Tensor):
    """The model frozen, the embedding's rows read from `vectors` wherever gradients are on, the UNet's activations
    recomputed in the backward pass (as A1111 trains: memory for larger pictures), compiled parts run eagerly.
    All undone after, the embedding's rows too (a preview writes the vectors there; a run that fails writes no file)."""
    table = pipe.text_encoder.get_input_embeddings().weight
    rows = table[first_row:first_row + vectors.shape[0]].detach().clone()
    parts = (pipe.unet, pipe.text_encoder, pipe.vae)
    wanted = [(parameter, parameter.requires_grad) for part in parts for parameter in part.parameters()]
    for part in parts:
        part.requires_grad_(False)
    checkpointing = pipe.unet.is_gradient_checkpointing
    pipe.unet.enable_gradient_checkpointing()
    hook = pipe.text_encoder.get_input_embeddings().register_forward_hook(_rows_from(first_row, vectors))
    try:
        with uncompiled():
            yield
    finally:
        hook.remove()
        with torch.no_grad():
            table[first_row:first_row + len(rows)] = rows
        if not checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        for parameter, requires_grad in wanted:
            parameter.requires_grad_(requires_grad)


def _rows_from(first_row: int, vectors: torch.Tensor):
    """A forward hook on the token table: its rows first_row.. (the embedding's) looked up in `vectors` instead,
    while gradients are on (a preview's inference reads the table, into which the vectors are copied first)."""
    count = vectors.shape[0]

    def hook(_module, inputs, output):
        if not torch.is_grad_enabled():
            return None
        offsets = inputs[0] - first_row
        inside = (offsets >= 0) & (offsets < count)
        if not inside.any():
            return None
        return torch.where(inside.unsqueeze(-1), vectors[offsets.clamp(0, count - 1)].to(output.dtype), output)

    return hook


def _preview(engine, plan: TrainingPlan, embedding: Embedding, vectors: torch.Tensor, step: int, prompt: str,
             hooks: TrainingHooks) -> None:
    """A picture of the last prompt trained on, with the vectors as they are now (A1111's preview)."""
    table = engine.pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[list(embedding.vector_ids)] = vectors.detach().to(table.device, table.dtype)
    request = GenerationRequest(prompt=prompt[:MAX_PROMPT_CHARS], steps=PREVIEW_STEPS, width=plan.width,
                                height=plan.height)
    seed = random.randint(0, 2**32 - 1)
    hooks.preview(step, request, seed, engine.generate(request, [seed])[0].image)
