// Ctrl+Enter (Cmd+Enter on macOS) in either prompt box presses its tab's Generate, as in stable-diffusion-webui.
// Listening on the document survives Gradio re-rendering the textareas.
document.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
  const target = event.target;
  const box = target && target.closest &&
    target.closest("#txt2img_prompt, #txt2img_neg_prompt, #img2img_prompt, #img2img_neg_prompt");
  if (!box) return;
  event.preventDefault();
  const button = document.getElementById(box.id.split("_")[0] + "_generate");  // txt2img_generate, img2img_generate
  if (button) button.click();
});

// Hover hints for the icon buttons (A1111 titles them too); set on the first hover, as Gradio renders buttons late.
const BUTTON_HINTS = {
  "_paste": "Read generation parameters from the prompt, or from the last picture if the prompt is empty",
  "_random_seed": "Set the seed to -1: a new random seed each time",
  "_reuse_seed": "Reuse the seed of the picture shown",
  "model_refresh": "Read the models and VAE folders again",
};
document.addEventListener("mouseover", (event) => {
  const button = event.target && event.target.closest && event.target.closest("button[id]");
  if (!button || button.title) return;
  const suffix = Object.keys(BUTTON_HINTS).find((end) => button.id.endsWith(end));
  if (suffix) button.title = BUTTON_HINTS[suffix];
});
