"""The Settings tab (A1111's, in short): the server-wide settings of storage/options.py, which
/sdapi/v1/options reads and changes too. They apply to everyone's later images, as in A1111."""
from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from webui.engine.hires import PICTURE_UPSCALERS
from webui.engine.preview import PREVIEW_METHODS
from webui.engine.prompts import EMPHASIS_MODES
from webui.schemas import FACE_RESTORERS, HIRES_REFINER_PASSES, RANDN_SOURCES, SAVE_SETTINGS, InvalidRequest
from webui.storage.filenames import (DEFAULT_FLAT_PATTERN, DEFAULT_FOLDER_PATTERN, DEFAULT_PATTERN,
                                     EMPTY_FOLDER_PATTERN, MAX_FOLDER_DEPTH, TAGS)
from webui.storage.options import (IMAGE_FORMATS, INFOTEXT_SWITCHES, OPTION_KEYS, OptionsStore, SavedOptions,
                                   SettingsFrozen)

# Each setting's label, by its key (A1111's words).
LABELS = {"samples_format": "File format for images", "grid_format": "File format for grids",
          "jpeg_quality": "Quality for saved jpg and webp images",
          "samples_filename_pattern": "Images filename pattern", "save_to_dirs": "Save images to a subdirectory",
          "grid_save_to_dirs": "Save grids to a subdirectory", "directories_filename_pattern": "Directory name pattern",
          "enable_pnginfo": "Write infotext to metadata of the generated image",
          "webp_lossless": "Use lossless compression for webp images",
          "add_model_hash_to_info": "Add model hash to infotext",
          "add_model_name_to_info": "Add model name to infotext",
          "add_vae_hash_to_info": "Add VAE hash to infotext", "add_vae_name_to_info": "Add VAE name to infotext",
          "add_version_to_infotext": "Add program version to infotext",
          "lora_add_hashes_to_infotext": "Add Lora hashes to infotext",
          "textual_inversion_add_hashes_to_infotext": "Add Textual Inversion hashes to infotext",
          "save_txt": "Create a text file next to every image with generation parameters",
          "enable_prompt_comments": "Enable comments", "emphasis": "Emphasis mode",
          "comma_padding_backtrack": "Prompt word wrap length limit",
          "face_restoration_model": "Face restoration model", "code_former_weight": "CodeFormer weight",
          "inpainting_mask_weight": "Inpainting conditioning mask strength", "sdxl_clip_l_skip": "Clip skip SDXL",
          "randn_source": "Random number generator source",
          "img2img_fix_steps": "With img2img, do exactly the amount of steps the slider specifies",
          "use_old_scheduling": "Use old prompt editing timelines",
          "refiner_switch_by_sample_steps": "Switch to refiner by sampling steps instead of model timesteps. Old "
                                            "behavior for refiner.",
          "overlay_inpaint": "Overlay original for inpaint", "upscaler_for_img2img": "Upscaler for img2img",
          "img2img_background_color": "With img2img, fill transparent parts of the input image with this color",
          "hires_fix_refiner_pass": "Hires fix: which pass to enable refiner for",
          "save_images_before_highres_fix": "Save a copy of image before applying highres fix",
          "save_images_before_face_restoration": "Save a copy of image before doing face restoration",
          "save_images_before_color_correction": "Save a copy of image before applying color correction to img2img "
                                                 "results",
          "save_mask": "For inpainting, save a copy of the greyscale mask",
          "save_mask_composite": "For inpainting, save a masked composite",
          "save_init_img": "Save init images when using img2img", "save_incomplete_images": "Save incomplete images",
          "live_previews_enable": "Show live previews of the created image",
          "show_progress_every_n_steps": "Live preview display period", "show_progress_type": "Live preview method",
          "n_rows": "Grid row count; use -1 for autodetect and 0 for it to be same as batch size",
          "grid_prevent_empty_spots": "Prevent empty spots in grid (when set to autodetect)",
          "return_grid": "Show grid in gallery", "export_for_4chan": "Save copy of large images as JPG",
          "img_downscale_threshold": "File size limit for the above option, MB",
          "target_side_length": "Width/height limit for the above option, in pixels"}


class SettingsActions:
    def __init__(self, options: OptionsStore, locked_because: str | None = None):
        self.options = options
        self.locked_because = locked_because  # why the page may not change them, if it may not

    def shown(self) -> list:
        """The values as they are now (another user or an API client may have changed them)."""
        current = self.options.current()
        return [getattr(current, key) for key in OPTION_KEYS]

    def shown_to_page(self) -> list:
        """shown(), and the same values kept as what the page shows (for apply_edits)."""
        values = self.shown()
        return [*values, values]

    def apply_edits(self, on_page: list | None, *values) -> list:
        """Apply settings from a page: only what the user changed there since it showed the values `on_page`; the
        others keep what is saved now (another page or an API client may have saved them meanwhile, and an old
        page's values would undo that). Then as apply(), with what the page now shows."""
        if on_page is not None and len(on_page) == len(values):
            current = self.options.current()
            values = tuple(value if value != was else getattr(current, key)
                           for key, value, was in zip(OPTION_KEYS, values, on_page))
        *shown, message = self.apply(*values)
        return [*shown, shown, message]

    def apply(self, *values) -> list:
        """Save the values; the widgets then show what is saved, and a line says what changed or why nothing did."""
        if self.locked_because:  # a page built before, or by hand
            return [*self.shown(), _message(f"Not saved: {self.locked_because}")]
        before = self.options.current()
        try:
            after = self.options.update(dict(zip(OPTION_KEYS, values, strict=True)))
        except InvalidRequest as err:
            return [*self.shown(), _message(f"Not saved: {_with_labels(str(err))}")]
        except (OSError, SettingsFrozen) as err:
            return [*self.shown(), _message(f"Not saved: {err}")]
        return [*self.shown(), _message(_changes(before, after))]


def _changes(before: SavedOptions, after: SavedOptions) -> str:
    changed = [f"{LABELS[key]}: {getattr(after, key)}" for key in OPTION_KEYS
               if getattr(before, key) != getattr(after, key)]
    return "Saved. " + "; ".join(changed) if changed else "Nothing to save: the settings were already these."


def _with_labels(message: str) -> str:
    for key, label in LABELS.items():
        message = message.replace(f"{key}: ", f"{label}: ")
    return message


def _message(text: str) -> str:
    return f'<p class="settings-result">{html.escape(text)}</p>'


@dataclass
class SettingsTab:
    widgets: dict[str, gr.components.Component]
    apply: gr.Button
    result: gr.HTML
    actions: SettingsActions
    on_page: gr.State  # the values the page was last shown

    @property
    def inputs(self) -> list[gr.components.Component]:
        """The widgets in OPTION_KEYS order."""
        return [self.widgets[key] for key in OPTION_KEYS]


def locked_because(options: OptionsStore, open_to_anyone: bool) -> str | None:
    if options.frozen:
        return "the settings cannot be changed on this server (started with --freeze-settings)"
    if open_to_anyone:
        return ("this page is served to other machines without a login, and the settings are everyone's; start "
                "the server with --gradio-auth to change them here")
    return None


def _checkboxes(keys, current: SavedOptions, editable: bool) -> dict[str, gr.Checkbox]:
    """A plain checkbox, labelled as A1111 labels it, for each of these on/off settings."""
    return {key: gr.Checkbox(getattr(current, key), label=LABELS[key], elem_id=f"settings_{key}", interactive=editable)
            for key in keys}


def build_settings(options: OptionsStore, open_to_anyone: bool = False,
                   upscalers: list[str] | tuple[str, ...] = PICTURE_UPSCALERS) -> SettingsTab:
    """The tab; read-only under --freeze-settings, or where anyone who finds the page could change everyone's
    settings (as History's Delete). `upscalers`: the picture upscalers img2img may enlarge with."""
    locked = locked_because(options, open_to_anyone)
    actions = SettingsActions(options, locked)
    current = options.current()
    editable = locked is None
    gr.Markdown(f"Shown, not changeable: {locked}." if locked else
                "These apply to every user's images from now on, and are kept in the settings file.")
    widgets = {
        "samples_format": gr.Dropdown(list(IMAGE_FORMATS), value=current.samples_format, label=LABELS["samples_format"],
                                      info="jpg and webp keep the parameters in EXIF, as A1111's",
                                      elem_id="settings_samples_format", interactive=editable),
        "grid_format": gr.Dropdown(list(IMAGE_FORMATS), value=current.grid_format, label=LABELS["grid_format"],
                                   elem_id="settings_grid_format", interactive=editable),
        "n_rows": gr.Slider(-1, 16, value=current.n_rows, step=1, label=LABELS["n_rows"],
                            info="the grid of a run of several pictures, filled row by row; 0: as many rows as "
                                 "the batch size",
                            elem_id="settings_n_rows", interactive=editable),
        **_checkboxes(("grid_prevent_empty_spots", "return_grid"), current, editable),
        "export_for_4chan": gr.Checkbox(
            current.export_for_4chan, label=LABELS["export_for_4chan"],
            info="beside a saved png or webp picture or grid above either limit, a jpg of the same name, shrunk to the "
                 "width/height limit", elem_id="settings_export_for_4chan", interactive=editable),
        "img_downscale_threshold": gr.Number(current.img_downscale_threshold, minimum=0, maximum=1000,
                                             label=LABELS["img_downscale_threshold"],
                                             elem_id="settings_img_downscale_threshold", interactive=editable),
        "target_side_length": gr.Number(current.target_side_length, minimum=64, maximum=65_535, precision=0,
                                        label=LABELS["target_side_length"], elem_id="settings_target_side_length",
                                        interactive=editable),
        "jpeg_quality": gr.Slider(1, 100, value=current.jpeg_quality, step=1, label=LABELS["jpeg_quality"],
                                  elem_id="settings_jpeg_quality", interactive=editable),
        "samples_filename_pattern": gr.Textbox(
            current.samples_filename_pattern, label=LABELS["samples_filename_pattern"], placeholder=DEFAULT_PATTERN,
            info=f"after the file's number; empty: {DEFAULT_PATTERN} ({DEFAULT_FLAT_PATTERN} without subfolders). Tags: {', '.join(f'[{tag}]' for tag in TAGS)}; "
                 "[datetime<%Y-%m-%d><Europe/Paris>] takes a format and a time zone",
            elem_id="settings_samples_filename_pattern", interactive=editable),
        "save_to_dirs": gr.Checkbox(current.save_to_dirs, label=LABELS["save_to_dirs"],
                                    elem_id="settings_save_to_dirs", interactive=editable),
        "grid_save_to_dirs": gr.Checkbox(current.grid_save_to_dirs, label=LABELS["grid_save_to_dirs"],
                                         elem_id="settings_grid_save_to_dirs", interactive=editable),
        "directories_filename_pattern": gr.Textbox(
            current.directories_filename_pattern, label=LABELS["directories_filename_pattern"],
            placeholder=DEFAULT_FOLDER_PATTERN, info=f"the subfolders, in the same tags; / nests them (up to "
                                                     f"{MAX_FOLDER_DEPTH}), as [model_name]/[date]; empty: "
                                                     f"{EMPTY_FOLDER_PATTERN}, as in A1111",
            elem_id="settings_directories_filename_pattern", interactive=editable),
        "enable_pnginfo": gr.Checkbox(
            current.enable_pnginfo, label=LABELS["enable_pnginfo"],
            info="the parameters in each saved picture (PNG text, jpg/webp EXIF) and in those the API returns, so "
                 "PNG Info and other tools read them; off, the files hold none", elem_id="settings_enable_pnginfo",
            interactive=editable),
        "webp_lossless": gr.Checkbox(current.webp_lossless, label=LABELS["webp_lossless"],
                                     info="the quality above then sets how hard it compresses",
                                     elem_id="settings_webp_lossless", interactive=editable),
        **_checkboxes(INFOTEXT_SWITCHES, current, editable),
        "save_txt": gr.Checkbox(current.save_txt, label=LABELS["save_txt"], elem_id="settings_save_txt",
                                interactive=editable),
        "enable_prompt_comments": gr.Checkbox(
            current.enable_prompt_comments, label=LABELS["enable_prompt_comments"],
            info="a # anywhere in a prompt hides the rest of its line from the generation",
            elem_id="settings_enable_prompt_comments", interactive=editable),
        "comma_padding_backtrack": gr.Slider(
            0, 74, value=current.comma_padding_backtrack, step=1, label=LABELS["comma_padding_backtrack"],
            info="in tokens: a 75-token chunk that fills up at most this far past its last comma ends at that comma, "
                 "so a tag is not cut in two (0: never)", elem_id="settings_comma_padding_backtrack",
            interactive=editable),
        "emphasis": gr.Dropdown(
            list(EMPHASIS_MODES), value=current.emphasis, label=LABELS["emphasis"],
            info="how (word:1.2) is read: Original weighs, then keeps each chunk's mean; No norm weighs alone; "
                 "Ignore reads the brackets, weighs nothing; None reads brackets as text",
            elem_id="settings_emphasis", interactive=editable),
        "randn_source": gr.Radio(
            list(RANDN_SOURCES), value=current.randn_source, label=LABELS["randn_source"],
            info="CPU: torch's CPU generator; NV: the noise an NVIDIA card draws (A1111's default GPU source), on any "
                 "device, so A1111's seeds make their pictures here", elem_id="settings_randn_source",
            interactive=editable),
        "face_restoration_model": gr.Radio(
            list(FACE_RESTORERS), value=current.face_restoration_model, label=LABELS["face_restoration_model"],
            info="what Restore faces draws the faces again with", elem_id="settings_face_restoration_model",
            interactive=editable),
        "code_former_weight": gr.Slider(
            0, 1, value=current.code_former_weight, step=0.01, label=LABELS["code_former_weight"],
            info="0 changes a face most, 1 least", elem_id="settings_code_former_weight", interactive=editable),
        "inpainting_mask_weight": gr.Slider(
            0, 1, value=current.inpainting_mask_weight, step=0.01, label=LABELS["inpainting_mask_weight"],
            info="models made for inpainting: 1 greys out all they draw again, lower keeps more of the start picture",
            elem_id="settings_inpainting_mask_weight", interactive=editable),
        "sdxl_clip_l_skip": gr.Checkbox(
            current.sdxl_clip_l_skip, label=LABELS["sdxl_clip_l_skip"],
            info="SDXL models read Clip skip in their first text encoder (CLIP-L); off, they ignore it",
            elem_id="settings_sdxl_clip_l_skip", interactive=editable),
        "hires_fix_refiner_pass": gr.Radio(
            list(HIRES_REFINER_PASSES), value=current.hires_fix_refiner_pass, label=LABELS["hires_fix_refiner_pass"],
            info="with the hires fix, the pass a refiner takes over in at its switch; after the first pass's switch "
                 "the second runs on the refiner whole", elem_id="settings_hires_fix_refiner_pass",
            interactive=editable),
        "refiner_switch_by_sample_steps": gr.Checkbox(
            current.refiner_switch_by_sample_steps, label=LABELS["refiner_switch_by_sample_steps"],
            info="the refiner takes over after Switch at's share of the pass's model calls (A1111 before 1.8), not "
                 "where the noise has come down that far", elem_id="settings_refiner_switch_by_sample_steps",
            interactive=editable),
        "use_old_scheduling": gr.Checkbox(
            current.use_old_scheduling, label=LABELS["use_old_scheduling"],
            info="for [red:green:N]; old: N below 1 is a fraction of the steps, any other a step number (and the "
                 "hires fix counts on the first pass's steps); now: N with a decimal point is a fraction",
            elem_id="settings_use_old_scheduling", interactive=editable),
        "img2img_fix_steps": gr.Checkbox(
            current.img2img_fix_steps, label=LABELS["img2img_fix_steps"],
            info="off: steps x denoising strength of them run, as A1111 by default", elem_id="settings_img2img_fix_steps",
            interactive=editable),
        "upscaler_for_img2img": gr.Dropdown(
            list(upscalers), value=current.upscaler_for_img2img, label=LABELS["upscaler_for_img2img"],
            info="enlarges the start picture (inpainting's Only masked part too) where img2img runs larger; None: "
                 "Lanczos resampling alone", allow_custom_value=True, elem_id="settings_upscaler_for_img2img",
            interactive=editable),
        "img2img_background_color": gr.ColorPicker(current.img2img_background_color,
                                                   label=LABELS["img2img_background_color"],
                                                   elem_id="settings_img2img_background_color", interactive=editable),
        "overlay_inpaint": gr.Checkbox(
            current.overlay_inpaint, label=LABELS["overlay_inpaint"],
            info="inpainting lays its result into the picture through the mask; off, the part drawn shows as the "
                 "model drew it (Only masked: its whole rectangle)", elem_id="settings_overlay_inpaint",
            interactive=editable),
        **_checkboxes(SAVE_SETTINGS, current, editable),
        "live_previews_enable": gr.Checkbox(current.live_previews_enable, label=LABELS["live_previews_enable"],
                                            elem_id="settings_live_previews_enable", interactive=editable),
        "show_progress_every_n_steps": gr.Slider(
            -1, 32, value=current.show_progress_every_n_steps, step=1, label=LABELS["show_progress_every_n_steps"],
            info="a new preview every N denoising steps; 0 or -1 (only after each batch, which the gallery shows "
                 "anyway): none. Applies to runs under way too", elem_id="settings_show_progress_every_n_steps",
            interactive=editable),
        "show_progress_type": gr.Radio(
            list(PREVIEW_METHODS), value=current.show_progress_type, label=LABELS["show_progress_type"],
            info="Approx cheap: free, rough colours; Full: the model's VAE, exact, a decode each time; TAESD: a tiny "
                 "decoder, near Full at little cost (fetched into models/VAE-taesd on first use)",
            elem_id="settings_show_progress_type", interactive=editable),
    }
    apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply", visible=editable)
    result = gr.HTML("", elem_id="settings_result")
    on_page = gr.State(None)  # the values the page was last shown: Apply saves only the user's edits of them
    tab = SettingsTab(widgets, apply, result, actions, on_page)
    apply.click(actions.apply_edits, [on_page, *tab.inputs], [*tab.inputs, on_page, result], api_visibility="private")
    return tab
