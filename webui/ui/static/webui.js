// Ctrl+Enter (Cmd+Enter on macOS) in either prompt box presses Generate, as in stable-diffusion-webui.
// Listening on the document survives Gradio re-rendering the textareas.
document.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
  const target = event.target;
  if (!target || !target.closest || !target.closest("#txt2img_prompt, #txt2img_neg_prompt")) return;
  event.preventDefault();
  const button = document.getElementById("txt2img_generate");
  if (button) button.click();
});
