"""Sampler and schedule-type names users know, mapped to diffusers schedulers.

Schedulers are always built with `from_config` from the loaded model's own scheduler config, so a
model's prediction type and beta schedule carry over to every sampler. A zero-terminal-SNR setting
(rescale_betas_zero_snr) carries over only where diffusers' scheduler has it: Euler a, Euler, DPM++ 2M,
DPM++ 2M SDE, DDIM, UniPC and LCM; the others run such a model on its usual schedule.

"Automatic" means what it means in stable-diffusion-webui 1.9 and later: the sampler's own default
schedule type (Karras for DPM++ 2M, Exponential for DPM++ 2M SDE, ...), which is also what the infotext
records, so an image made here and one made there from the same text match.

This module only names classes; diffusers is imported when a scheduler is actually built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


# A1111's schedule types, in its order
ALL_SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                 "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: str
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    # The schedule types its diffusers scheduler can follow (not every one takes custom sigmas
    # or a timestep spacing); asking for another is an error rather than silently ignored.
    schedules: tuple[str, ...] = ALL_SCHEDULES
    max_steps: int | None = None  # a limit of its scheduler's, checked with the request
    automatic: str = "Automatic"  # the schedule type that "Automatic" stands for (A1111's per-sampler default)
    # Ported from k-diffusion: A1111 runs it from the model's largest sigma, which diffusers' "leading"
    # timestep spacing (named by many SD configs, for DDIM and PLMS) would skip.
    k_diffusion: bool = False
    # A1111's sampler table has it drop its schedule's next-to-last sigma, whatever Always discard next-to-last
    # sigma says (DPM2, DPM2 a, DPM++ 3M SDE)
    discards_penultimate: bool = False
    # The scheduler that runs it on a schedule type its own cannot follow (custom sigmas), where another can: Euler a
    # on Euler's, stepping as Euler a (step_options.use_step_options)
    custom_sigmas_class: str | None = None
    # One of A1111's timestep samplers (sd_samplers_timesteps): a run from noise on A1111's timesteps
    # (_laid_out_as_a1111)
    a1111_timesteps: bool = False


NO_CUSTOM_SIGMAS = ("Automatic", "SGM Uniform")
RESTARTS_FROM_STEPS = 20  # Restart is plain Heun below this many steps (webui/engine/restart.py)
CFGPP_SAMPLER = "DDIM CFG++"  # steps along the negative prompt's prediction (webui/engine/ddim_cfgpp.py)

SAMPLERS: tuple[Sampler, ...] = (
    # diffusers' Euler a takes no custom sigmas: on Karras, Exponential, ... it runs on Euler's scheduler
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral"),
            k_diffusion=True, custom_sigmas_class="EulerDiscreteScheduler"),
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",), k_diffusion=True),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms", "K-LMS"), k_diffusion=True),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",), k_diffusion=True),
    Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",), automatic="Karras", k_diffusion=True,
            discards_penultimate=True),
    Sampler("DPM2 a", "DPM2AncestralScheduler", aliases=("k_dpm_2_a",), automatic="Karras",
            k_diffusion=True, discards_penultimate=True),
    # k-diffusion's multistep DPM++ takes its last step at first order only where it goes to 0 (diffusers' final
    # "zero" does that anyway): a schedule ending at a sigma (KL Optimal) keeps the second order to the end
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "lower_order_final": False},
            aliases=("k_dpmpp_2m",), automatic="Karras", k_diffusion=True),
    # the SDE samplers take A1111's eta and Sigma noise (webui/engine/dpmpp_sde.py)
    Sampler("DPM++ SDE", "DPMPPSDEScheduler", aliases=("k_dpmpp_sde",), automatic="Karras", k_diffusion=True),
    Sampler("DPM++ 2M SDE", "DPMPP2MSDEScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "lower_order_final": False},
            aliases=("k_dpmpp_2m_sde",),
            automatic="Exponential", k_diffusion=True),
    # the same solver with k-diffusion's Heun correction in place of the midpoint one (A1111's solver_type heun)
    Sampler("DPM++ 2M SDE Heun", "DPMPP2MSDEScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun", "lower_order_final": False},
            aliases=("k_dpmpp_2m_sde_heun",), automatic="Exponential", k_diffusion=True),
    # k-diffusion's third-order SDE solver: its phi_2 warm-up step (diffusers' heun)
    # and no lower-order last steps; it drops the next-to-last sigma, as A1111's table says
    Sampler("DPM++ 3M SDE", "DPMPP3MSDEScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun", "lower_order_final": False},
            aliases=("k_dpmpp_3m_sde",), automatic="Exponential", k_diffusion=True, discards_penultimate=True),
    # diffusers has no ancestral single-step DPM++: k-diffusion's, on DPM2 a's noise levels
    # (webui/engine/dpmpp_2s_ancestral.py)
    Sampler("DPM++ 2S a", "DPMPP2SAncestralScheduler", aliases=("k_dpmpp_2s_a", "k_dpmpp_2s_ancestral"),
            automatic="Karras", k_diffusion=True),
    # Heun with restarts from 20 steps on (webui/engine/restart.py)
    Sampler("Restart", "RestartScheduler", aliases=("restart",), automatic="Karras", k_diffusion=True),
    # DDIMScheduler clips its x0 estimate to [-1, 1] unless the model's config says otherwise; that is
    # meant for pixel-space models and ruins latents (A1111's DDIM never clips).
    Sampler("DDIM", "DDIMScheduler", {"clip_sample": False}, aliases=("ddim",), schedules=NO_CUSTOM_SIGMAS,
            a1111_timesteps=True),
    # DDIM pointing back along the negative prompt's prediction, CFG scale read as a fraction of 12.5
    # (webui/engine/ddim_cfgpp.py)
    Sampler(CFGPP_SAMPLER, "DDIMCFGPPScheduler", {"clip_sample": False}, aliases=("ddim_cfgpp",),
            schedules=NO_CUSTOM_SIGMAS, a1111_timesteps=True),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("plms", "PNDM"), schedules=NO_CUSTOM_SIGMAS,
            a1111_timesteps=True),
    # A1111's UniPC settings by default (uni_pc_variant bh1, uni_pc_order 3; diffusers' defaults are bh2 and 2; a
    # request's UniPCOptions set them). Its UniPC ends at the model's smallest sigma, not at 0; diffusers' bh1 step to
    # 0 gives NaN.
    Sampler("UniPC", "UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3,
                                                 "final_sigmas_type": "sigma_min"}, aliases=("unipc",)),
    # LCM picks its steps from a 50-step schedule (diffusers' original_inference_steps), whatever the
    # timestep spacing, so SGM Uniform would change nothing.
    Sampler("LCM", "LCMScheduler", aliases=("lcm",), schedules=("Automatic",), max_steps=50),
)

# Schedule type label -> the scheduler config options that give it, in A1111's order. The types whose sigmas are worked
# out here (SIGMAS_OF) reach diffusers as custom sigmas, in the place of Karras's.
_CUSTOM = {"use_karras_sigmas": True}
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": _CUSTOM,
    "Karras": _CUSTOM,
    "Exponential": _CUSTOM,
    "Polyexponential": _CUSTOM,
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "KL Optimal": _CUSTOM,
    "Align Your Steps": _CUSTOM,
    "Simple": _CUSTOM,
    "Normal": _CUSTOM,
    "DDIM": _CUSTOM,
    "Beta": _CUSTOM,
}
BETA_ALPHA = BETA_BETA = 0.6  # A1111's defaults (its beta_dist_alpha, beta_dist_beta options), diffusers' too
# NVIDIA's Align Your Steps noise levels for 10 steps (11 sigmas), of SD 1.5 and of SDXL, as A1111 1.10 keeps them
AYS_SIGMAS = {"sd": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
              "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)}


def schedule_key(label: str) -> str:
    """A schedule type's key as A1111's API names it: "SGM Uniform" -> "sgm_uniform"."""
    return label.lower().replace(" ", "_")


_SAMPLER_BY_KEY = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}
_SCHEDULE_BY_KEY = {label.lower(): label for label in SCHEDULE_TYPES}
_SCHEDULE_BY_KEY.update({schedule_key(label): label for label in SCHEDULE_TYPES})
_SCHEDULE_BY_KEY["sgmuniform"] = "SGM Uniform"  # A1111's alias of it


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def get_sampler(name: str) -> Sampler:
    sampler = _SAMPLER_BY_KEY.get(name.strip().lower())
    if sampler is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")
    return sampler


def resolve_sampler(sampler_name: str, schedule: str | None = "Automatic") -> tuple[str, str]:
    """Check a sampler and schedule type and return their canonical names; "Automatic" comes back as
    the sampler's default schedule type (Karras for DPM++ 2M), as A1111 records it.

    Accepts old combined names such as "DPM++ 2M Karras" (schedule taken from the suffix) and
    A1111's aliases ("k_euler_a", "K-LMS", "PNDM"). Raises ValueError listing the valid names.
    """
    schedule_label = _canonical_schedule(schedule or "Automatic")
    name, named_schedule = split_sampler_name(sampler_name)
    schedule_label = named_schedule or schedule_label
    sampler = get_sampler(name)
    if schedule_label not in sampler.schedules:
        raise ValueError(
            f"sampler {sampler.name!r} does not support the {schedule_label} schedule; "
            f"use {' or '.join(sampler.schedules)} with it"
        )
    return sampler.name, sampler.automatic if schedule_label == "Automatic" else schedule_label


def split_sampler_name(sampler_name: str) -> tuple[str, str | None]:
    """An old combined name ("DPM++ 2M Karras") -> ("DPM++ 2M", "Karras"); any other name -> (name, None)."""
    name = (sampler_name or "").strip()
    if name.lower() not in _SAMPLER_BY_KEY:
        for label in sorted(SCHEDULE_TYPES, key=len, reverse=True):  # "SGM Uniform" before "Uniform"
            suffix = " " + label.lower()
            if label != "Automatic" and name.lower().endswith(suffix):
                return name[: -len(suffix)], label
    return name, None


def _canonical_schedule(schedule: str) -> str:
    label = _SCHEDULE_BY_KEY.get(schedule.strip().lower())
    if label is None:
        raise ValueError(f"unknown schedule type {schedule!r}; choose one of: {', '.join(SCHEDULE_TYPES)}")
    return label


NOISE_SCHEDULES = ("Default", "Zero Terminal SNR")  # A1111's Noise schedule for sampling
# A1111's last noise level of a zero-terminal-SNR schedule: a sigma of 4519 rather than an infinite one
ZERO_SNR_LAST_ALPHA_BAR = 4.8973451890853435e-08
# A1111's Use old karras scheduler sigmas: the range of its first Karras schedules, whatever the model's
OLD_KARRAS_ENDS = (0.1, 10.0)


@dataclass(frozen=True)
class ScheduleShape:
    """A1111's options that reshape the schedule types: the Beta schedule's alpha and beta; Schedule min and max
    sigma (0: the model's), where the types that span a range of sigmas (ENDS_SCHEDULES) begin and end; Schedule
    rho (0: Karras's own 7, Polyexponential's 1); Always discard next-to-last sigma (k-diffusion samplers: a
    schedule of one step more, its next-to-last level left out; DDIM and PLMS on A1111's timesteps: the levels of one
    step more); Noise schedule for sampling (Zero Terminal SNR: the
    model's noise levels rescaled so that the last is almost pure noise); and two of its Compatibility options for
    old seeds: Use old karras scheduler sigmas (that range runs from 0.1 to 10 unless set) and Downcast model
    alphas_cumprod to fp16 (the noise levels rounded as an fp16 model kept them, before any rescaling)."""
    beta_alpha: float = BETA_ALPHA
    beta_beta: float = BETA_BETA
    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    discard_penultimate: bool = False
    noise_schedule: str = "Default"
    old_karras_sigmas: bool = False
    downcast_alpha_bar: bool = False

    def discards_penultimate(self, sampler: Sampler) -> bool:
        """Whether a run of this sampler leaves its schedule's next-to-last sigma out (A1111: k-diffusion samplers
        alone, where asked or where its sampler table says so)."""
        return sampler.k_diffusion and (sampler.discards_penultimate or self.discard_penultimate)

    def default_ends(self, table: np.ndarray) -> tuple[float, float]:
        """Where a range-spanning schedule begins and ends unless Schedule min or max sigma says: the model's
        smallest and largest sigma (`table`, smallest first), or the old Karras range."""
        return OLD_KARRAS_ENDS if self.old_karras_sigmas else (float(table[0]), float(table[-1]))

    def ends(self, table: np.ndarray) -> np.ndarray:
        """The smallest and largest sigma a range-spanning schedule runs between (ValueError when they are the wrong
        way round)."""
        problem = self.range_problem(table)
        if problem:
            raise ValueError(problem)
        smallest, largest = self.default_ends(table)
        return np.array([self.sigma_min or smallest, self.sigma_max or largest])

    def range_problem(self, table: np.ndarray) -> str | None:
        """Why one end set alone cannot run with the other end's default (`table`: the model's sigmas, smallest
        first), if it cannot: a schedule would climb instead of fall. Both set are checked against each other by the
        request."""
        smallest, largest = self.default_ends(table)
        whose, default = (("the old Karras range's", "0.1 to 10") if self.old_karras_sigmas
                          else ("this model's", "the model's own"))
        if self.sigma_min and not self.sigma_max and self.sigma_min >= largest:
            return (f"sigma_min: {self.sigma_min:g} is not below {whose} largest sigma {largest:.4g}; lower it "
                    f"(0: {default})")
        if self.sigma_max and not self.sigma_min and self.sigma_max <= smallest:
            return (f"sigma_max: {self.sigma_max:g} is not above {whose} smallest sigma {smallest:.4g}; raise it "
                    f"(0: {default})")
        return None

    @property
    def smallest_sigma(self) -> float:
        """Where a range-spanning schedule ends where that is not the model's smallest sigma (0: it is)."""
        return self.sigma_min or (OLD_KARRAS_ENDS[0] if self.old_karras_sigmas else 0.0)


UNIPC_VARIANTS = ("bh1", "bh2")  # A1111's UniPC variants diffusers' UniPC has (its vary_coeff it has not)
MAX_UNIPC_ORDER = 50


@dataclass(frozen=True)
class UniPCOptions:
    """A1111's UniPC settings: the variant (its B(h) function), the solver's order, and whether the last steps
    lower it (which keeps few-step runs stable); A1111's defaults."""
    variant: str = "bh1"
    order: int = 3
    lower_order_final: bool = True

    def config(self) -> dict[str, Any]:
        return {"solver_type": self.variant, "solver_order": self.order, "lower_order_final": self.lower_order_final}


# The schedule types worked out from the model's smallest and largest sigma alone (A1111's that take sigma_min and
# sigma_max); the others read the whole table, and Align Your Steps its own levels.
ENDS_SCHEDULES = ("Karras", "Exponential", "Polyexponential", "KL Optimal", "Beta")
KARRAS_RHO = 7.0
POLYEXPONENTIAL_RHO = 1.0  # at which it is the exponential schedule


def make_scheduler(base_config: dict[str, Any], sampler_name: str, schedule: str = "Automatic", sdxl: bool = False,
                   shape: ScheduleShape = ScheduleShape(), unipc: UniPCOptions = UniPCOptions(),
                   pass_steps: int | None = None, from_noise: bool = False):
    """Build a fresh diffusers scheduler for one run from the model's scheduler config (an SDXL model's: `sdxl`,
    which Align Your Steps' noise levels depend on; `shape`: A1111's schedule options; `unipc`: UniPC's;
    `pass_steps`: the steps a pass that runs the schedule's tail runs, which Restart plans its restarts over and
    A1111's timestep samplers lay out their calls by;
    `from_noise`: the pass is txt2img's from pure noise, which A1111's timestep samplers lay out their own way)."""
    sampler_name, schedule = resolve_sampler(sampler_name, schedule)
    sampler = get_sampler(sampler_name)
    options = dict(sampler.options)
    if sampler.name == "UniPC":
        options |= unipc.config()
    if sampler.k_diffusion and base_config.get("timestep_spacing") == "leading":
        options["timestep_spacing"] = "linspace"  # from t=999, not t=951 (at 20 steps)
    options.update(SCHEDULE_TYPES[schedule])
    sigmas_for = _sigmas_function(schedule, sdxl, shape)
    discard = shape.discards_penultimate(sampler)
    if discard and not sigmas_for and "Uniform" in sampler.schedules:
        # diffusers works these two out itself, for the steps asked alone: A1111's formulas can make one level more
        sigmas_for = sgm_uniform_sigmas if schedule == "SGM Uniform" else uniform_sigmas
        options.update(_CUSTOM)
    custom = options.get("use_karras_sigmas") and sampler.custom_sigmas_class
    scheduler_class = _scheduler_class(sampler.custom_sigmas_class if custom else sampler.scheduler_class)
    if schedule == "KL Optimal" and _takes(scheduler_class, "final_sigmas_type"):
        options["final_sigmas_type"] = "sigma_min"  # its last level is the model's smallest sigma, not 0
    scheduler = scheduler_class.from_config(_with_noise_schedule(base_config, shape), **options)
    _with_a1111_alpha_bars(scheduler, base_config, shape)
    if hasattr(scheduler, "pass_steps"):
        scheduler.pass_steps = pass_steps
    # as A1111 lays them out, where the model's config lays them out as SD's own do (a model made for another
    # spacing, such as the embedded zero-terminal-SNR one, keeps its own)
    if (sampler.a1111_timesteps and schedule == "Automatic" and (from_noise or pass_steps)
            and base_config.get("timestep_spacing", "leading") == "leading"):
        _laid_out_as_a1111(scheduler, one_level_more=shape.discard_penultimate,
                           img2img_steps=None if from_noise else pass_steps)
    if discard:  # (every k-diffusion sampler runs custom sigmas then)
        sigmas_for = _without_the_penultimate_level(sigmas_for)
    scheduler = _starting_at_the_first_step(scheduler)
    if not sigmas_for:
        return scheduler
    return _with_custom_sigmas(scheduler, sigmas_for, shape.smallest_sigma if schedule in ENDS_SCHEDULES else 0.0)


# The schedulers of ours, by module: diffusers lacks them
OWN_SCHEDULERS = {"DPMPP2SAncestralScheduler": "webui.engine.dpmpp_2s_ancestral",
                  "DDIMCFGPPScheduler": "webui.engine.ddim_cfgpp",
                  "DPM2AncestralScheduler": "webui.engine.dpmpp_2s_ancestral",
                  "DPMPPSDEScheduler": "webui.engine.dpmpp_sde",
                  "DPMPP2MSDEScheduler": "webui.engine.dpmpp_sde",
                  "DPMPP3MSDEScheduler": "webui.engine.dpmpp_sde",
                  "RestartScheduler": "webui.engine.restart"}


def _scheduler_class(name: str):
    """A scheduler class by name: one of ours, else diffusers'."""
    import importlib

    import diffusers

    module = importlib.import_module(OWN_SCHEDULERS[name]) if name in OWN_SCHEDULERS else diffusers
    return getattr(module, name)


def _with_noise_schedule(base_config: dict[str, Any], shape: ScheduleShape) -> dict[str, Any]:
    """The model's scheduler config under A1111's Noise schedule for sampling and Downcast alphas_cumprod: as it is,
    or with its alpha bars rounded to fp16 and then (Zero Terminal SNR) rescaled, given as the betas that make them
    (every diffusers scheduler takes betas; not all can rescale)."""
    if shape.noise_schedule == "Default" and not shape.downcast_alpha_bar:
        return base_config
    betas = {"trained_betas": betas_of(_shaped_alpha_bars(model_alpha_bars(base_config), shape))}
    if shape.noise_schedule == "Zero Terminal SNR":
        betas["rescale_betas_zero_snr"] = False  # ours instead; else a model's own rescale still applies
    return base_config | betas


def _shaped_alpha_bars(alpha_bars: np.ndarray, shape: ScheduleShape) -> np.ndarray:
    """A1111's alpha bars under the shape: kept as float32, or rounded to fp16 (Downcast), then rescaled to zero
    terminal SNR in that precision."""
    alpha_bars = alpha_bars.astype(np.float16 if shape.downcast_alpha_bar else np.float32)
    return zero_terminal_snr(alpha_bars) if shape.noise_schedule == "Zero Terminal SNR" else alpha_bars


def _with_a1111_alpha_bars(scheduler, base_config: dict[str, Any], shape: ScheduleShape) -> None:
    """Give the scheduler the alpha bars A1111's model holds (model_alpha_bars, rounded and rescaled as the shape
    asks), where diffusers' float32 arithmetic made them a last bit otherwise: the model's sigmas and so Karras's,
    Exponential's and Polyexponential's levels then are A1111's to the bit, as the SDE samplers' Brownian noise needs.
    A1111 works an fp16 model's sigmas out in fp16 (sigma_table_half), but for zero terminal SNR, where fp16 would
    make the largest infinite. Left as diffusers made them where the model gives its betas, or has diffusers rescale
    them itself."""
    import torch

    if base_config.get("trained_betas") is not None:
        return
    if base_config.get("rescale_betas_zero_snr", False) and shape.noise_schedule == "Default":
        return
    own_betas = dict(scheduler.config) | {"trained_betas": None}  # its beta settings, as the class fills them in
    alpha_bars = _shaped_alpha_bars(model_alpha_bars(own_betas), shape)
    scheduler.alphas_cumprod = torch.tensor(alpha_bars.astype(np.float64), dtype=torch.float32)
    scheduler.sigma_table_half = shape.downcast_alpha_bar and shape.noise_schedule == "Default"


def model_alpha_bars(base_config: dict[str, Any]) -> np.ndarray:
    """The model's alpha bar (the share of the picture left) at each training timestep. SD's linear beta schedules
    are worked out in float64 and kept as float32, as A1111's model keeps them (diffusers' float32 arithmetic lands a
    few of them on another fp16 value when downcast); any other from diffusers."""
    import diffusers

    schedule, betas = base_config.get("beta_schedule", "linear"), base_config.get("trained_betas")
    if betas is None and schedule in ("linear", "scaled_linear"):
        start, end = base_config.get("beta_start", 0.0001), base_config.get("beta_end", 0.02)
        count = base_config.get("num_train_timesteps", 1000)
        if schedule == "scaled_linear":
            betas = np.linspace(start ** 0.5, end ** 0.5, count, dtype=np.float64) ** 2
        else:
            betas = np.linspace(start, end, count, dtype=np.float64)
        return np.cumprod(1 - betas).astype(np.float32).astype(np.float64)
    plain = diffusers.DDPMScheduler.from_config(base_config | {"rescale_betas_zero_snr": False})
    return np.asarray(plain.alphas_cumprod, dtype=np.float64)


def zero_terminal_snr(alpha_bars: np.ndarray) -> np.ndarray:
    """A1111's Zero Terminal SNR: the square roots of the alpha bars moved to end at 0 and stretched to start where
    they did, the last alpha bar then ZERO_SNR_LAST_ALPHA_BAR; in the alpha bars' own precision and A1111's order of
    operations (fp16 alpha bars end at 2^-24, its nearest, a sigma of 4096)."""
    root = np.sqrt(alpha_bars)
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    rescaled = root ** 2
    rescaled[-1] = ZERO_SNR_LAST_ALPHA_BAR
    return rescaled


def betas_of(alpha_bars: np.ndarray) -> list[float]:
    """The betas whose running product of (1 - beta) gives these alpha bars."""
    alpha_bars = alpha_bars.astype(np.float64)
    return (1 - alpha_bars / np.concatenate([[1.0], alpha_bars[:-1]])).tolist()


def _without_the_penultimate_level(sigmas_for):
    """A1111's discard of the next-to-last sigma: the schedule of one step more, its smallest level (the one before
    the end) left out."""
    return lambda steps, table: sigmas_for(steps + 1, table)[:-1]


def _takes(scheduler_class, option: str) -> bool:
    import inspect

    return option in inspect.signature(scheduler_class.__init__).parameters


# A1111's schedule types, each as the sigmas of `steps` steps (the final 0 comes after them) from `table`, the
# model's sigma at each of its training timesteps, smallest first (k-diffusion's table, whatever timestep
# spacing the model's config names).

def uniform_sigmas(steps: int, table: np.ndarray) -> np.ndarray:
    """Evenly spaced timesteps from the last to the first, their sigmas interpolated log-linearly (k-diffusion's
    get_sigmas; A1111's Uniform and Normal)."""
    timesteps = np.linspace(len(table) - 1, 0, steps)
    return np.exp(np.interp(timesteps, np.arange(len(table)), np.log(table)))


# Karras, Exponential and Polyexponential are worked out as k-diffusion does, in float32 torch from the two ends as
# floats, so that their levels are A1111's to the bit (see model_sigmas).

def karras_sigmas(steps: int, table: np.ndarray, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al.'s schedule from the largest sigma to the smallest, even in sigma ** (1 / rho) (k-diffusion's
    get_sigmas_karras between the model's sigma_max and sigma_min, as A1111's Karras)."""
    import torch

    low, high = float(table[0]) ** (1 / rho), float(table[-1]) ** (1 / rho)
    return ((high + torch.linspace(0, 1, steps) * (low - high)) ** rho).double().numpy()


def exponential_sigmas(steps: int, table: np.ndarray) -> np.ndarray:
    """Evenly spaced in log sigma from the largest sigma to the smallest (k-diffusion's get_sigmas_exponential)."""
    import torch

    return torch.linspace(math.log(table[-1]), math.log(table[0]), steps).exp().double().numpy()


def polyexponential_sigmas(steps: int, table: np.ndarray, rho: float = POLYEXPONENTIAL_RHO) -> np.ndarray:
    """From the largest sigma to the smallest along a ramp from 1 to 0 raised to rho, in log sigma (k-diffusion's
    get_sigmas_polyexponential; at rho 1 the exponential schedule, higher spends more steps at low noise)."""
    import torch

    ramp = torch.linspace(1, 0, steps) ** rho
    low, high = math.log(table[0]), math.log(table[-1])
    return torch.exp(ramp * (high - low) + low).double().numpy()


def simple_sigmas(steps: int, table: np.ndarray) -> np.ndarray:
    """Every (len / steps)-th sigma of the table counted down from the largest, the index rounded down."""
    stride = len(table) / steps
    return table[[len(table) - 1 - int(step * stride) for step in range(steps)]]


def ddim_sigmas(steps: int, table: np.ndarray) -> np.ndarray:
    """The sigmas at timesteps 1, 1 + k, 1 + 2k, ... (k = len // steps), largest first: DDIM's uniform timesteps.
    Where k does not divide the table (30 steps of 1000) that makes one more level than steps; A1111 then runs
    one more step, here the smallest level is left out so that a run has the steps it asked for."""
    stride = max(len(table) // steps, 1)
    return table[1::stride][::-1][:steps]


def kl_optimal_sigmas(steps: int, table: np.ndarray) -> np.ndarray:
    """KL Optimal: evenly spaced in arctan(sigma) from the largest sigma towards the smallest, which is the final
    level (make_scheduler ends it there, not at 0, where the scheduler allows it)."""
    fraction = np.arange(steps) / steps
    return np.tan(fraction * np.arctan(table[0]) + (1 - fraction) * np.arctan(table[-1]))


def beta_sigmas(steps: int, table: np.ndarray, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> np.ndarray:
    """The beta distribution's quantiles at 1 ... 0 (steps points) between the smallest and largest sigma."""
    import scipy.stats

    low, high = table[0], table[-1]
    return low + scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps), alpha, beta) * (high - low)


def ays_sigmas(steps: int, levels: tuple[float, ...]) -> np.ndarray:
    """Align Your Steps' noise levels for `steps` steps, as A1111 makes them: the 11 levels as they are for 11 steps,
    else interpolated log-linearly to `steps` (the final 0 comes after them)."""
    if steps == len(levels):
        return np.array(levels)
    logs = np.log(np.array(levels)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(levels)), logs))[::-1].copy()


def sgm_uniform_sigmas(steps: int, table: np.ndarray) -> np.ndarray:
    """Evenly spaced timesteps from the last towards the first, which a step more would reach, their sigmas
    interpolated log-linearly (A1111's sgm_uniform; diffusers' "trailing" spacing, used but where a level is
    discarded, rounds the timesteps instead)."""
    return uniform_sigmas(steps + 1, table)[:-1]


SIGMAS_OF = {"Uniform": uniform_sigmas, "Normal": uniform_sigmas, "Karras": karras_sigmas,
             "Exponential": exponential_sigmas, "Simple": simple_sigmas, "DDIM": ddim_sigmas,
             "KL Optimal": kl_optimal_sigmas}


def _sigmas_function(schedule: str, sdxl: bool, shape: ScheduleShape):
    """The schedule type's sigmas as a function of (steps, the model's table), with the shape's options applied."""
    if schedule == "Align Your Steps":
        levels = AYS_SIGMAS["sdxl" if sdxl else "sd"]
        return lambda steps, table: ays_sigmas(steps, levels)
    if schedule == "Beta":
        return lambda steps, table: beta_sigmas(steps, shape.ends(table), shape.beta_alpha, shape.beta_beta)
    if schedule == "Karras":
        return lambda steps, table: karras_sigmas(steps, shape.ends(table), shape.rho or KARRAS_RHO)
    if schedule == "Polyexponential":
        return lambda steps, table: polyexponential_sigmas(steps, shape.ends(table), shape.rho or POLYEXPONENTIAL_RHO)
    if schedule in ENDS_SCHEDULES:
        function = SIGMAS_OF[schedule]
        return lambda steps, table: function(steps, shape.ends(table))
    return SIGMAS_OF.get(schedule)


def model_sigmas(scheduler) -> np.ndarray:
    """The model's sigma at each training timestep, smallest first, worked out from the scheduler's alpha bars as
    A1111's k-diffusion works them out from its model's (make_scheduler gives the scheduler those): in float32, or
    in fp16 for alpha bars downcast to it."""
    import torch

    dtype = torch.float16 if getattr(scheduler, "sigma_table_half", False) else torch.float32
    alpha_bars = torch.as_tensor(scheduler.alphas_cumprod).to(dtype)
    return (((1 - alpha_bars) / alpha_bars) ** 0.5).double().numpy()


def _with_custom_sigmas(scheduler, sigmas_for, smallest: float = 0.0):
    """The scheduler's Karras sigmas replaced by sigmas_for(steps, table): diffusers takes both as custom sigmas. A
    scheduler that ends at a sigma ends at `smallest` (Schedule min sigma), else the model's smallest."""
    table = model_sigmas(scheduler)

    def sigmas(in_sigmas, num_inference_steps=None, **_):  # LMS and DPM++ SDE give no count: it is set already
        return sigmas_for(num_inference_steps or scheduler.num_inference_steps, table)

    scheduler._convert_to_karras = sigmas
    if scheduler.config.get("final_sigmas_type") == "sigma_min":
        _ending_at_the_smallest_sigma(scheduler, float(smallest or table[0]))
    return scheduler


def _ending_at_the_smallest_sigma(scheduler, smallest: float):
    """Where a scheduler ends at a sigma, not 0 (UniPC; KL Optimal's): the end is `smallest`. UniPC would otherwise
    repeat the last custom level: a last step that goes nowhere and leaves that level's noise in the picture (0.18
    for Simple at 30 steps); the others would end at the model's smallest, whatever Schedule min sigma says."""
    set_timesteps = scheduler.set_timesteps

    def set_timesteps_ending_at_the_smallest_sigma(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        if scheduler.config.use_karras_sigmas:  # not after a one-step run's plain schedule
            scheduler.sigmas[-1] = smallest

    scheduler.set_timesteps = set_timesteps_ending_at_the_smallest_sigma


def a1111_timestep_levels(steps: int, train_steps: int = 1000) -> np.ndarray:
    """A1111's timestep samplers' levels for a run of `steps`, smallest first: 1, 1 + k, 1 + 2k, ... up to train_steps
    (k = train_steps // steps; A1111 clips a last level of train_steps to the table's end). It calls the model at each
    level but the lowest, where the run ends: at 20 steps 19 calls from t=951 to t=51, at 30 steps 30 calls from t=991
    to t=34 (its sd_samplers_timesteps.py)."""
    return np.arange(0, train_steps, train_steps // steps) + 1


def _laid_out_as_a1111(scheduler, one_level_more: bool = False, img2img_steps: int | None = None):
    """DDIM, DDIM CFG++ and PLMS on A1111's timesteps (a1111_timestep_levels): each step goes from one level to the
    next lower one, as diffusers' steps go back by the train steps over the steps asked (k). `a1111_timesteps` says
    whether they were (sampler_steps_done counts the calls so; the timesteps are then the pass's calls alone).

    txt2img's pass from noise calls the model at each level but the lowest. Diffusers' own timesteps stay at one
    step, where A1111's one level makes no call, and where A1111 clips its top level (3, 9, 27, 36, 37 and 101 to
    111 steps), which is no step of k. `one_level_more`: A1111's Always discard next-to-last sigma, which lays out
    the levels of one step more (at 20 steps 21 calls from t=988, not 19 from t=951), except where that table is
    clipped (discard_lays_out).

    A pass that runs `img2img_steps` of the schedule's tail (img2img, the hires fix: A1111's t_enc + 1, where t_enc
    is int(steps x strength), or the steps asked less one with exact steps) runs the levels below t_enc the same
    way, from the picture noised to level t_enc (`a1111_start_level`): one level above its first call, as A1111's
    sample_img2img does (20 steps at 0.75: noised to t=751, 14 calls from t=701 to t=51). Below 3 steps, where A1111
    would make no call, diffusers' own timesteps stay."""
    import torch

    set_timesteps = scheduler.set_timesteps
    scheduler.a1111_start_level = None

    def set_timesteps_as_a1111(num_inference_steps=None, device=None, *args, **kwargs):
        set_timesteps(num_inference_steps, device, *args, **kwargs)
        train_steps = scheduler.config.num_train_timesteps
        laid_out = (_a1111_layout(num_inference_steps, train_steps, one_level_more, img2img_steps)
                    if num_inference_steps else None)
        scheduler.a1111_timesteps = laid_out is not None
        level_steps, levels, scheduler.a1111_start_level = laid_out or (None, None, None)
        if laid_out is None:
            return
        if level_steps != num_inference_steps:  # its steps then go back by train_steps // level_steps
            set_timesteps(level_steps, device, *args, **kwargs)
        if hasattr(scheduler, "plms_timesteps"):  # PLMS: its first step calls the model again at the next level
            calls = np.concatenate([levels[:-1], levels[-2:-1], levels[-1:]])[::-1][:-1]
            scheduler.plms_timesteps = calls.copy()
        else:
            calls = levels[1:][::-1]
        scheduler.timesteps = torch.from_numpy(calls.astype(np.int64)).to(device)

    scheduler.set_timesteps = set_timesteps_as_a1111


def _a1111_layout(steps: int, train_steps: int, one_level_more: bool, img2img_steps: int | None
                  ) -> tuple[int, np.ndarray, int | None] | None:
    """A pass's layout on A1111's timesteps (_laid_out_as_a1111): the steps its levels are laid out for, the levels it
    runs on (smallest first) and, for img2img, the level its picture is noised to (t_enc's, clipped to the table's
    end as A1111 clips it); None where diffusers' own timesteps stay."""
    more = one_level_more and (img2img_steps or discard_lays_out(steps, train_steps))
    level_steps = steps + 1 if more else steps
    levels = a1111_timestep_levels(level_steps, train_steps)
    if img2img_steps is None:
        return (level_steps, levels, None) if len(levels) >= 2 and levels[-1] < train_steps else None
    start = img2img_steps - 1  # t_enc: the levels below it are run
    if not 2 <= start < len(levels):
        return None
    return level_steps, levels[:start], min(int(levels[start]), train_steps - 1)


def discard_lays_out(steps: int, train_steps: int = 1000) -> bool:
    """Whether Always discard next-to-last sigma lays out txt2img's DDIM or PLMS on the levels of one step more here:
    not where A1111 clips that table's top level (at 2, 8, 26, 35, 36, 100 to 110 steps), which is no step of k; the
    steps asked keep their own layout then, as with the option off."""
    return a1111_timestep_levels(steps + 1, train_steps)[-1] < train_steps


def runs_its_own_calls(scheduler, schedule: int) -> bool:
    """Whether the scheduler, set for a schedule of `schedule` steps (it is set here), holds the pass's own calls
    (A1111's layout), not a schedule whose tail an img2img pass runs."""
    scheduler.set_timesteps(schedule)
    return getattr(scheduler, "a1111_timesteps", False)


def sampler_steps_done(calls_done: int, calls: int, steps: int, scheduler=None) -> int:
    """The sampler steps finished after `calls_done` of a pass's `calls` model calls. Heun, DPM2 and DPM++ SDE call
    the model twice per step (but the last), PLMS once more at the start: the user asked for steps, and A1111 counts
    steps, so progress does too, in proportion. A pass on A1111's timesteps (the `scheduler` says) counts a step a
    call up to the steps asked, as A1111 reads its prompt schedule by the call (at 51 steps it makes 52), and its
    last call ends them all (at 20 steps it makes 19)."""
    if getattr(scheduler, "a1111_timesteps", False):
        return steps if calls_done >= calls else min(calls_done, steps)
    return calls_done * steps // calls


def _starting_at_the_first_step(scheduler):
    """txt2img runs every step, from pure noise.

    One step goes from the largest sigma to none, whatever the schedule type: "linspace" spacing put it at
    t=0 (numpy's linspace of one point is its start), "leading" at t=1, and UniPC's Karras and Exponential
    schedules ended where they began, so the step denoised nothing. k-diffusion (A1111) runs it from t=999,
    as "trailing" does; one-step models (SD-Turbo) need that.

    The first step: diffusers finds it by looking its timestep up, and takes the second of two equal ones
    (img2img's rule): Karras or Exponential sigmas on a zero-terminal-SNR model (the embedded one) start
    4096, 3354, both t=999, so from 25 steps on the run began at step 2 and ran off the end. The pipeline
    calls set_timesteps itself, which forgets the begin index: set it after."""
    set_timesteps = scheduler.set_timesteps

    def set_timesteps_from_the_first_step(num_inference_steps=None, *args, **kwargs):
        if num_inference_steps == 1:
            custom_sigmas = {key: False for key in ("use_karras_sigmas", "use_exponential_sigmas")
                             if scheduler.config.get(key)}
            scheduler.register_to_config(timestep_spacing="trailing", **custom_sigmas)
        set_timesteps(num_inference_steps, *args, **kwargs)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    scheduler.set_timesteps = set_timesteps_from_the_first_step
    return scheduler
