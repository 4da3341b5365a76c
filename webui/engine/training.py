"""What training an embedding and training a hypernetwork share (A1111's Train tab): the learning rate schedule,
the prompts from a template, the dataset's pictures as latents, one optimizer step, and the run itself (steps,
copies, previews, Interrupt). What is trained, and how it is wired into the model, is a Trainee: an embedding's
vectors (textual_inversion.py) or a hypernetwork's networks (hypernetwork_training.py).

The loss is the one the model was trained with, as A1111 computes it: the pictures' VAE latents noised at random
timesteps, and the UNet's prediction of the noise (or of v) against the truth, by mean squared error; AdamW (no
weight decay) takes the steps. The model itself stays frozen.
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
from typing import ContextManager, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from webui.engine.fast_path import uncompiled
from webui.engine.img2img import as_rgb
from webui.engine.inpainting_model import takes_masked_picture
from webui.engine.instruct_pix2pix import takes_edit_picture
from webui.engine.prompts import COMMA_BACKTRACK, ORIGINAL, encode_prompt_pair
from webui.schemas import MAX_PROMPT_CHARS, GenerationRequest, InvalidRequest

log = logging.getLogger(__name__)

LATENT_SAMPLING = ("once", "deterministic", "random")  # A1111's "Choose latent sampling method"
CLIP_GRAD_MODES = ("disabled", "value", "norm")  # A1111's "Gradient Clipping"
TRAINED_SUFFIX = ".pt"  # what training reads and writes, for embeddings and hypernetworks: A1111's layout
PREVIEW_STEPS = 20  # A1111's previews: the training prompt, 20 steps, at the training size


class TrainingError(InvalidRequest):
    """What keeps a training run from starting or going on, found once it runs; the message says what to change."""



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
            noun, example = _kind_of_number(field_name)
            raise InvalidRequest(f"{field_name}: give a {noun} such as {example}, or a schedule such as "
                                 f"{example}:100, {example / 10:g}:1000")
        phases: list[tuple[float, int | None]] = []
        for number, piece in enumerate(pieces, start=1):
            rate_text, colon, step_text = piece.partition(":")
            rate, until = _rate(rate_text, piece, field_name), None
            if colon:
                until = _until(step_text, piece, field_name)
            if phases and phases[-1][1] is None:
                raise InvalidRequest(f"{field_name}: {pieces[number - 2]!r} runs to the end, so nothing may follow "
                                     f"it; give it a step ({_kind_of_number(field_name)[0]}:step) or end the "
                                     "schedule there")
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
        noun, example = _kind_of_number(field_name)
        raise InvalidRequest(f"{field_name}: {piece!r} does not start with a {noun} above 0 (such as {example} "
                             f"or {example / 10:g})")
    return rate


def _kind_of_number(field_name: str) -> tuple[str, float]:
    """What a schedule's numbers are, for messages: learning rates, or the gradient clipping's limits."""
    return ("value", 0.1) if "clip" in field_name else ("rate", 0.005)


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

    name: str  # the embedding or hypernetwork, by the name prompts use
    pictures: tuple[TrainingPicture, ...]
    template: tuple[str, ...]  # the prompt template's lines
    width: int
    height: int
    steps: int  # the step to train up to, counting its steps so far (A1111's Max steps)
    learn_rate: RateSchedule
    log_folder: Path  # <log directory>/<date>/<name>: the copies (embeddings/) and previews (images/)
    batch_size: int = 1
    gradient_steps: int = 1  # batches whose gradients add up to one step
    save_every: int = 0  # a copy of the file in the log folder every N steps; 0: none
    preview_every: int = 0  # a preview picture every N steps; 0: none
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    latent_sampling: str = "once"
    clip_grad: str = "disabled"
    clip_grad_value: RateSchedule | None = None
    kind: str = "embedding"  # what is trained: "embedding" or "hypernetwork"
    # How the prompts are read (the Settings tab's Emphasis mode and Prompt word wrap length limit, as for pictures)
    emphasis: str = ORIGINAL
    comma_backtrack: int = COMMA_BACKTRACK

    @property
    def copies_folder(self) -> Path:
        return self.log_folder / f"{self.kind}s"  # A1111's embeddings/ and hypernetworks/

    @property
    def previews_folder(self) -> Path:
        return self.log_folder / "images"


@dataclass
class TrainingStatus:
    """Where a run stands after a step."""

    step: int  # the embedding's (or hypernetwork's) steps so far
    first_step: int  # where this run started (its steps before it)
    last_step: int  # where it will stop
    loss: float
    learn_rate: float
    prompt: str  # the last prompt trained on
    last_copy: Path | None = None  # the last copy saved in the log folder


@dataclass
class TrainingOutcome:
    path: Path  # the trained file, written with the trained weights (untouched when nothing was trained)
    first_step: int
    step: int  # its steps now
    stopped: bool = False  # Interrupt ended it early
    already_trained: bool = False  # it had reached the last step before the run


class TrainingHooks(Protocol):
    """What a run reports to, and asks, as it goes (webui/training.py's TrainingRun)."""

    def stopped(self) -> bool: ...

    def stage(self, text: str) -> None: ...

    def step(self, status: TrainingStatus) -> None: ...

    def preview(self, step: int, request: GenerationRequest, seed: int, image: Image.Image) -> None: ...


class Trainee(Protocol):
    """What a run trains: an embedding's vectors or a hypernetwork's networks, read from its file."""

    path: Path  # its file, written back at the end
    step: int  # its steps before the run
    parameters: list[torch.Tensor]  # what the optimizer changes

    def wired(self, pipe) -> ContextManager:
        """While inside, the model computes with the parameters (gradients reach them)."""

    def previewing(self, pipe) -> ContextManager:
        """While inside, a generation draws with the parameters as they are now."""

    def save(self, path: Path, step: int, model, copy: bool) -> None:
        """Write the parameters in A1111's file layout (copy: a copy in the log folder)."""

    def reload(self, engine) -> None:
        """Read the file written back again, so that prompts use it."""


def run_training(engine, plan: TrainingPlan, hooks: TrainingHooks, trainee: Trainee) -> TrainingOutcome:
    """Train `trainee` on the loaded model, on the worker thread; its file is written back at the end, or at
    Interrupt (as A1111 does), and read again. TrainingError for what the user must change (a picture, the model);
    the file stays as it was then."""
    pipe, model = engine.pipe, engine.require_model()
    first = trainee.step
    last = plan.learn_rate.end(plan.steps)
    if first >= last:
        return TrainingOutcome(trainee.path, first, first, already_trained=True)
    engine.without_loras()  # the model as it is: a LoRA merged for the last picture must not train in
    dataset = _Dataset(_encode_pictures(pipe, plan, hooks), plan)
    device = pipe._execution_device
    optimizer = torch.optim.AdamW(trainee.parameters, lr=plan.learn_rate.rate_at(first, plan.steps), weight_decay=0.0)
    # A half-precision model's gradients would underflow: scaled up for the backward pass, as A1111 does.
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and pipe.unet.dtype == torch.float16)
    trainer = _Trainer(pipe, plan, dataset, trainee.parameters, optimizer, scaler, engine.model_scheduler_config)
    step, last_copy = first, None
    hooks.stage(f"Training from step {first}")
    with frozen_model(pipe), trainee.wired(pipe):
        while step < last and not hooks.stopped():
            rate = plan.learn_rate.rate_at(step, plan.steps)
            loss, prompt = trainer.step(rate, step)
            step += 1
            if plan.save_every and step % plan.save_every == 0:
                last_copy = plan.copies_folder / f"{plan.name}-{step}{TRAINED_SUFFIX}"
                trainee.save(last_copy, step, model, copy=True)
            hooks.step(TrainingStatus(step, first, last, loss, rate, prompt, last_copy))
            if plan.preview_every and step % plan.preview_every == 0:
                with trainee.previewing(pipe):
                    _preview(engine, plan, step, prompt, hooks)
    if step > first:  # (Interrupt may come before the first step: then the file stays as it was)
        trainee.save(trainee.path, step, model, copy=False)
        trainee.reload(engine)  # the file changed: prompts use the trained weights from now on
    return TrainingOutcome(trainee.path, first, step, stopped=step < last)


def save_whole(path: Path, data: dict) -> None:
    """torch.save, whole or not at all: a temporary file, then renamed (hidden meanwhile: the loaders skip dot
    files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".partial-{uuid.uuid4().hex}{path.suffix}")
    try:
        torch.save(data, temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def prepare(engine, plan: TrainingPlan) -> None:
    """The model ready to train on (after an unload-checkpoint too): ModelLoadError without one, TrainingError for
    one that cannot be trained with."""
    engine.restore_device()
    engine.require_model()
    what = f"{plan.kind}s"
    if takes_masked_picture(engine.pipe.unet) or takes_edit_picture(engine.pipe.unet):
        kind = "inpainting" if takes_masked_picture(engine.pipe.unet) else "instruct-pix2pix editing"
        raise TrainingError(f"the loaded model is made for {kind}; load the model it was made from to train {what}")
    if engine.model.sdxl:  # both trainers read and write SD 1.x/2.x layouts (one text encoder, its attention)
        raise TrainingError(f"the loaded model is an SDXL model, which cannot train {what} yet; load an SD 1.x/2.x "
                            "model to train")
    settings = engine.settings
    if engine.placement.device == "cuda" and (settings.medvram or settings.lowvram):
        # Offloading moves the text encoder off the GPU while the UNet runs, before the backward pass needs it.
        raise TrainingError("training needs the text encoder and the UNet on the GPU together: start the server "
                            f"without --medvram and --lowvram to train {what}")


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


# A dataset picture from the server's own folder may be a camera's photo (24 to 50 megapixels): it is read, then
# resized to the training size, where a request's picture is refused past check_picture_size's 16.8
TRAINING_MAX_PIXELS = 8192 * 8192


def _pixels(path: Path, width: int, height: int) -> torch.Tensor:
    """The picture as RGB at the training size (stretched, as A1111 resizes it), in [-1, 1], one row."""
    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > TRAINING_MAX_PIXELS:
                raise ValueError(f"it is {opened.width}x{opened.height}; scale it down to at most "
                                 f"{TRAINING_MAX_PIXELS / 1e6:.0f} megapixels")
            opened.draft("RGB", (width, height))  # a JPEG decodes at the smallest fraction that still covers it
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

    def __init__(self, pipe, plan: TrainingPlan, dataset: _Dataset, parameters: list[torch.Tensor], optimizer,
                 scaler, scheduler_config: dict):
        from diffusers import DDPMScheduler

        self.pipe, self.plan, self.dataset, self.parameters = pipe, plan, dataset, parameters
        self.optimizer, self.scaler = optimizer, scaler
        # The model's training noise schedule (its own betas and prediction type), whatever sampler and noise
        # schedule the last picture ran with (the pipeline's scheduler is that pass's)
        self.noise = DDPMScheduler.from_config(scheduler_config)
        self.device = pipe._execution_device

    def step(self, rate: float, done: int) -> tuple[float, str]:
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        loss_sum, prompt = 0.0, ""
        for _ in range(self.plan.gradient_steps):
            loss, prompts = self._loss()
            if loss.requires_grad:  # else nothing trained took part (no prompt named the embedding)
                self.scaler.scale(loss / self.plan.gradient_steps).backward()
            loss_sum += loss.item() / self.plan.gradient_steps
            prompt = prompts[0]
        if not math.isfinite(loss_sum):
            raise TrainingError(f"the loss became {loss_sum} at step {done + 1}; lower the learning rate, or start "
                                "with --no-half")
        if all(parameter.grad is None for parameter in self.parameters):  # nothing to learn from these batches
            return loss_sum, prompt
        if self.plan.clip_grad != "disabled":
            self.scaler.unscale_(self.optimizer)
            limit = self.plan.clip_grad_value.rate_at(done, self.plan.steps) or self.plan.clip_grad_value.phases[-1][0]
            clip = torch.nn.utils.clip_grad_value_ if self.plan.clip_grad == "value" else torch.nn.utils.clip_grad_norm_
            clip(self.parameters, limit)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, prompt

    def _loss(self) -> tuple[torch.Tensor, list[str]]:
        unet = self.pipe.unet
        latents, prompts = self.dataset.batch()
        latents = latents.to(self.device, unet.dtype)
        cond = encode_prompt_pair(self.pipe, prompts, [], emphasis=self.plan.emphasis,
                                  backtrack=self.plan.comma_backtrack)[0]
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
def frozen_model(pipe):
    """The model frozen, the UNet's activations recomputed in the backward pass (as A1111 trains: memory for larger
    pictures), compiled parts run eagerly (hooks wire in what is trained). All undone after."""
    parts = (pipe.unet, pipe.text_encoder, pipe.vae)
    wanted = [(parameter, parameter.requires_grad) for part in parts for parameter in part.parameters()]
    for part in parts:
        part.requires_grad_(False)
    checkpointing = pipe.unet.is_gradient_checkpointing
    pipe.unet.enable_gradient_checkpointing()
    try:
        with uncompiled():
            yield
    finally:
        if not checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        for parameter, requires_grad in wanted:
            parameter.requires_grad_(requires_grad)


def _preview(engine, plan: TrainingPlan, step: int, prompt: str, hooks: TrainingHooks) -> None:
    """A picture of the last prompt trained on, with what is trained as it is now (A1111's preview)."""
    request = GenerationRequest(prompt=prompt[:MAX_PROMPT_CHARS], steps=PREVIEW_STEPS, width=plan.width,
                                height=plan.height, emphasis=plan.emphasis, comma_padding_backtrack=plan.comma_backtrack)
    seed = random.randint(0, 2**32 - 1)
    hooks.preview(step, request, seed, engine.generate(request, [seed])[0].image)
