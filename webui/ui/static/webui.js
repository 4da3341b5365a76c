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
