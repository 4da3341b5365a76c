"""The txt2img and img2img tabs: prompts, parameters, Generate / Interrupt / Skip and the results area.

One builder and one actions class serve both, by kind ("txt2img" or "img2img"): img2img adds the picture
to start from, Resize mode and Denoising strength, and its elem_ids start with "img2img_".

Generate only submits a GenerationRequest to the worker and polls the Job it gets back; each
browser session keeps ITS job id in gr.State, so Interrupt and Skip touch that job alone, and
each session's generator reports its own job's progress.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
from PIL import Image

from webui.engine.hires import HIRES_UPSCALERS, PICTURE_UPSCALERS
from webui.engine.hypernetworks import HYPERNET_TAG
from webui.engine.img2img import check_picture_size, size_from_image
from webui.engine.samplers import (BETA_ALPHA, BETA_BETA, MAX_UNIPC_ORDER, NOISE_SCHEDULES, SCHEDULE_TYPES,
                                  UNIPC_VARIANTS, UniPCOptions, resolve_sampler, sampler_names)
from webui.engine.uncond_skip import MAX_NGMS
from webui.engine.step_options import DEFAULTS as STEP_DEFAULTS, LIMITS as STEP_LIMITS
from webui.engine.models import ModelNotFound
from webui.storage.card_metadata import CardMetadata, read_metadata, write_metadata
from webui.storage.infotext import request_fields_from_infotext, setting_fields
from webui.storage.outputs import NamedCopy
from webui.storage.styles import Style
from webui.schemas import (MAX_CLIP_SKIP, MAX_MERGING_RATIO, MAX_PROMPT_CHARS, MAX_SIZE, MIN_SIZE, RANDN_SOURCES,
                           RESIZE_MODES, SAME_CHECKPOINT, GenerationRequest, InvalidRequest, JobState)
from webui.services import Services
from webui.ui.models import ModelActions, ModelPicker
from webui.ui.cards import (CardPictures, card_gallery, edited_metadata, metadata_editor, metadata_values, picked_name,
                            with_card_texts)
from webui.ui.controlnet import controlnet_section, request_fields as controlnet_fields
from webui.ui.params import (NO_REFINER, SAME_SAMPLER, SAME_SCHEDULE, SETTINGS_SOURCE, TAB_FIELDS, schedules_of,
                             seed_the_page_holds, with_labels)
from webui.ui.pictures import (ALL_SUBTAB_INPUTS, BATCH, IMG2IMG_MODES, RESIZE_BY, RESIZE_TO, SUBTAB_INPUTS, UnreadablePicture,
                               batch_uploads, inpainting_settings, on_open_subtab, open_picture, outpainting_start,
                               folder_pictures, output_folder, picture_inputs, read_upload, readable, start_pictures)
from webui.runs import (SeveralJobs, Submission, found_models, line_run, loopback_run, plot_run,
                        scaled_size_fields)
from webui.ui.scripts import (loopback_section, outpainting_section, plot_section, prompt_list_section,
                              prompt_matrix_section, sd_upscale_section)
from webui.ui.progress import (POLL_SECONDS, error_html, final_html, progress_html, timing_html, token_counter,
                               too_long_counter)
from webui.ui.session import Session, show_images
from webui.ui.several_runs import SeveralRuns
from webui.worker import Job, QueueFull, WorkerStopped, await_result
from webui.prompt_comments import strip_comments
from webui.prompt_matrix import matrix_plot
from webui.xyz_plot import AXIS_NAMES, SCRIPT, plan, read_axis

log = logging.getLogger(__name__)
DEFAULT_SAMPLER = "Euler a"
KINDS = ("txt2img", "img2img")


NO_SERVER_FOLDERS = ("Batch: this server reads no folders typed into the page (it is served to other machines "
                     "without a login, or started with --hide-ui-dir-config)")

EMBEDDINGS_WAIT = 5.0  # seconds the ↻ waits for the worker to read the embeddings folder


class GenerationActions(SeveralRuns):
    """The event functions of one tab (kind "txt2img" or "img2img"); each takes widget values and returns
    widget values, nothing more."""

    def __init__(self, services: Services, models: ModelActions, kind: str = "txt2img"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.worker = services.worker
        self.engine = services.engine
        self.models = models
        self.styles = services.styles
        self.outputs = services.outputs
        self.options = services.options
        self.runs: dict[str, SeveralJobs] = {}  # each tab's run of several jobs whose end no page has shown yet
        # As History's Delete: on a server shared without a login, visitors may not change what all share (the styles,
        # the cards' metadata).
        self.can_edit_shared = not services.settings.open_to_anyone
        self.reads_server_folders = services.settings.reads_server_folders  # Batch's Input directory
        self.cards = CardPictures()  # the LoRA, hypernetwork and embedding cards' pictures

    # A tab passes the parameters it has no widget for at their defaults (build_generation_tab).
    def generate(self, session: Session, prompt: str, negative_prompt: str | None = None, sampler_name: str = DEFAULT_SAMPLER,
                 scheduler: str = "Automatic", steps: int = 20, cfg_scale: float = 7.0, width: int | None = None,
                 height: int | None = None, seed: int = -1, n_iter: int = 1, batch_size: int = 1, clip_skip: int = 1,
                 model: str | None = None, subseed: int = -1, subseed_strength: float = 0.0,
                 styles: list[str] | None = None, denoising_strength: float = 0.75, enable_hr: bool = False,
                 hr_scale: float = 2.0, hr_upscaler: str = "Latent", hr_second_pass_steps: int = 0,
                 hr_resize_x: int = 0, hr_resize_y: int = 0,
                 init_image: Image.Image | UnreadablePicture | None = None, resize_mode: int = 0,
                 img2img_mode: str = "img2img", color_sketch: dict | None = None, inpaint_canvas: dict | None = None,
                 inpaint_color_sketch: dict | None = None,
                 inpaint_image: Image.Image | UnreadablePicture | None = None,
                 mask: Image.Image | UnreadablePicture | None = None, batch_pictures: list[str] | None = None,
                 batch_masks: list[str] | None = None, mask_blur: int = 4,
                 inpainting_mask_invert: int = 0, inpainting_fill: int = 1, inpaint_full_res: int = 0,
                 inpaint_full_res_padding: int = 32, soft_inpainting: bool = False,
                 soft_inpainting_schedule_bias: float = 1.0, soft_inpainting_preservation_strength: float = 0.5,
                 soft_inpainting_transition_contrast_boost: float = 4.0, soft_inpainting_mask_influence: float = 0.0,
                 soft_inpainting_difference_threshold: float = 0.5, soft_inpainting_difference_contrast: float = 2.0,
                 xyz_plot: bool = False, x_type: str = "Nothing",
                 x_values: str = "", y_type: str = "Nothing", y_values: str = "", z_type: str = "Nothing",
                 z_values: str = "", xyz_legend: bool = True, xyz_sub_images: bool = False,
                 xyz_keep_random_seeds: bool = False, prompt_list: bool = False, prompt_lines: str = "",
                 prompt_list_same_seed: bool = False, prompt_list_iterate_seed: bool = False,
                 prompt_list_position: str = "start", tiling: bool = False, restore_faces: bool = False,
                 seed_resize_from_w: int = 0,
                 seed_resize_from_h: int = 0, size_tab: str = RESIZE_TO, scale_by: float = 1.0,
                 hr_sampler_name: str = SAME_SAMPLER, hr_scheduler: str = SAME_SCHEDULE, hr_prompt: str | None = None,
                 hr_negative_prompt: str | None = None, prompt_matrix: bool = False,
                 matrix_parts_first: bool = False, matrix_different_seeds: bool = False,
                 matrix_prompt: str = "positive", outpainting: bool = False, outpaint_pixels: int = 128,
                 outpaint_mask_blur: int = 4, outpaint_fill: int = 0,
                 outpaint_directions: list[str] | None = None, loopback: bool = False, loopback_loops: int = 4,
                 loopback_final_strength: float = 0.5, loopback_curve: str = "Linear",
                 loopback_interrogation: str = "None", sd_upscale: bool = False,
                 sd_upscale_overlap: int = 64, sd_upscale_scale: float = 2.0,
                 sd_upscale_upscaler: str = "Lanczos", sd_vae: str = "Automatic", batch_input_dir: str = "",
                 batch_mask_dir: str = "", batch_output_dir: str = "", refiner: bool = False,
                 refiner_checkpoint: str | None = NO_REFINER, refiner_switch_at: float = 0.8,
                 hr_checkpoint_name: str | None = SAME_CHECKPOINT, color_correction: bool = False,
                 controlnet_enabled: bool = False,
                 controlnet_image: Image.Image | None = None, controlnet_module: str = "none",
                 controlnet_model: str | None = None, controlnet_weight: float = 1.0,
                 controlnet_guidance_start: float = 0.0, controlnet_guidance_end: float = 1.0,
                 controlnet_resize_mode: int = 1, controlnet_processor_res: int = 512,
                 controlnet_threshold_a: float = 100.0, controlnet_threshold_b: float = 200.0,
                 controlnet_pixel_perfect: bool = False, s_min_uncond: float = 0.0, s_min_uncond_all: bool = False,
                 sgm_noise_multiplier: bool = False,
                 skip_early_cond: float = 0.0, initial_noise_multiplier: float = 1.0, image_cfg_scale: float = 1.5,
                 img2img_extra_noise: float = 0.0, token_merging_ratio: float = 0.0,
                 token_merging_ratio_hr: float = 0.0, eta_ddim: float = 0.0, eta_ancestral: float = 1.0,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = 0.0, s_noise: float = 1.0,
                 eta_noise_seed_delta: int = 0, beta_dist_alpha: float = BETA_ALPHA,
                 beta_dist_beta: float = BETA_BETA, randn_source: str = SETTINGS_SOURCE, sigma_min: float = 0.0,
                 sigma_max: float = 0.0, rho: float = 0.0, uni_pc_variant: str = UniPCOptions.variant,
                 uni_pc_order: int = UniPCOptions.order, uni_pc_lower_order_final: bool = UniPCOptions.lower_order_final,
                 always_discard_next_to_last_sigma: bool = False, sd_noise_schedule: str = NOISE_SCHEDULES[0],
                 use_old_karras_scheduler_sigmas: bool = False, use_downcasted_alpha_bar: bool = False,
                 override_settings: list[str] | None = None, xyz_sub_grids: bool = False) -> Iterator[tuple]:
        """Submit a job and stream (session, gallery, progress, preview, infotext, time) until it ends.
        img2img starts from the picture of its open sub-tab (img2img_mode: pictures.IMG2IMG_MODES), fitted by
        resize_mode, and on the Inpaint sub-tabs draws again only where the mask (or the strokes) says; on Batch,
        one run for each uploaded picture (with its mask, if masks are uploaded), or each picture of the server
        folder batch_input_dir (masks from batch_mask_dir), each result also saved into batch_output_dir if given;
        txt2img's denoising strength is its hires fix's. With xyz_plot, one run for each combination of the
        axes' values (x_type and x_values, ...: webui/xyz_plot.py), then their grid; with prompt_list, one run
        for each of prompt_lines (webui/prompt_lines.py); with prompt_matrix, the prompt matrix's runs and grid;
        img2img's outpainting grows the picture and draws the border (webui/outpainting.py), and loopback runs
        img2img again from each picture made (webui/loopback.py); sd_upscale enlarges the picture and draws it
        again in tiles (webui/sd_upscale.py), on the img2img sub-tab or for each picture of Batch. ControlNet
        (controlnet_*: webui/ui/controlnet.py) steers a plain Generate by controlnet_image. override_settings: the
        Settings tab's options a paste set for the page's runs, as infotext pairs ("Emphasis: No norm").
        xyz_sub_grids: with a Z axis, each Z value's grid too, after the one of them all (A1111's Include Sub Grids)."""
        controlnet = controlnet_fields({name: value for name, value in locals().items()
                                        if name.startswith("controlnet_")})
        request = {
            "prompt": prompt, "negative_prompt": negative_prompt, "sampler_name": sampler_name,
            "scheduler": scheduler, "steps": steps, "cfg_scale": cfg_scale, "width": width, "height": height,
            "seed": -1 if seed is None else seed, "n_iter": n_iter, "batch_size": batch_size,
            "clip_skip": clip_skip, "model": model or None, "sd_vae": sd_vae or "Automatic",
            "subseed": -1 if subseed is None else subseed, "subseed_strength": subseed_strength or 0.0,
            "seed_resize_from_w": seed_resize_from_w or 0, "seed_resize_from_h": seed_resize_from_h or 0,
            "styles": list(styles or []), "tiling": bool(tiling), "restore_faces": bool(restore_faces),
            "s_min_uncond": s_min_uncond or 0.0,
            "s_min_uncond_all": bool(s_min_uncond_all), "skip_early_cond": skip_early_cond or 0.0,
            "sgm_noise_multiplier": bool(sgm_noise_multiplier),
            "img2img_extra_noise": img2img_extra_noise or 0.0,
            "token_merging_ratio": token_merging_ratio or 0.0,
            # a number box emptied by the user reads as None: its default
            **{name: STEP_DEFAULTS[name] if value is None else value for name, value in (
                ("eta_ddim", eta_ddim), ("eta_ancestral", eta_ancestral), ("s_churn", s_churn), ("s_tmin", s_tmin),
                ("s_tmax", s_tmax), ("s_noise", s_noise))},
            "eta_noise_seed_delta": eta_noise_seed_delta or 0,
            "beta_dist_alpha": BETA_ALPHA if beta_dist_alpha is None else beta_dist_alpha,
            "beta_dist_beta": BETA_BETA if beta_dist_beta is None else beta_dist_beta,
            "randn_source": None if randn_source in (None, SETTINGS_SOURCE) else randn_source,
            "sigma_min": sigma_min or 0.0, "sigma_max": sigma_max or 0.0, "rho": rho or 0.0,  # an emptied box: 0
            "uni_pc_variant": uni_pc_variant, "uni_pc_order": uni_pc_order,
            "uni_pc_lower_order_final": bool(uni_pc_lower_order_final),
            "always_discard_next_to_last_sigma": bool(always_discard_next_to_last_sigma),
            "sd_noise_schedule": sd_noise_schedule or NOISE_SCHEDULES[0],
            "use_old_karras_scheduler_sigmas": bool(use_old_karras_scheduler_sigmas),
            "use_downcasted_alpha_bar": bool(use_downcasted_alpha_bar),
        }
        if refiner and refiner_checkpoint not in (None, "", NO_REFINER):  # as A1111: ticked with none picked is off
            request |= {"refiner_checkpoint": refiner_checkpoint, "refiner_switch_at": refiner_switch_at}
        if self.kind == "img2img":
            request |= {"denoising_strength": denoising_strength, "resize_mode": resize_mode or 0,
                        "color_correction": bool(color_correction),
                        "initial_noise_multiplier": 1.0 if initial_noise_multiplier is None else initial_noise_multiplier,
                        "image_cfg_scale": 1.5 if image_cfg_scale is None else image_cfg_scale}
            if sd_upscale:
                request |= {"sd_upscale": True, "sd_upscale_overlap": int(sd_upscale_overlap),
                            "sd_upscale_scale": float(sd_upscale_scale), "sd_upscale_upscaler": sd_upscale_upscaler}
        elif enable_hr:
            hires_sampler = None if hr_sampler_name in (SAME_SAMPLER, "", None) else hr_sampler_name
            request |= {"enable_hr": True, "denoising_strength": denoising_strength, "hr_scale": hr_scale,
                        "hr_upscaler": hr_upscaler, "hr_second_pass_steps": hr_second_pass_steps or 0,
                        "hr_resize_x": hr_resize_x or 0, "hr_resize_y": hr_resize_y or 0,
                        "hr_sampler_name": hires_sampler,
                        "hr_scheduler": _hires_schedule(hires_sampler or sampler_name, hr_scheduler),
                        "hr_prompt": hr_prompt or None, "hr_negative_prompt": hr_negative_prompt or None,
                        "hr_checkpoint_name": hr_checkpoint_name,  # "Use same checkpoint" reads as none
                        "token_merging_ratio_hr": token_merging_ratio_hr or 0.0}
        try:
            if self.kind == "img2img" and img2img_mode not in IMG2IMG_MODES:  # a raw API call's, mistyped
                raise InvalidRequest(f"img2img_mode: unknown sub-tab {str(img2img_mode)[:100]!r}; use one of: "
                                     f"{', '.join(IMG2IMG_MODES)}")
            request |= overridden_settings(override_settings)
            batch = self.kind == "img2img" and img2img_mode == BATCH
            loopback, sd_upscale = (switch and self.kind == "img2img" for switch in (loopback, sd_upscale))
            scripts = (batch and not sd_upscale, xyz_plot, prompt_list, prompt_matrix, outpainting, loopback,
                       sd_upscale)
            if sum(map(bool, scripts)) > 1:
                raise InvalidRequest("Batch, the X/Y/Z plot, the Prompt matrix, Prompts from a list, Poor man's "
                                     "outpainting, Loopback and SD upscale are each a script of their own: use one "
                                     "of them at a time (SD upscale also runs on Batch's pictures)")
            if controlnet and any(scripts):
                raise InvalidRequest("controlnet_enabled: ControlNet runs with a plain Generate here, not with Batch "
                                     "or a script; turn one of them off")
            request |= controlnet
            if isinstance(controlnet_image, UnreadablePicture):  # a problem only with ControlNet on
                controlnet_image = readable(controlnet_image, "") if controlnet else None
            picture = mask_picture = None
            if batch:
                uploads, unreadable = batch_uploads(*self._batch_files(batch_pictures, batch_masks, batch_input_dir,
                                                                       batch_mask_dir))
                copy_folder = self._batch_output(batch_output_dir)
                mask_picture = uploads[0][1]  # the masks come all or none
            elif self.kind == "img2img":
                picture, mask_picture = start_pictures(img2img_mode, {
                    "init_image": init_image, "color_sketch": color_sketch, "inpaint_canvas": inpaint_canvas,
                    "inpaint_color_sketch": inpaint_color_sketch, "inpaint_image": inpaint_image, "mask": mask})
            outpainting = outpainting and self.kind == "img2img"
            scale = scale_by if self.kind == "img2img" and size_tab == RESIZE_BY and not outpainting else None
            if scale and picture is not None:
                request |= scaled_size_fields(picture, scale)
            if outpainting:
                picture, mask_picture, outpainted = outpainting_start(picture, mask_picture, outpaint_pixels,
                                                                      outpaint_mask_blur, outpaint_directions)
                request |= outpainted | {"inpainting_fill": outpaint_fill or 0}
            elif mask_picture is not None:
                request |= {"mask_blur": mask_blur, "inpainting_mask_invert": inpainting_mask_invert or 0,
                            "inpainting_fill": inpainting_fill, "inpaint_full_res": bool(inpaint_full_res),
                            "inpaint_full_res_padding": inpaint_full_res_padding}
            if mask_picture is not None and soft_inpainting:  # outpainting's mask too, as A1111's always-on script
                request |= {"soft_inpainting": True} | {
                    name: value for name, value in locals().items() if name.startswith("soft_inpainting_")}
            if request["model"]:
                request["model"] = self.models.checked_choice(request["model"])
            if prompt_list:
                lines = line_run(self.worker, request, prompt_lines, prompt_list_same_seed, picture, mask_picture,
                                 iterate_seed=bool(prompt_list_iterate_seed),
                                 prompt_position=prompt_list_position or "start")
                runs = self._several(session, lines)
            elif xyz_plot:
                axes = [found_models(read_axis(name, axis_type, values), self._find_model) for name, axis_type, values
                        in zip(AXIS_NAMES, (x_type, y_type, z_type), (x_values, y_values, z_values))]
                plot = plan(request, axes, xyz_keep_random_seeds, check=self.worker.check)
                runs = self._plot(session, plot, plot_run(plot, picture, mask_picture, SCRIPT), xyz_legend,
                                  xyz_sub_images, xyz_sub_grids)
            elif prompt_matrix:
                plot = matrix_plot(request, parts_first=bool(matrix_parts_first),
                                   different_seeds=bool(matrix_different_seeds), negative=matrix_prompt == "negative",
                                   check=self.worker.check)
                # the grid, then each picture, as A1111 shows them
                runs = self._plot(session, plot, plot_run(plot, picture, mask_picture, "Prompt matrix"), legend=True,
                                  sub_images=True)
            elif loopback:
                runs = self._several(session, loopback_run(self.worker, request, int(loopback_loops),
                                                           float(loopback_final_strength), loopback_curve, picture,
                                                           mask_picture, loopback_interrogation or "None"))
            elif batch:
                new_folder = copy_folder is not None and not copy_folder.exists()  # made with its first picture
                batch_run = SeveralJobs([
                    Submission(request, partial(read_upload, path, "Batch"),
                               partial(read_upload, mask_path, "Batch") if mask_path else None, scale,
                               NamedCopy(copy_folder, Path(path).stem, new_folder) if copy_folder else None)
                    for path, mask_path in uploads], "Batch", skips_unreadable=True)
                runs = self._several(session, batch_run, unreadable)
            else:
                job = self.worker.submit(request, origin="ui", owner=self._owner(session), init_image=picture,
                                         mask=mask_picture, control_image=controlnet_image)
                self._forget_ended_run(session)  # a reload follows this job, not an earlier run's end
                session.start(job)
                runs = self._follow(session, job)
        except (InvalidRequest, QueueFull, ModelNotFound, WorkerStopped) as err:
            yield session, gr.skip(), error_html(with_labels(str(err))), gr.update(visible=False), gr.skip(), ""
            return
        except Exception as err:  # a bug: a message, and Generate clickable again (a raised error would leave it grey)
            log.exception("preparing a %s run failed", self.kind)
            yield session, gr.skip(), error_html(f"The run could not start: {err}"), gr.update(visible=False), \
                gr.skip(), ""
            return
        try:
            yield from runs
        except Exception as err:  # a bug here must still end as a message, never a silent spinner
            log.exception("following job %s failed", session.job_id)
            message = error_html(f"The page lost track of the job: {err}")
            yield session, gr.skip(), message, gr.update(visible=False), gr.skip(), ""

    def _find_model(self, name: str) -> str:
        """A Checkpoint name axis's value: the model the picker names so."""
        listed = self.models.find_pasted(name, None)
        if listed is None:
            raise InvalidRequest(f"there is no model {name!r}; the Stable Diffusion checkpoint list names those there "
                                 "are")
        return self.models.checked_choice(listed)

    def _batch_files(self, pictures: list[str] | None, masks: list[str] | None, input_dir: str | None,
                     mask_dir: str | None) -> tuple[list[str] | None, list[str] | None]:
        """Batch's pictures and masks: the server folders' where they are given (and allowed), else the uploads."""
        if not ((input_dir or "").strip() or (mask_dir or "").strip()):
            return pictures, masks
        if not self.reads_server_folders:
            raise InvalidRequest(NO_SERVER_FOLDERS + "; upload the pictures instead")
        if not (input_dir or "").strip():
            raise InvalidRequest("Batch: give the Input directory too, for the masks' pictures")
        folder_masks = folder_pictures(mask_dir, "Inpaint batch mask directory") if (mask_dir or "").strip() else None
        return folder_pictures(input_dir, "Input directory"), folder_masks or masks

    def _batch_output(self, output_dir: str | None) -> Path | None:
        """Batch's Output directory, checked before the first picture runs; None where none is given."""
        if not (output_dir or "").strip():
            return None
        if not self.reads_server_folders:  # writing there is reaching the server's files as much as reading
            raise InvalidRequest(NO_SERVER_FOLDERS + "; leave the Output directory empty (the results go to the "
                                 "outputs folder as every run's)")
        return output_folder(output_dir)

    def generate_on(self, subtab: str, names: list[str]) -> Callable[..., Iterator[tuple]]:
        """generate() as the img2img sub-tab `subtab`'s own Generate event calls it: the inputs after the session
        are the fields `names`, which hold that sub-tab's pictures and no other's."""
        def generate_on_subtab(session: Session, *values: Any) -> Iterator[tuple]:
            yield from self.generate(session, img2img_mode=subtab, **dict(zip(names, values)))
        return generate_on_subtab

    def resume(self, session: Session, tab: str | None) -> Iterator[tuple]:
        """A page (re)loaded in a tab whose job of this kind is still queued or running follows that job again:
        its progress and images come back, and Interrupt and Skip reach it. Outputs as generate()'s."""
        session.tab = tab or ""
        run = self.run_of(self._owner(session))
        if run is not None:  # a plot or batch: the rest of it, then its end (shown once)
            yield from self._follow_run(session, run)
            return
        job = self.worker.unfinished_job_of(self._owner(session), self.kind) if session.tab else None
        if job is None:
            yield session, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        session.start(job)
        yield from self._follow(session, job)

    def resume_button(self, session: Session, tab: str | None):
        """Generate greyed out when the page loads in a tab whose job of this kind is still unfinished; else left
        as it is (a click made meanwhile must count). The session notes which, for resumed_button."""
        owner = self._owner_of_tab(tab)
        run = self.run_of(owner)
        busy = (run is not None and not run.ended.is_set()) or (
            tab and self.worker.unfinished_job_of(owner, self.kind) is not None)
        session.resumed = bool(busy)  # State is handed on uncopied: the chain's next steps see this
        return busy_button() if busy else gr.skip()

    @classmethod
    def _owner(cls, session: Session) -> str | None:
        return cls._owner_of_tab(session.tab)

    @staticmethod
    def _owner_of_tab(tab: str | None) -> str | None:
        return f"ui-tab:{tab}" if tab else None

    def _follow(self, session: Session, job: Job) -> Iterator[tuple]:
        shown_images, shown_preview = 0, -1
        shown_progress = progress_html(job, self.worker.position(job.id), self.worker.activity)
        # selected_index=None: the browser would otherwise keep the last run's selected index.
        empty = gr.Gallery(value=[], selected_index=None)
        previews = bool(self.worker.options.preview_period())  # previews off: no box that stays empty
        yield session, empty, shown_progress, gr.update(visible=previews, value=None), "", ""
        while not job.wait(POLL_SECONDS):
            # Send only what changed: every send copies or encodes its images again.
            changes = {}
            if len(job.images) != shown_images:
                changes["gallery"] = show_images(session, job)
                shown_images = len(changes["gallery"])
            frame, frame_step = job.preview_frame()
            if frame is not None and frame_step != shown_preview:
                changes["preview"], shown_preview = frame, frame_step
            text = progress_html(job, self.worker.position(job.id), self.worker.activity)
            if text != shown_progress:
                changes["progress"] = shown_progress = text
            if changes:
                yield (session, changes.get("gallery", gr.skip()), changes.get("progress", gr.skip()),
                       changes.get("preview", gr.skip()), gr.skip(), gr.skip())
        gallery = show_images(session, job, grid=self.worker.saving_options(job).return_grid)
        if gallery:  # the run ends showing this image large (show_selected)
            session.selected = session.current_index()
        yield (session, gallery, final_html(job), gr.update(visible=False, value=None), session.current_infotext(),
               timing_html(job))

    def show_selected(self, session: Session):
        """After a run, the image the user picked, else the first, shown large, as A1111 does: a lone
        thumbnail fills the gallery's width and its lower part was cut off at the gallery's height.
        An event of its own, so that Gradio API clients of txt2img still get the gallery as a plain list."""
        return gr.update(selected_index=session.selected) if session.seeds else gr.skip()

    def resumed_button(self, session: Session):
        """Generate back at the end of a page-load resume, only where resume_button greyed it out (the job may have
        ended before resume looked again): one that found nothing leaves the button alone, since a Generate clicked
        during the page load may have greyed it out for a job not yet submitted."""
        return self.generate_button(session) if session.resumed else gr.skip()

    def generate_button(self, session: Session) -> gr.Button:
        """Generate greyed out while this tab's own job is queued or running, else clickable; asked at the end of
        a run."""
        job = self.worker.get(session.job_id) if session.job_id else None
        return gr.Button(interactive=job is None or job.state.finished)

    def interrupt(self, session: Session) -> None:
        run = self.run_of(session.run_key) or self.run_of(self._owner(session))
        if run is not None:  # a plot or batch: no more of its jobs either
            run.stop(self.worker)
        if session.job_id:
            self.worker.cancel(session.job_id)

    def skip(self, session: Session) -> None:
        job = self.worker.get(session.job_id) if session.job_id else None
        if job is not None and job.state is JobState.QUEUED:  # Skip ends a picture being made: there is none yet
            gr.Info("Your job is still queued, so Skip has no picture to end yet: press it once the job runs, or "
                    "Interrupt to take the job out of the queue.")
            return
        if job is not None:
            self.worker.skip(job.id)

    def select_image(self, session: Session, evt: gr.SelectData) -> tuple[Session, str]:
        index = evt.index if isinstance(evt.index, int) else 0
        session.selected, session.pick_gone = index, False
        return session, session.current_infotext()

    @staticmethod
    def pick_failed(session: Session) -> tuple[Session, str]:
        """A pick Gradio refused before select_image ran (its file deleted since it was shown): which picture is
        shown is not known, so nothing is sent or reused from the gallery until the next pick (it sent the
        picture picked before, with the parameters shown for it)."""
        session.selected, session.pick_gone = None, True
        return session, ""

    @staticmethod
    def _picked(session: Session) -> int:
        """The gallery image picked (the first if none is); gr.Error where the last pick could not be read."""
        if session.pick_gone:
            raise gr.Error("The picture picked last is gone from the outputs folder (deleted since it was shown): "
                           "pick another.")
        return session.current_index()

    def reuse_seed(self, session: Session):
        """The seed of the image selected in the gallery (the first if none is); left alone if it is empty."""
        index = self._picked(session)
        return _for_the_seed_box(session.seeds[index], "Seed") if index < len(session.seeds) else gr.skip()

    def reuse_subseed(self, session: Session):
        """The variation seed of the image selected (the first if none is), as A1111's ♻ beside it: -1 where that
        image had no variation strength (its variation seed changed nothing); left alone if the gallery is empty."""
        index = self._picked(session)
        if index >= len(session.infotexts):
            return gr.skip()
        fields = request_fields_from_infotext(session.infotexts[index])
        return _for_the_seed_box(fields.get("subseed", -1), "Variation seed") if fields.get("subseed_strength") else -1

    def sent_picture(self, session: Session) -> tuple[Any, dict]:
        """The gallery's current image and its parameters, for Send to img2img: its file, else (not saved: cut
        short, or the disk was full) the picture while the worker still holds its job."""
        index = self._picked(session)
        if index >= len(session.seeds):
            raise gr.Error("Generate an image first.")
        picture = session.paths[index]
        if not (picture and os.path.exists(picture)):
            picture = self._held_picture(session, index)
        if picture is None:
            raise gr.Error("This image was not saved and the server no longer holds it; send another one.")
        return picture, request_fields_from_infotext(session.infotexts[index])

    def _held_picture(self, session: Session, index: int) -> Image.Image | None:
        """The picture the worker still holds for the gallery's image `index`: the session's last job's image at
        that place, where it is that image (a run of several jobs, a plot or a list, shows other jobs' too: its
        picture would go with another's parameters)."""
        job = self.worker.get(session.job_id) if session.job_id else None
        held = job.images[index] if job and index < len(job.images) else None
        if held is None or (held.seed, held.infotext) != (session.seeds[index], session.infotexts[index]):
            return None
        return held.image

    @staticmethod
    def _subtab_picture(mode: str, pictures: tuple) -> Image.Image:
        """The open sub-tab's picture to start from; gr.Error saying what to upload where there is none to read.
        `pictures`: that sub-tab's inputs (pictures.SUBTAB_INPUTS)."""
        try:
            picture = open_picture(mode, dict(zip(SUBTAB_INPUTS[mode], pictures)))
        except InvalidRequest as err:  # Batch's first picture, unreadable
            raise gr.Error(str(err)) from None
        if picture is None:
            raise gr.Error("Upload a picture first.")
        if isinstance(picture, UnreadablePicture):
            raise gr.Error(with_labels(picture.problem()))
        return picture

    async def interrogate(self, mode: str, *pictures: Any) -> str:
        """A1111's Interrogate CLIP: a prompt describing the open sub-tab's picture, for the Prompt box. Awaited, not
        waited for on a thread: behind a long job, waiting clicks would fill the thread pool every tab's events share
        (as the model pick's)."""
        picture = self._subtab_picture(mode, pictures)
        try:
            return await await_result(self.worker.interrogate(picture))
        except (InvalidRequest, WorkerStopped) as err:
            raise gr.Error(str(err)) from None

    @classmethod
    def picture_size(cls, mode: str, *pictures: Any) -> tuple[int, int]:
        """Width and Height from the open sub-tab's picture to start from (A1111's 📐, "From image" here): its size,
        as a multiple of 8 within the size limits. `pictures`: that sub-tab's inputs (pictures.SUBTAB_INPUTS)."""
        picture = cls._subtab_picture(mode, pictures)
        try:
            check_picture_size(*picture.size)
        except ValueError as err:
            raise gr.Error(f"Image: {err}") from None
        return size_from_image(picture)

    def schedules_for(self, sampler_name: str, schedule: str):
        """The Schedule type list of this sampler only (DDIM cannot follow Karras): a pair Generate would
        refuse cannot be picked. The schedule type stays when the new sampler can follow it."""
        try:
            choices = schedules_of(sampler_name)
        except ValueError:
            return gr.skip()
        return gr.update(choices=choices) if schedule in choices else gr.update(choices=choices, value="Automatic")

    def random_seed(self) -> int:
        return -1

    def style_names(self) -> list[str]:
        return [style.name for style in self.styles.styles()]

    def apply_styles(self, prompt: str, negative_prompt: str, names: list[str] | None):
        """Move the picked styles' texts into the prompts (to edit them there) and clear the pick."""
        if not names:
            raise gr.Error("Pick one or more styles first.")
        try:
            prompt, negative_prompt = self.styles.apply(prompt or "", negative_prompt or "", names)
        except InvalidRequest as err:
            raise gr.Error(with_labels(str(err))) from None
        return prompt, negative_prompt, gr.update(value=[])

    def save_style(self, name: str, prompt: str, negative_prompt: str):
        """Save the prompts as a style (replacing one of the same name) and offer it in the list."""
        if not self.can_edit_shared:
            raise gr.Error("Saving styles is off on a server shared without --gradio-auth.")
        replaced = (name or "").strip() in self.style_names()
        try:
            self.styles.save(Style(name or "", prompt or "", negative_prompt or ""))
        except (InvalidRequest, OSError) as err:
            raise gr.Error(f"The style was not saved: {err}") from None
        gr.Info(f"{'Replaced' if replaced else 'Saved'} style {name.strip()!r}.")
        return gr.update(choices=self.style_names())

    def delete_style(self, name: str, picked: list[str] | None):
        if not self.can_edit_shared:
            raise gr.Error("Deleting styles is off on a server shared without --gradio-auth.")
        try:
            deleted = self.styles.delete((name or "").strip())
        except OSError as err:
            raise gr.Error(f"The style was not deleted: {err}") from None
        if not deleted:
            raise gr.Error(f"No style is named {(name or '').strip()!r}; type the name of one to delete.")
        return self.offered_styles(picked)

    def offered_styles(self, picked: list[str] | None) -> dict:
        """The Styles list as the styles file has it now, keeping those picked that are still there."""
        names = self.style_names()
        return gr.update(choices=names, value=[each for each in picked or [] if each in names])

    def styles_list(self, picked: list[str] | None = None) -> dict:
        """The Styles list as the styles file has it now, with the picks it no longer has (Gradio would refuse them at
        Generate; the worker says which style is gone); the picks left as they are (a pick made while this answer
        was on its way must not be undone)."""
        names = self.style_names()
        return gr.update(choices=names + [each for each in picked or [] if each not in names])

    def file_lists(self) -> tuple:
        """The Styles, LoRA, Embedding and upscaler lists, the LoRA and embedding cards, and the Hypernetwork list
        and cards, as they are now (the page may be older than a save or a file)."""
        # The LoRA and hypernetwork folders are read again here; embeddings only between jobs (↻), so those are the
        # last read.
        return (self.styles_list(),
                gr.update(choices=[entry.name for entry in self.engine.loras.refresh()]),
                gr.update(choices=self.embedding_names()),
                gr.update(choices=self.upscaler_names()),
                self.lora_cards(), self.embedding_cards(),
                self.refresh_hypernetworks(), self.hypernetwork_cards())

    def upscaler_names(self) -> list[str]:
        """The tab's picture upscaler list: the hires fix's (latent ones first) or SD upscale's (None first)."""
        models = self.engine.upscalers.names()
        return [*HIRES_UPSCALERS, *models] if self.kind == "txt2img" else [*PICTURE_UPSCALERS, *models]

    def lora_names(self) -> list[str]:
        return [entry.name for entry in self.engine.loras.entries()]

    def lora_files(self) -> list[tuple[str, Path]]:
        return [(entry.name, entry.path) for entry in self.engine.loras.entries()]

    def embedding_files(self) -> list[tuple[str, Path]]:
        return sorted((name, embedding.path) for name, embedding in self.engine.embeddings.loaded.items())

    def lora_cards(self, search: str = "") -> list:
        return self.cards.gallery(self.lora_files(), search)

    def embedding_cards(self, search: str = "") -> list:
        return self.cards.gallery(self.embedding_files(), search)

    def lora_card_picked(self, prompt: str, negative: str, weight: float, search: str, evt: gr.SelectData) -> tuple:
        """A LoRA card clicked (A1111's): its tag into the prompt at its metadata's preferred weight (else the Weight
        slider's), the activation text after it and the negative text into the negative prompt; picked in the list."""
        name = picked_name(evt, self.lora_files(), search)
        if name is None:
            return gr.skip(), gr.skip(), gr.skip()
        metadata = read_metadata(self._lora_path(name))
        prompt = self.add_lora(prompt, name, metadata.preferred_weight or weight)
        return *with_card_texts(prompt, negative or "", metadata), name

    def lora_metadata(self, name: str | None) -> tuple:
        """The Metadata editor's values for the LoRA picked (empty with none picked), then its name: what Save writes
        to (the list may have moved on to another LoRA while these were read)."""
        return *metadata_values(read_metadata(self._lora_path(name)) if name else CardMetadata()), name

    def save_lora_metadata(self, name: str | None, *values: Any) -> None:
        """The Metadata editor's values into the picked LoRA's <name>.json (the keys it does not show kept)."""
        if not self.can_edit_shared:
            raise gr.Error("Saving metadata is off on a server shared without --gradio-auth.")
        if not name:
            raise gr.Error("Pick a LoRA first (files in the LoRA folder; ↻ reads it again).")
        path = self._lora_path(name)
        try:
            saved = write_metadata(path, edited_metadata(read_metadata(path), values))
        except (ValueError, OSError) as err:
            raise gr.Error(f"The metadata was not saved: {err}") from None
        gr.Info(f"Saved {saved.name} beside the LoRA.")

    def _lora_path(self, name: str) -> Path:
        found = next((path for listed, path in self.lora_files() if listed == name), None)
        if found is None:
            raise gr.Error(f"There is no LoRA named {name!r} in the LoRA folder now; ↻ reads it again.")
        return found

    def embedding_card_picked(self, prompt: str, search: str, evt: gr.SelectData) -> tuple:
        """An embedding card clicked: its name into the prompt, and picked in the list."""
        name = picked_name(evt, self.embedding_files(), search)
        return (gr.skip(), gr.skip()) if name is None else (self.add_embedding(prompt, name), name)

    def refresh_loras(self):
        return gr.update(choices=[entry.name for entry in self.engine.loras.refresh()])

    def hypernetwork_names(self) -> list[str]:
        return [entry.name for entry in self.engine.hypernetworks.entries()]

    def hypernetwork_files(self) -> list[tuple[str, Path]]:
        return [(entry.name, entry.path) for entry in self.engine.hypernetworks.entries()]

    def hypernetwork_cards(self, search: str = "") -> list:
        return self.cards.gallery(self.hypernetwork_files(), search)

    def hypernetwork_card_picked(self, prompt: str, weight: float, search: str, evt: gr.SelectData) -> tuple:
        """A hypernetwork card clicked: its tag into the prompt (at the Weight slider's weight), and picked in the
        list."""
        name = picked_name(evt, self.hypernetwork_files(), search)
        return (gr.skip(), gr.skip()) if name is None else (self.add_hypernetwork(prompt, name, weight), name)

    def refresh_hypernetworks(self):
        return gr.update(choices=[entry.name for entry in self.engine.hypernetworks.refresh()])

    @staticmethod
    def add_hypernetwork(prompt: str, name: str | None, weight: float) -> str:
        """The prompt with <hypernet:name:weight> at its end; a tag already there for it gets the new weight."""
        if not name:
            raise gr.Error("Pick a hypernetwork first (files in the hypernetworks folder; ↻ reads it again).")
        return with_tag(prompt, HYPERNET_TAG, name, weight)

    def embedding_names(self) -> list[str]:
        return sorted(self.engine.embeddings.loaded)

    def refresh_embeddings(self):
        """Read the embeddings folder again, between jobs (the tokenizer must not change under a running one)."""
        try:
            found = self.worker.refresh_embeddings().result(timeout=EMBEDDINGS_WAIT)
        except TimeoutError:
            gr.Warning("The embeddings folder is read once the running job is done; press ↻ again then.")
            return gr.skip()
        return gr.update(choices=sorted(found.loaded))

    @staticmethod
    def add_embedding(text: str, name: str | None) -> str:
        """The text with the embedding's name at its end, unless it is there already."""
        if not name:
            raise gr.Error("Pick an embedding first (files in the embeddings folder; ↻ reads it again).")
        text = text or ""
        if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text, flags=re.IGNORECASE):
            return text
        return f"{text.rstrip().rstrip(',')}, {name}" if text.strip() else name

    def add_lora(self, prompt: str, name: str | None, weight: float) -> str:
        """The prompt with <lora:name:weight> at its end; a tag already there for this LoRA gets the new weight."""
        if not name:
            raise gr.Error("Pick a LoRA first (files in the LoRA folder; ↻ reads it again).")
        return with_tag(prompt, "lora", name, weight)

    def count_negative_tokens(self, text: str, steps: float = 20) -> str:
        """The negative prompt's counter: A1111 does not split it at AND."""
        return self.count_tokens(text, steps, negative=True)

    def count_tokens(self, text: str, steps: float = 20, negative: bool = False) -> str:
        if len(text or "") > MAX_PROMPT_CHARS:  # Generate would refuse it: say so while it is typed
            return too_long_counter(len(text), MAX_PROMPT_CHARS)
        if self.options.current().enable_prompt_comments:  # comments are not drawn: not counted either
            text = strip_comments(text or "")
        try:
            settings = self.options.current()
            return token_counter(self.engine.count_tokens(text or "", max(1, int(steps or 20)), negative,
                                                          settings.emphasis, settings.comma_padding_backtrack))
        except Exception:  # the tokenizer is shared with the worker thread; a clash is not worth an error
            return gr.skip()


def overridden_settings(pairs: list[str] | None) -> dict[str, Any]:
    """The request fields of the page's Override settings (a paste's pairs, which the user may have removed)."""
    try:
        return setting_fields(pairs or [])
    except ValueError as err:
        raise InvalidRequest(f"override_settings: {err}") from None


def _for_the_seed_box(seed: int, label: str):
    """A seed for the page's box, or gr.skip() with a warning where the page cannot hold it exactly."""
    note = seed_the_page_holds(seed, label)
    if note:
        gr.Warning(note)
        return gr.skip()
    return seed


def shown_seed(value: float | None):
    """The seed box's value as Generate will read it (Gradio rounds 12.7 to 13). A number past 64 bits
    cannot be sent back to the page; it stays as typed, and Generate says which seeds there are."""
    return value if value is None or abs(value) < 2**63 else gr.skip()


def with_tag(prompt: str | None, tag_type: str, name: str, weight: float) -> str:
    """The prompt with <tag_type:name:weight> at its end; a tag already there for this name gets the new weight."""
    tag = f"<{tag_type}:{name}:{round(float(weight), 2):g}>"
    prompt = prompt or ""
    same = re.compile(rf"<{tag_type}:{re.escape(name)}(:[^<>]*)?>")
    if same.search(prompt):
        return same.sub(tag, prompt, count=1)
    return f"{prompt.rstrip()} {tag}".lstrip()


def _hires_schedule(sampler: str, schedule: str | None) -> str | None:
    """The Hires schedule type that runs (None: the first pass's): as picked, or Automatic with a warning where the
    hires pass's sampler cannot follow it, as the API runs it (A1111 lets any pair run)."""
    if schedule in (SAME_SCHEDULE, "", None):
        return None
    try:
        resolve_sampler(sampler, schedule)
    except ValueError:
        gr.Warning(f"Hires schedule type {schedule}: {sampler} cannot follow it here; the hires pass runs with "
                   "Automatic.")
        return "Automatic"
    return schedule


def file_picker(names: list[str], label: str, folder: str, elem_prefix: str) -> tuple[gr.Dropdown, gr.Button]:
    """A list of files to pick from, with ↻ to read their folder again."""
    with gr.Row():
        dropdown = gr.Dropdown(names, value=None, label=label, scale=4, info=f"from {folder}",
                               elem_id=f"{elem_prefix}_name")
        refresh = gr.Button("↻", elem_id=f"{elem_prefix}_refresh", scale=0, min_width=48)
    return dropdown, refresh


def busy_button() -> gr.Button:
    return gr.Button(interactive=False)


@dataclass
class GenerationTab:
    kind: str  # "txt2img" or "img2img"
    actions: GenerationActions
    session: gr.State
    # GenerationRequest field name -> its widget ("n_iter" is Batch count, "model" the model picker,
    # "init_image" img2img's picture).
    widgets: dict[str, gr.components.Component]
    generate_events: list[Any]  # the page's runs (img2img: one per sub-tab), each followed to its end
    tab_token: gr.Textbox  # filled from the browser tab's sessionStorage when the page loads (blocks.py)
    file_list_widgets: list[gr.components.Component]  # what file_lists updates, when the page loads (blocks.py)
    send_to_img2img: gr.Button  # under the gallery: its current image and parameters to img2img (blocks.py)
    send_to_inpaint: gr.Button  # the same, onto img2img's Inpaint canvas
    send_to_extras: gr.Button  # its current image to the Extras tab
    paste: gr.Button  # A1111's ↙: the prompt box's parameters (or the last picture's) into the fields (blocks.py)
    picture_tabs: gr.Tabs | None = None  # img2img's sub-tabs (pictures.IMG2IMG_MODES)
    style_edits: list[Any] = field(default_factory=list)  # Save and Delete style: the other tab's list follows (blocks.py)

    @property
    def file_lists(self) -> Any:
        return self.actions.file_lists

    @property
    def field_names(self) -> tuple[str, ...]:
        """The fields a sent image sets (params.TAB_FIELDS)."""
        return TAB_FIELDS[self.kind]

    @property
    def field_limits(self) -> dict[str, tuple[float | None, float | None]]:
        """The ends of the widgets of field_names that have them (sliders): Gradio refuses a value past them before
        generate() runs, so a send leaves one out."""
        return {name: (widget.minimum, widget.maximum) for name, widget in zip(self.field_names, self.field_components)
                if getattr(widget, "minimum", None) is not None or getattr(widget, "maximum", None) is not None}

    @property
    def field_components(self) -> list[gr.components.Component]:
        """Widgets in field_names order, for 'send to txt2img' and 'send to img2img'."""
        return [self.widgets[name] for name in self.field_names]

    @property
    def checkpoint_lists(self) -> list[tuple[gr.Dropdown, str]]:
        """The tab's lists of checkpoints besides the model (the refiner's, the hires fix's), each with the choice
        that comes before the models (blocks.py reads the models folder into them)."""
        lists = (("refiner_checkpoint", NO_REFINER), ("hr_checkpoint_name", SAME_CHECKPOINT))
        return [(self.widgets[name], first) for name, first in lists if name in self.widgets]

    @property
    def model_sliders(self) -> list[gr.components.Component]:
        """The sliders that follow the loaded model: width and height (its native size)."""
        return [self.widgets[name] for name in ("width", "height")]


# generate()'s parameters after the session: request field names, which Gradio's API shows too. A tab's
# Generate takes its widget for each, or the parameter's default where it has none (img2img has no hires fix).
_GENERATE_PARAMETERS = list(inspect.signature(GenerationActions.generate).parameters.values())[2:]
REQUEST_PARAMS = tuple(parameter.name for parameter in _GENERATE_PARAMETERS)
REQUEST_DEFAULTS = {parameter.name: parameter.default for parameter in _GENERATE_PARAMETERS}


def _size_row(kind: str, size: int) -> tuple[gr.Slider, gr.Slider, gr.Button | None]:
    """Width and Height (and on img2img "From image": A1111's 📐 in words, since without an emoji font it shows as
    an empty box)."""
    with gr.Row():
        width = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=8, label="Width", elem_id=f"{kind}_width")
        height = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=8, label="Height", elem_id=f"{kind}_height")
        picture_size = (gr.Button("From image", elem_id="img2img_picture_size", scale=0, min_width=80, size="sm")
                        if kind == "img2img" else None)
    return width, height, picture_size


def _api(kind: str, name: str) -> dict:
    """txt2img's events keep their Gradio API names; img2img's, but Generate, are the page's own."""
    return {"api_name": name} if kind == "txt2img" else {"api_visibility": "private"}


def hires_fix_section(upscalers: list[str], model_names: list[str]) -> dict[str, gr.components.Component]:
    """txt2img's "Hires. fix" (A1111's): the picture enlarged and denoised again (by another checkpoint, if one is
    picked); the widgets by request field."""
    # The switch outside the section: whether it is on shows while the section is closed (a send may turn it on).
    enable = gr.Checkbox(False, label="Hires. fix", info="draw at Width x Height, then enlarge and add detail",
                         elem_id="txt2img_enable_hr")
    with gr.Accordion("Hires. fix settings", open=False, elem_id="txt2img_hires_fix"):
        with gr.Row():
            upscaler = gr.Dropdown(upscalers, value="Latent", label="Upscaler",
                                   elem_id="txt2img_hr_upscaler")
            steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: as many as Sampling steps)",
                              elem_id="txt2img_hires_steps")
            strength = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                 elem_id="txt2img_denoising_strength")
        with gr.Row():
            scale = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
            resize_x = gr.Slider(0, MAX_SIZE, value=0, step=8, label="Resize width to (0: by Upscale by)",
                                 elem_id="txt2img_hr_resize_x")
            resize_y = gr.Slider(0, MAX_SIZE, value=0, step=8, label="Resize height to (0: by Upscale by)",
                                 elem_id="txt2img_hr_resize_y")
        with gr.Row():
            checkpoint = gr.Dropdown([SAME_CHECKPOINT, *model_names], value=SAME_CHECKPOINT, label="Hires checkpoint",
                                     elem_id="txt2img_hr_checkpoint", allow_custom_value=True)
            sampler = gr.Dropdown([SAME_SAMPLER, *sampler_names()], value=SAME_SAMPLER, label="Hires sampling method",
                                  elem_id="txt2img_hr_sampler")
            schedule = gr.Dropdown([SAME_SCHEDULE, *SCHEDULE_TYPES], value=SAME_SCHEDULE, label="Hires schedule type",
                                   elem_id="txt2img_hr_scheduler")
        with gr.Row():
            prompt = gr.Textbox(label="Hires prompt", lines=2, elem_id="txt2img_hr_prompt",
                                placeholder="The prompt of the second pass; empty: the same as the first pass's")
            negative = gr.Textbox(label="Hires negative prompt", lines=2, elem_id="txt2img_hr_negative_prompt",
                                  placeholder="The negative prompt of the second pass; empty: the same as the first "
                                              "pass's")
    return {"enable_hr": enable, "hr_upscaler": upscaler, "hr_second_pass_steps": steps,
            "denoising_strength": strength, "hr_scale": scale, "hr_resize_x": resize_x, "hr_resize_y": resize_y,
            "hr_sampler_name": sampler, "hr_scheduler": schedule, "hr_prompt": prompt, "hr_negative_prompt": negative,
            "hr_checkpoint_name": checkpoint}



def sampler_parameters_section(kind: str) -> dict[str, Any]:
    """A1111's sampler options (its Settings > Sampler parameters; here per run, so one user's choice is not
    another's): those that leave the negative prompt out of some steps, the extra noise, and img2img's noise
    multiplier."""
    widgets = {}
    with gr.Accordion("Sampler parameters", open=False, elem_id=f"{kind}_sampler_parameters"):
        with gr.Row():
            widgets["skip_early_cond"] = gr.Slider(
                0, 1, value=0, step=0.01, label="Ignore negative prompt during early sampling",
                info="the part of the steps, from the start, run without the negative prompt (0: none); can make "
                     "pictures more varied", elem_id=f"{kind}_skip_early_cond")
            widgets["s_min_uncond"] = gr.Slider(
                0, MAX_NGMS, value=0, step=0.05, label="Negative Guidance minimum sigma",
                info="below this noise level every other step leaves the negative prompt out: faster (0: off)",
                elem_id=f"{kind}_s_min_uncond")
        widgets["s_min_uncond_all"] = gr.Checkbox(False, label="Negative Guidance minimum sigma all steps",
                                                  info="every step below that sigma, not every other one",
                                                  elem_id=f"{kind}_s_min_uncond_all")
        if kind == "txt2img":  # A1111 applies it to txt2img's start noise alone
            widgets["sgm_noise_multiplier"] = gr.Checkbox(
                False, label="SGM noise multiplier", elem_id="txt2img_sgm_noise_multiplier",
                info="a k-diffusion sampler starts from noise of sqrt(1 + sigma²), as SGM's own code, not sigma")
        widgets["img2img_extra_noise"] = gr.Slider(
            0, 1, value=0, step=0.01, label="Extra noise multiplier for img2img and hires fix",
            info="that much more of the start noise, where a pass starts from a picture (0: none)",
            elem_id=f"{kind}_img2img_extra_noise")
        if kind == "img2img":
            widgets["initial_noise_multiplier"] = gr.Slider(
                0, 1.5, value=1, step=0.01, label="Noise multiplier for img2img",
                info="the noise the picture is noised with, times this (1: as is)",
                elem_id="img2img_initial_noise_multiplier")
        widgets |= step_options_widgets(kind)
        with gr.Row():
            widgets["beta_dist_alpha"] = gr.Slider(
                0.01, 1, value=BETA_ALPHA, step=0.01, label="Beta schedule alpha",
                info="Beta schedule type: lower puts more steps at low noise", elem_id=f"{kind}_beta_dist_alpha")
            widgets["beta_dist_beta"] = gr.Slider(
                0.01, 1, value=BETA_BETA, step=0.01, label="Beta schedule beta",
                info="Beta schedule type: lower puts more steps at high noise", elem_id=f"{kind}_beta_dist_beta")
        # A1111's sigma min, sigma max and rho: typed, as A1111's boxes (0: the model's own). The typed boxes here
        # take any number: the request says what is out of range under the field's label, where Gradio's own check
        # names no field
        with gr.Row():
            widgets["sigma_min"] = gr.Number(0, label="Schedule min sigma",
                                             info="Karras, (Poly)exponential, KL Optimal, Beta end here (0: the "
                                                  "model's)",
                                             elem_id=f"{kind}_sigma_min")
            widgets["sigma_max"] = gr.Number(0, label="Schedule max sigma",
                                             info="and start here (0: the model's)", elem_id=f"{kind}_sigma_max")
            widgets["rho"] = gr.Number(0, label="Schedule rho",
                                       info="Karras (0: 7), Polyexponential (0: 1): higher falls faster at first",
                                       elem_id=f"{kind}_rho")
        with gr.Row():
            widgets["always_discard_next_to_last_sigma"] = gr.Checkbox(
                False, label="Always discard next-to-last sigma", elem_id=f"{kind}_always_discard_next_to_last_sigma",
                info="k-diffusion samplers run one step more and leave out the smallest noise level before the end "
                     "(DPM2, DPM2 a and DPM++ 3M SDE always do); DDIM and PLMS lay out one step more")
            widgets["sd_noise_schedule"] = gr.Radio(
                list(NOISE_SCHEDULES), value=NOISE_SCHEDULES[0], label="Noise schedule for sampling",
                elem_id=f"{kind}_sd_noise_schedule",
                info="Zero Terminal SNR: the first step starts from almost pure noise, for models trained so")
        with gr.Row():  # two of A1111's Compatibility options, for pictures its older versions made
            widgets["use_old_karras_scheduler_sigmas"] = gr.Checkbox(
                False, label="Use old karras scheduler sigmas (0.1 to 10)",
                elem_id=f"{kind}_use_old_karras_scheduler_sigmas",
                info="Karras, (Poly)exponential, KL Optimal and Beta run from 10 down to 0.1 unless Schedule min/max "
                     "sigma say (the picture's text then records them)")
            widgets["use_downcasted_alpha_bar"] = gr.Checkbox(
                False, label="Downcast model alphas_cumprod to fp16 before sampling",
                elem_id=f"{kind}_use_downcasted_alpha_bar",
                info="the noise levels rounded as A1111 before 1.8 kept them, for its old seeds")
        widgets |= unipc_widgets(kind)
    return widgets


def unipc_widgets(kind: str) -> dict[str, Any]:
    """A1111's UniPC settings, read by the UniPC sampler alone."""
    defaults = UniPCOptions()
    with gr.Row():
        return {"uni_pc_variant": gr.Radio(list(UNIPC_VARIANTS), value=defaults.variant, label="UniPC variant",
                                           elem_id=f"{kind}_uni_pc_variant"),
                "uni_pc_order": gr.Slider(1, MAX_UNIPC_ORDER, value=defaults.order, step=1, label="UniPC order",
                                          info="past the steps it runs as the steps", elem_id=f"{kind}_uni_pc_order"),
                "uni_pc_lower_order_final": gr.Checkbox(defaults.lower_order_final, label="UniPC lower order final",
                                                        elem_id=f"{kind}_uni_pc_lower_order_final")}


def step_options_widgets(kind: str) -> dict[str, Any]:
    """A1111's eta and sigma options, and its Eta noise seed delta (webui/engine/step_options.py)."""
    def slider(name: str, label: str, step: float, info: str) -> gr.Slider:
        return gr.Slider(0, STEP_LIMITS[name], value=STEP_DEFAULTS[name], step=step, label=label, info=info,
                         elem_id=f"{kind}_{name}")

    widgets = {}
    with gr.Row():
        widgets["eta_ddim"] = slider("eta_ddim", "Eta for DDIM", 0.01, "DDIM: fresh noise in each step (0: none)")
        widgets["eta_ancestral"] = slider("eta_ancestral", "Eta for ancestral samplers", 0.01,
                                          "Euler a, DPM2 a, DPM++ 2S a, SDE samplers: how much of each step is "
                                          "fresh noise (0: none)")
    with gr.Row():
        widgets["s_churn"] = slider("s_churn", "Sigma churn", 0.01, "Euler: noise added before each step (0: none)")
        widgets["s_noise"] = slider("s_noise", "Sigma noise", 0.001,
                                    "the noise of Euler's churn, DPM2 a, DPM++ 2S a and the SDE samplers, times this")
    with gr.Row():
        widgets["s_tmin"] = slider("s_tmin", "Sigma tmin", 0.01, "Euler: the churn from this noise level")
        widgets["s_tmax"] = slider("s_tmax", "Sigma tmax", 0.01, "Euler: the churn up to this noise level (0: all)")
    widgets["eta_noise_seed_delta"] = gr.Number(
        0, precision=0, label="Eta noise seed delta",
        info="the noise a sampler draws as it steps comes from seed + this (ENSD; 31337 reproduces many shared "
             "pictures; 0: off)", elem_id=f"{kind}_eta_noise_seed_delta")
    return widgets

def refiner_section(kind: str, model_names: list[str]) -> dict[str, gr.components.Component]:
    """A1111's "Refiner": another checkpoint does the rest of the denoising, from the switch point on."""
    with gr.Accordion("Refiner", open=False, elem_id=f"{kind}_refiner_section"):
        enable = gr.Checkbox(False, label="Refiner", elem_id=f"{kind}_enable_refiner")
        with gr.Row():
            checkpoint = gr.Dropdown([NO_REFINER, *model_names], value=NO_REFINER, label="Checkpoint",
                                     elem_id=f"{kind}_refiner_checkpoint", allow_custom_value=True)
            switch_at = gr.Slider(0.01, 1, value=0.8, step=0.01, label="Switch at",
                                  info="the part of the denoising done (by noise level) when the refiner takes over",
                                  elem_id=f"{kind}_refiner_switch_at")
    return {"refiner": enable, "refiner_checkpoint": checkpoint, "refiner_switch_at": switch_at}


def token_merging_section(kind: str) -> dict[str, gr.components.Component]:
    """A1111's Token merging, which it keeps in Settings > Optimizations: here on the tab, as every generation
    setting, so a pasted infotext sets it and a run carries it."""
    with gr.Accordion("Token merging", open=False, elem_id=f"{kind}_token_merging"):
        with gr.Row():
            widgets = {"token_merging_ratio": gr.Slider(
                0, MAX_MERGING_RATIO, value=0, step=0.1, label="Token merging ratio",
                elem_id=f"{kind}_token_merging_ratio",
                info="0: off; higher: faster at large sizes, and further from the picture made without it")}
            if kind == "txt2img":
                widgets["token_merging_ratio_hr"] = gr.Slider(
                    0, MAX_MERGING_RATIO, value=0, step=0.1, label="Token merging ratio for high-res pass",
                    info="the hires fix's second pass; 0: as Token merging ratio",
                    elem_id="txt2img_token_merging_ratio_hr")
    return widgets


def build_generation_tab(services: Services, picker: ModelPicker, models: ModelActions,
                         kind: str = "txt2img") -> GenerationTab:
    """The txt2img or img2img tab (kind), inside the gr.Tab it is called in. The model picker's own event is
    wired in blocks.py, which knows the sliders of every tab."""
    actions = GenerationActions(services, models, kind)
    img2img = kind == "img2img"
    size = models.native_size()
    session = gr.State(Session())
    with gr.Row(elem_id=f"{kind}_toprow"):
        with gr.Column(scale=6):
            # Each counter floats over its box's top-right corner (webui.css), as in stable-diffusion-webui.
            with gr.Column(elem_classes="dw-prompt"):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{kind}_prompt",
                                    placeholder="Prompt (press Ctrl+Enter to generate)")
                prompt_tokens = gr.HTML(token_counter(0), label="Tokens", show_label=False,
                                        elem_id=f"{kind}_prompt_tokens", padding=False,
                                        container=False)
            with gr.Column(elem_classes="dw-prompt"):
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{kind}_neg_prompt",
                                      placeholder="Negative prompt (press Ctrl+Enter to generate)")
                negative_tokens = gr.HTML(token_counter(0), label="Negative tokens", show_label=False,
                                          elem_id=f"{kind}_neg_prompt_tokens", padding=False, container=False)
        with gr.Column(scale=1, min_width=180):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{kind}_generate", size="lg")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id=f"{kind}_interrupt", min_width=60, size="md")
                skip = gr.Button("Skip", elem_id=f"{kind}_skip", min_width=60, size="md")
                # A1111's ↙: the parameters pasted into the prompt box (or, with the box empty, the last
                # picture's) set the tab's fields (blocks.py).
                paste = gr.Button("↙", elem_id=f"{kind}_paste", min_width=40, scale=0, size="md")
            # A1111's styles: joined into the prompts at Generate, or moved into them to edit.
            styles = gr.Dropdown(actions.style_names(), value=[], multiselect=True, label="Styles",
                                 elem_id=f"{kind}_styles")
            apply_styles = gr.Button("Apply styles to prompts", elem_id=f"{kind}_style_apply", size="sm")
            # A1111's: a prompt describing the picture to start from, by a captioning and a CLIP model.
            interrogate = gr.Button("Interrogate CLIP", elem_id="img2img_interrogate", size="sm") if img2img else None
    img2img_widgets = {}
    with gr.Row():
        with gr.Column(scale=1):
            if img2img:  # as A1111: the picture first, then how it is fitted to Width x Height
                img2img_widgets, picture_tabs = picture_inputs(actions.reads_server_folders)
                img2img_widgets["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], type="index",
                                                          label="Resize mode", elem_id="img2img_resize_mode")
                img2img_widgets |= inpainting_settings(img2img_widgets["img2img_mode"])
            with gr.Row():
                sampler = gr.Dropdown(sampler_names(), value=DEFAULT_SAMPLER, label="Sampling method",
                                      elem_id=f"{kind}_sampler")
                # allow_custom_value: Gradio checks a value against the choices it last knew of, and a sampler
                # pick racing its own list update failed that check with a raw error pop-up. What Generate
                # gets is checked anyway, with a message that says what to fix.
                scheduler = gr.Dropdown(schedules_of(DEFAULT_SAMPLER), value="Automatic", label="Schedule type",
                                        elem_id=f"{kind}_scheduler", allow_custom_value=True)
            steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{kind}_steps")
            # img2img's size is A1111's "Resize to": the model's size (what it draws best), or with "From image"
            # (A1111's 📐) the picture's; or its "Resize by": the picture's times a scale.
            if img2img:
                with gr.Tabs(elem_id="img2img_size_tabs"):
                    with gr.Tab(RESIZE_TO, id="resize_to", elem_id="img2img_resize_to") as resize_to_tab:
                        width, height, picture_size = _size_row(kind, size)
                    with gr.Tab(RESIZE_BY, id="resize_by", elem_id="img2img_resize_by") as resize_by_tab:
                        img2img_widgets["scale_by"] = gr.Slider(0.05, 4, value=1, step=0.05, label="Scale",
                                                                info="the picture's size times this",
                                                                elem_id="img2img_scale_by")
                img2img_widgets["size_tab"] = gr.Textbox(RESIZE_TO, visible=False, elem_id="img2img_size_mode")
                for tab, name in ((resize_to_tab, RESIZE_TO), (resize_by_tab, RESIZE_BY)):
                    tab.select(lambda name=name: name, outputs=[img2img_widgets["size_tab"]],
                               api_visibility="private", show_progress="hidden")
            else:
                width, height, _ = _size_row(kind, size)
            with gr.Row():
                batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{kind}_batch_count")
                batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{kind}_batch_size")
            with gr.Row():
                cfg_scale = gr.Slider(1, 30, value=7, step=0.5, label="CFG scale", elem_id=f"{kind}_cfg_scale")
                clip_skip = gr.Slider(1, MAX_CLIP_SKIP, value=1, step=1, label="Clip skip",
                                      info="1: the text encoder's last layer; 2: the one before, ... (at most as many "
                                           "as the model has)", elem_id=f"{kind}_clip_skip")
                tiling = gr.Checkbox(False, label="Tiling", info="a picture that tiles seamlessly",
                                     elem_id=f"{kind}_tiling")
                restore_faces = gr.Checkbox(False, label="Restore faces", info="faces drawn again by the Settings "
                                            "tab's face restorer", elem_id=f"{kind}_restore_faces")
            if img2img:
                img2img_widgets["denoising_strength"] = gr.Slider(
                    0, 1, value=GenerationRequest.model_fields["denoising_strength"].default, step=0.01,
                    label="Denoising strength", elem_id="img2img_denoising_strength")
                img2img_widgets["image_cfg_scale"] = gr.Slider(
                    0, 3, value=GenerationRequest.model_fields["image_cfg_scale"].default, step=0.05,
                    label="Image CFG Scale", elem_id="img2img_image_cfg_scale",
                    info="instruct-pix2pix models: how closely the result keeps to the picture (others ignore it)")
                img2img_widgets["color_correction"] = gr.Checkbox(
                    False, label="Color correction", elem_id="img2img_color_correction",
                    info="the result's colours matched to the picture's, its lightness kept (A1111's setting)")
            else:
                hires_widgets = hires_fix_section(actions.upscaler_names(), models.names())
            refiner_widgets = refiner_section(kind, models.names())
            with gr.Row(elem_id=f"{kind}_seed_row"):
                seed = gr.Number(-1, precision=0, label="Seed (-1 = random)", elem_id=f"{kind}_seed", scale=4)
                random_seed = gr.Button("⚄", elem_id=f"{kind}_random_seed", scale=0, min_width=48)
                reuse_seed = gr.Button("♻", elem_id=f"{kind}_reuse_seed", scale=0, min_width=48)
            # A1111's "Extra" seed options: the same picture, changed a little (strength 0 leaves it alone).
            with gr.Accordion("Variation seed", open=False, elem_id=f"{kind}_variation"):
                with gr.Row():
                    subseed = gr.Number(-1, precision=0, label="Variation seed (-1 = random)",
                                        elem_id=f"{kind}_subseed", scale=4)
                    random_subseed = gr.Button("⚄", elem_id=f"{kind}_random_subseed", scale=0, min_width=48)
                    reuse_subseed = gr.Button("♻", elem_id=f"{kind}_reuse_subseed", scale=0, min_width=48)
                    subseed_strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                                 elem_id=f"{kind}_subseed_strength")
                # A1111's: the seed's noise drawn at this size, to keep a picture's composition at another size.
                with gr.Row():
                    seed_resize_w = gr.Slider(0, MAX_SIZE, value=0, step=8, label="Resize seed from width",
                                              info="0: off", elem_id=f"{kind}_seed_resize_from_w")
                    seed_resize_h = gr.Slider(0, MAX_SIZE, value=0, step=8, label="Resize seed from height",
                                              info="0: off", elem_id=f"{kind}_seed_resize_from_h")
                # A1111's Random number generator source, for this run: a pasted infotext's RNG lands here
                randn_source = gr.Radio([SETTINGS_SOURCE, *RANDN_SOURCES], value=SETTINGS_SOURCE,
                                        label="Random number generator source",
                                        info="NV: the noise an NVIDIA card draws, as A1111's default GPU source; "
                                             "Settings: the Settings tab's", elem_id=f"{kind}_randn_source")
            sampler_widgets = sampler_parameters_section(kind)
            merging_widgets = token_merging_section(kind)  # A1111's Settings > Optimizations
            # A1111's Lora cards in a short form: the tag goes into the prompt, where it can be edited.
            with gr.Accordion("LoRA", open=False, elem_id=f"{kind}_lora"):
                lora_name, lora_refresh = file_picker(actions.lora_names(), "LoRA", "the LoRA folder (models/Lora or "
                                                      "--lora-dir)", f"{kind}_lora")
                with gr.Row():
                    lora_weight = gr.Slider(-2, 2, value=1, step=0.05, label="Weight", elem_id=f"{kind}_lora_weight",
                                            scale=4)
                    lora_add = gr.Button("Add to prompt", elem_id=f"{kind}_lora_add", scale=1)
                lora_search, lora_cards = card_gallery(f"{kind}_lora")
                lora_metadata, lora_metadata_save = metadata_editor(f"{kind}_lora", actions.can_edit_shared)
            # A1111's Hypernetworks cards, as the LoRA ones: the tag goes into the prompt.
            with gr.Accordion("Hypernetworks", open=False, elem_id=f"{kind}_hypernet"):
                hypernet_name, hypernet_refresh = file_picker(
                    actions.hypernetwork_names(), "Hypernetwork", "the hypernetworks folder (models/hypernetworks or "
                    "--hypernetwork-dir)", f"{kind}_hypernet")
                with gr.Row():
                    hypernet_weight = gr.Slider(-2, 2, value=1, step=0.05, label="Weight",
                                                elem_id=f"{kind}_hypernet_weight", scale=4)
                    hypernet_add = gr.Button("Add to prompt", elem_id=f"{kind}_hypernet_add", scale=1)
                hypernet_search, hypernet_cards = card_gallery(f"{kind}_hypernet")
            # A1111's Textual Inversion cards: the embedding's name is the word that calls it.
            with gr.Accordion("Textual inversion", open=False, elem_id=f"{kind}_embeddings"):
                embedding_name, embedding_refresh = file_picker(
                    actions.embedding_names(), "Embedding", "the embeddings folder (models/embeddings or "
                    "--embeddings-dir)", f"{kind}_embedding")
                with gr.Row():
                    embedding_to_prompt = gr.Button("Add to prompt", elem_id=f"{kind}_embedding_prompt")
                    embedding_to_negative = gr.Button("Add to negative prompt", elem_id=f"{kind}_embedding_negative")
                embedding_search, embedding_cards = card_gallery(f"{kind}_embedding")
            with gr.Accordion("Save a style", open=False, elem_id=f"{kind}_style_editor",
                              visible=actions.can_edit_shared):
                with gr.Row():
                    style_name = gr.Textbox(label="Style name", elem_id=f"{kind}_style_name", scale=3)
                    save_style = gr.Button("Save prompts", elem_id=f"{kind}_style_save", scale=1, min_width=80)
                    delete_style = gr.Button("Delete", elem_id=f"{kind}_style_delete", scale=1, min_width=80,
                                             variant="stop")
            # A1111's: the Settings tab's options a paste recorded otherwise, for the page's runs only (blocks.py fills
            # it). Typed pairs are read as pasted ones, so the list takes them too.
            override = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, visible=False,
                                   label="Override settings", elem_id=f"{kind}_override_settings",
                                   info="from the pasted parameters, for these runs only; remove one to use the "
                                        "Settings tab's")
            # at the foot, as A1111's scripts
            controlnet_widgets = controlnet_section(kind, services.engine.controlnets)
            plot_widgets = plot_section(kind) | prompt_matrix_section(kind) | prompt_list_section(kind)
            if img2img:
                plot_widgets |= outpainting_section() | loopback_section() | sd_upscale_section(actions.upscaler_names())
        with gr.Column(scale=1):
            progress = gr.HTML("", label="Progress", show_label=False, elem_id=f"{kind}_progress", padding=False)
            preview = gr.Image(label="Live preview", visible=False, interactive=False, elem_id=f"{kind}_preview",
                               height=256, buttons=["fullscreen"])  # no Share: it fails off Spaces
            gallery = gr.Gallery(label="Output", elem_id=f"{kind}_gallery", columns=4, height=360,
                                 object_fit="contain", format="png", interactive=False,
                                 buttons=["download", "download_all", "fullscreen"])  # no Share: it fails off Spaces
            # As A1111's: img2img's own result goes back to its input for another pass.
            with gr.Row():
                send_to_img2img = gr.Button("Send to img2img", elem_id=f"{kind}_send_to_img2img", size="sm")
                send_to_inpaint = gr.Button("Send to inpaint", elem_id=f"{kind}_send_to_inpaint", size="sm")
                send_to_extras = gr.Button("Send to extras", elem_id=f"{kind}_send_to_extras", size="sm")
            infotext = gr.Textbox(label="Parameters", lines=3, interactive=False, elem_id=f"{kind}_infotext",
                                  buttons=["copy"])
            timing = gr.HTML("", label="Time taken", show_label=False, elem_id=f"{kind}_time", padding=False)

    tab_token = gr.Textbox(visible=False, elem_id=f"{kind}_tab_token")
    widgets = {"prompt": prompt, "negative_prompt": negative, "sampler_name": sampler, "scheduler": scheduler,
               "steps": steps, "cfg_scale": cfg_scale, "width": width, "height": height, "seed": seed,
               "n_iter": batch_count, "batch_size": batch_size, "clip_skip": clip_skip, "tiling": tiling,
               "restore_faces": restore_faces,
               "model": picker.dropdown, "sd_vae": picker.vae,
               "subseed": subseed, "subseed_strength": subseed_strength, "seed_resize_from_w": seed_resize_w,
               "seed_resize_from_h": seed_resize_h, "randn_source": randn_source, "styles": styles, **img2img_widgets, **refiner_widgets,
               **({} if img2img else hires_widgets), **plot_widgets, **controlnet_widgets, **sampler_widgets,
               **merging_widgets, "override_settings": override}
    # A parameter the tab has no widget for goes in at generate()'s default, in its place.
    request_inputs = [widgets[name] if name in widgets else gr.State(REQUEST_DEFAULTS[name]) for name in REQUEST_PARAMS]
    run_outputs = [session, gallery, progress, preview, infotext, timing]
    # While the tab's own job runs, Generate is greyed out (A1111 hides it): a click would be dropped anyway.
    button_state = dict(outputs=[generate], api_visibility="private", show_progress="hidden", queue=False)
    after_run = dict(fn=actions.show_selected, inputs=[session], outputs=[gallery], api_visibility="private",
                     show_progress="hidden")
    model_status = dict(fn=models.status_after_run, outputs=[picker.status], api_visibility="private", show_progress="hidden")

    def follow_run(trigger: Callable, fn: Callable, inputs: list, greyed: Callable = busy_button,
                   greyed_inputs: list | None = None, ungreyed: Callable = actions.generate_button, **api) -> Any:
        """On trigger: Generate greyed out (by `greyed`), fn's run followed to its end, then Generate back (by
        `ungreyed`) and the model's status, whether the run ended or failed: Gradio's page starts no .then() step
        after a failed event (an input Gradio itself refused before fn ran), which left Generate greyed for good."""
        run = trigger(greyed, inputs=greyed_inputs, **button_state).then(
            fn, inputs=inputs, outputs=run_outputs, show_progress="hidden", concurrency_limit=None, **api)
        for ended in (run.then, run.failure):
            ended(ungreyed, inputs=[session], **button_state).then(**after_run).then(**model_status)
        return run

    if img2img:
        # The page's Generate runs the open sub-tab's own event (pictures.SUBTAB_INPUTS says why); Gradio API
        # callers get one event with every sub-tab's inputs, on a button the page never shows.
        common = [name for name in REQUEST_PARAMS if name in widgets and name not in ALL_SUBTAB_INPUTS
                  and name != "img2img_mode"]
        tokens = on_open_subtab(generate.click, widgets["img2img_mode"])
        generate_events = [follow_run(tokens[subtab].change, actions.generate_on(subtab, [*common, *names]),
                                      [session, *(widgets[name] for name in (*common, *names))],
                                      api_visibility="private")
                           for subtab, names in SUBTAB_INPUTS.items()]
        api_generate = gr.Button("Generate", visible=False, elem_id="img2img_api_generate")
        api_generate.click(actions.generate, inputs=[session, *request_inputs], outputs=run_outputs, api_name=kind,
                           show_progress="hidden", concurrency_limit=None)
    else:
        generate_events = [follow_run(generate.click, actions.generate, [session, *request_inputs], api_name=kind)]
    # Greyed out only where there is a job to resume: a Generate clicked while the page loads is not lost.
    follow_run(tab_token.change, actions.resume, [session, tab_token], greyed=actions.resume_button,
               greyed_inputs=[session, tab_token], ungreyed=actions.resumed_button, api_visibility="private")
    interrupt.click(actions.interrupt, inputs=[session], outputs=[], **_api(kind, "interrupt"), show_progress="hidden")
    skip.click(actions.skip, inputs=[session], outputs=[], **_api(kind, "skip"), show_progress="hidden")
    picked = gallery.select(actions.select_image, inputs=[session], outputs=[session, infotext],
                            api_visibility="private", show_progress="hidden")
    picked.failure(actions.pick_failed, inputs=[session], outputs=[session, infotext], api_visibility="private",
                   show_progress="hidden")
    # .input: the user's pick. Send to txt2img gives the Schedule type its list itself, since a .change
    # event here would read the Schedule type as it was before the send.
    sampler.input(actions.schedules_for, inputs=[sampler, scheduler], outputs=[scheduler],
                   api_visibility="private", show_progress="hidden")
    # Gradio rounds a typed 12.7 to 13 for the run but leaves 12.7 in the box: show the seed that will be used.
    seed.blur(shown_seed, inputs=[seed], outputs=[seed], api_visibility="private", show_progress="hidden",
              queue=False)
    lora_refresh.click(actions.refresh_loras, outputs=[lora_name], **_api(kind, "refresh_loras"),
                       show_progress="hidden").then(actions.lora_cards, inputs=[lora_search], outputs=[lora_cards],
                                                    api_visibility="private", show_progress="hidden")
    lora_search.change(actions.lora_cards, inputs=[lora_search], outputs=[lora_cards], api_visibility="private",
                       show_progress="hidden", trigger_mode="always_last")
    lora_cards.select(actions.lora_card_picked, inputs=[prompt, negative, lora_weight, lora_search],
                      outputs=[prompt, negative, lora_name], api_visibility="private", show_progress="hidden")
    metadata_of = gr.State(None)  # the LoRA whose metadata the editor holds
    lora_name.change(actions.lora_metadata, inputs=[lora_name], outputs=[*lora_metadata.values(), metadata_of],
                     api_visibility="private", show_progress="hidden")
    lora_metadata_save.click(actions.save_lora_metadata, inputs=[metadata_of, *lora_metadata.values()], outputs=[],
                             api_visibility="private", show_progress="hidden")
    lora_add.click(actions.add_lora, inputs=[prompt, lora_name, lora_weight], outputs=[prompt],
                   **_api(kind, "add_lora"), show_progress="hidden")
    hypernet_refresh.click(actions.refresh_hypernetworks, outputs=[hypernet_name],
                           **_api(kind, "refresh_hypernetworks"), show_progress="hidden").then(
        actions.hypernetwork_cards, inputs=[hypernet_search], outputs=[hypernet_cards], api_visibility="private",
        show_progress="hidden")
    hypernet_search.change(actions.hypernetwork_cards, inputs=[hypernet_search], outputs=[hypernet_cards],
                           api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    hypernet_cards.select(actions.hypernetwork_card_picked, inputs=[prompt, hypernet_weight, hypernet_search],
                          outputs=[prompt, hypernet_name], api_visibility="private", show_progress="hidden")
    hypernet_add.click(actions.add_hypernetwork, inputs=[prompt, hypernet_name, hypernet_weight], outputs=[prompt],
                       **_api(kind, "add_hypernetwork"), show_progress="hidden")
    apply_styles.click(actions.apply_styles, inputs=[prompt, negative, styles], outputs=[prompt, negative, styles],
                       **_api(kind, "apply_styles"), show_progress="hidden")
    # Another page may have saved a style since this one was built (or the file was edited): read as the list opens.
    styles.focus(actions.styles_list, inputs=[styles], outputs=[styles], api_visibility="private",
                 show_progress="hidden")
    style_edits = [save_style.click(actions.save_style, inputs=[style_name, prompt, negative], outputs=[styles],
                                    **_api(kind, "save_style"), show_progress="hidden"),
                   delete_style.click(actions.delete_style, inputs=[style_name, styles], outputs=[styles],
                                      **_api(kind, "delete_style"), show_progress="hidden")]
    embedding_refresh.click(actions.refresh_embeddings, outputs=[embedding_name], **_api(kind, "refresh_embeddings"),
                            show_progress="hidden").then(actions.embedding_cards, inputs=[embedding_search],
                                                         outputs=[embedding_cards], api_visibility="private",
                                                         show_progress="hidden")
    embedding_search.change(actions.embedding_cards, inputs=[embedding_search], outputs=[embedding_cards],
                            api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    embedding_cards.select(actions.embedding_card_picked, inputs=[prompt, embedding_search],
                           outputs=[prompt, embedding_name], api_visibility="private", show_progress="hidden")
    embedding_to_prompt.click(actions.add_embedding, inputs=[prompt, embedding_name], outputs=[prompt],
                              **_api(kind, "add_embedding"), show_progress="hidden")
    embedding_to_negative.click(actions.add_embedding, inputs=[negative, embedding_name], outputs=[negative],
                                api_visibility="private", show_progress="hidden")
    random_seed.click(actions.random_seed, outputs=[seed], **_api(kind, "random_seed"), show_progress="hidden")
    reuse_seed.click(actions.reuse_seed, inputs=[session], outputs=[seed], **_api(kind, "reuse_seed"),
                     show_progress="hidden")
    random_subseed.click(actions.random_seed, outputs=[subseed], api_visibility="private", show_progress="hidden")
    reuse_subseed.click(actions.reuse_subseed, inputs=[session], outputs=[subseed], api_visibility="private",
                        show_progress="hidden")
    prompt.change(actions.count_tokens, inputs=[prompt, steps], outputs=[prompt_tokens], **_api(kind, "count_tokens"),
                  show_progress="hidden", trigger_mode="always_last")
    negative.change(actions.count_negative_tokens, inputs=[negative, steps], outputs=[negative_tokens],
                    api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    if img2img:
        for subtab, token in on_open_subtab(picture_size.click, widgets["img2img_mode"]).items():
            token.change(partial(actions.picture_size, subtab),
                         inputs=[widgets[name] for name in SUBTAB_INPUTS[subtab]], outputs=[width, height],
                         api_visibility="private", show_progress="hidden")
        for subtab, token in on_open_subtab(interrogate.click, widgets["img2img_mode"]).items():
            token.change(partial(actions.interrogate, subtab),
                         inputs=[widgets[name] for name in SUBTAB_INPUTS[subtab]], outputs=[prompt],
                         api_visibility="private", show_progress="minimal")
    return GenerationTab(kind, actions, session, widgets, generate_events, tab_token,
                         [styles, lora_name, embedding_name,
                          widgets["hr_upscaler" if kind == "txt2img" else "sd_upscale_upscaler"], lora_cards,
                          embedding_cards, hypernet_name, hypernet_cards], send_to_img2img, send_to_inpaint,
                         send_to_extras, paste, picture_tabs if img2img else None, style_edits)
