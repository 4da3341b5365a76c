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

// A1111's "Generate forever": right-click a tab's Generate for the menu. While it is on, Generate is pressed
// again each time the tab's run ends. Unlike A1111's, it also ends with the tab's Interrupt, and when a run ends
// with an error (a refused request would otherwise be sent again and again).
const foreverTabs = {};  // tab ("txt2img", "img2img") -> {pressedAt, started}

function closeForeverMenu() {
  const menu = document.getElementById("generate_forever_menu");
  if (menu) menu.remove();
}

function setForever(tab, on) {
  if (on) foreverTabs[tab] = {pressedAt: 0, started: true};
  else delete foreverTabs[tab];
  const button = document.getElementById(tab + "_generate");
  if (button) button.classList.toggle("dw-forever", on);
}

document.addEventListener("contextmenu", (event) => {
  const button = event.target && event.target.closest && event.target.closest("#txt2img_generate, #img2img_generate");
  if (!button) return;
  event.preventDefault();
  closeForeverMenu();
  const tab = button.id.split("_")[0];
  const menu = document.createElement("div");
  menu.id = "generate_forever_menu";
  menu.className = "dw-context-menu";
  menu.style.left = event.pageX + "px";
  menu.style.top = event.pageY + "px";
  const item = document.createElement("button");
  item.id = tab + "_generate_forever";
  item.textContent = foreverTabs[tab] ? "Cancel generate forever" : "Generate forever";
  item.addEventListener("click", () => { setForever(tab, !foreverTabs[tab]); closeForeverMenu(); });
  menu.appendChild(item);
  document.body.appendChild(menu);
});
document.addEventListener("click", (event) => {
  if (!(event.target && event.target.closest && event.target.closest("#generate_forever_menu"))) closeForeverMenu();
  const interrupt = event.target && event.target.closest && event.target.closest("#txt2img_interrupt, #img2img_interrupt");
  if (interrupt) setForever(interrupt.id.split("_")[0], false);
});

setInterval(() => {
  for (const tab of Object.keys(foreverTabs)) {
    const state = foreverTabs[tab];
    const button = document.getElementById(tab + "_generate");
    if (!button) continue;
    if (button.disabled) { state.started = true; continue; }  // the run goes on
    // Pressed, and not greyed out yet: the page has not begun the run (give it a few seconds).
    if (!state.started && Date.now() - state.pressedAt < 5000) continue;
    const error = document.querySelector("#" + tab + "_progress .dw-error");
    if (state.pressedAt && error) { setForever(tab, false); continue; }
    state.pressedAt = Date.now();
    state.started = false;
    button.click();
  }
}, 500);

// A1111's notifications: when a tab's run ends with pictures, notification.mp3 plays (where the server has one), and
// when the page is not in front the browser shows a notification too (the permission is asked at the first Generate).
const runningTabs = {};  // tab -> true while its Generate is greyed out

document.addEventListener("click", (event) => {
  const button = event.target && event.target.closest && event.target.closest("#txt2img_generate, #img2img_generate");
  if (button && "Notification" in window && Notification.permission === "default") Notification.requestPermission();
});

function notificationSound() {
  // The file the page's hidden #audio_notification holds, read from the page's config rather than from Gradio's
  // player, whose inner elements change between versions.
  const components = (window.gradio_config && window.gradio_config.components) || [];
  const holder = components.find((c) => c.props && c.props.elem_id === "audio_notification");
  const url = holder && holder.props.value && holder.props.value.url;
  return url ? new Audio(url) : null;
}

function notifyRunEnded(tab) {
  if (document.querySelector("#" + tab + "_progress .dw-error")) return;  // an error says so on the page
  const pictures = new Set(Array.from(document.querySelectorAll("#" + tab + "_gallery img"), (img) => img.src));
  if (!pictures.size) return;
  const sound = notificationSound();
  if (sound) sound.play().catch(() => {});  // a browser may refuse sound before the user has clicked the page
  if (document.hasFocus() || !("Notification" in window) || Notification.permission !== "granted") return;
  const first = pictures.values().next().value;
  // as A1111's, the grid shown first is no picture of its own (a plot that shows its grids alone counts those)
  const made = Array.from(pictures).filter((src) => !/-grids(\/|%2F)/i.test(src)).length || pictures.size;
  const notice = new Notification("diffusers-webui", {
    body: `${tab}: ${made} picture${made > 1 ? "s" : ""} made`, icon: first, image: first});
  notice.onclick = () => { window.focus(); notice.close(); };
}

setInterval(() => {
  for (const tab of ["txt2img", "img2img"]) {
    const button = document.getElementById(tab + "_generate");
    if (!button) continue;
    if (button.disabled) runningTabs[tab] = true;
    else if (runningTabs[tab]) {
      delete runningTabs[tab];
      setTimeout(() => notifyRunEnded(tab), 500);  // the gallery's last pictures land just after Generate is back
    }
  }
}, 250);
