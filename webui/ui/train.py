"""The Train tab (A1111's): Create embedding makes an embedding from an initialization text; Create hypernetwork a
hypernetwork of a layer structure; Train trains either on a folder of pictures on the server, with the same fields
but the learning rate (webui/textual_inversion.py and webui/hypernetwork_training.py check them, the worker runs
it). The tab follows its own run: progress, loss, previews; its Interrupt stops that run only. A page reloaded in
the same browser tab finds its run again (by the tab's token, as the generation tabs find their jobs).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
from pydantic import ValidationError

from webui.engine.hypernetwork_training import DEFAULT_SIZES, MODULE_SIZES, OFFERED_ACTIVATIONS, WEIGHT_INITS
from webui.engine.loader import ModelLoadError
from webui.engine.textual_inversion import MAX_VECTORS
from webui.engine.training import CLIP_GRAD_MODES, LATENT_SAMPLING, TrainingPlan
from webui.hypernetwork_training import (
    NewHypernetwork, TrainHypernetwork, create_hypernetwork, plan_hypernetwork_training, trainable_hypernetworks,
)
from webui.schemas import MAX_SIZE, MIN_SIZE, InvalidRequest, describe_validation_errors
from webui.services import Services
from webui.textual_inversion import (
    NewEmbedding, TrainEmbedding, plan_training, queue_new_embedding, trainable_embeddings,
)
from webui.training import (
    DEFAULT_LOG_DIRECTORY, DEFAULT_TEMPLATE, FAILED, NO_SERVER_FOLDERS, QUEUED, TrainFields, TrainingRun,
    template_names,
)
from webui.ui.progress import bar_html, error_html, format_seconds, notice_html
from webui.worker import WorkerStopped

POLL_SECONDS = 0.5
CREATE_LOCKED = ("this page is served to other machines without a login, and Create writes into the models' "
                 "folders; start the server with --gradio-auth to create embeddings and hypernetworks here")
# The Train fields, in the order of the Train button's inputs (A1111's names).
TRAIN_FIELDS = ("embedding_name", "learn_rate", "clip_grad_mode", "clip_grad_value", "batch_size", "gradient_step",
                "data_root", "log_directory", "template_filename", "training_width", "training_height", "steps",
                "create_image_every", "save_embedding_every", "shuffle_tags", "tag_drop_out",
                "latent_sampling_method")
# Train Hypernetwork's: the same but for the hypernetwork, its learning rate and its copies.
HYPERNETWORK_FIELDS = tuple({"embedding_name": "hypernetwork_name", "save_embedding_every": "save_hypernetwork_every"
                             }.get(name, name) for name in TRAIN_FIELDS)
_WHOLE_NUMBERS = ("batch_size", "gradient_step", "training_width", "training_height", "steps", "create_image_every",
                  "save_embedding_every", "save_hypernetwork_every")


@dataclass
class TrainSession:
    """One page's state (gr.State): its browser tab's token, and the training run it started."""
    tab: str = ""
    run: TrainingRun | None = None

    @property
    def owner(self) -> str | None:
        return f"ui-tab:{self.tab}" if self.tab else None


class TrainActions:
    def __init__(self, services: Services):
        self.services = services
        self.runs: list[TrainingRun] = []  # the page's runs (finished ones pruned): a reloaded tab finds its own here

    @property
    def create_locked_because(self) -> str | None:
        return CREATE_LOCKED if self.services.settings.open_to_anyone else None

    def embedding_list(self, keep: str | None = None) -> dict:
        """The embeddings folder's .pt files, read again; the pick kept where it is still there."""
        return _choices(trainable_embeddings(self.services.settings.embeddings_folder), keep)

    def hypernetwork_list(self, keep: str | None = None) -> dict:
        """The hypernetworks folder's files, read again; the pick kept where it is still there."""
        return _choices(trainable_hypernetworks(self.services.settings.hypernetwork_folder), keep)

    def template_list(self, keep: str | None = None) -> dict:
        return _choices(template_names(self.services.settings.textual_inversion_templates_dir), keep)

    def create(self, name: str, init_text: str, vectors: float, overwrite: bool) -> tuple[str, dict]:
        """Make the embedding (on the worker: it reads the model's token table)."""
        def make() -> Path:
            new = NewEmbedding(name=name or "", init_text=init_text or "", num_vectors_per_token=int(vectors or 0),
                               overwrite_old=bool(overwrite))
            return queue_new_embedding(self.services.worker, new, self.services.settings.embeddings_folder).result()

        return self._create(make, "embeddings", lambda path: path.stem, self.embedding_list)

    def create_hypernetwork(self, name: str, sizes: list[str], layer_structure: str, activation: str,
                            weight_init: str, layer_norm: bool, use_dropout: bool, dropout_structure: str,
                            overwrite: bool) -> tuple[str, dict]:
        """Make the hypernetwork's file (at once: it needs no model)."""
        def make() -> Path:
            new = NewHypernetwork(name=name or "", enable_sizes=list(sizes or []),
                                  layer_structure=layer_structure or "", activation_func=activation,
                                  weight_init=weight_init, add_layer_norm=bool(layer_norm),
                                  use_dropout=bool(use_dropout), dropout_structure=dropout_structure or "",
                                  overwrite_old=bool(overwrite))
            return create_hypernetwork(new, self.services.settings.hypernetwork_folder, self.services.worker.training)

        return self._create(make, "hypernetworks", lambda path: f"<hypernet:{path.stem}>", self.hypernetwork_list)

    def _create(self, make: Callable[[], Path], folder: str, used_as: Callable[[Path], str],
                listing: Callable[[str], dict]) -> tuple[str, dict]:
        """A line saying where the file `make` wrote went (and how prompts name it), or what to change; and the
        Train list `listing` with it picked."""
        if self.create_locked_because:
            return error_html(f"Not created: {self.create_locked_because}"), gr.skip()
        try:
            path = make()
        except (InvalidRequest, WorkerStopped, ModelLoadError) as err:
            return error_html(f"Not created: {_labelled(str(err))}"), gr.skip()
        except OSError as err:
            return error_html(f"Not created: the file could not be written ({err}); check that the {folder} folder "
                              "is writable"), gr.skip()
        return notice_html(f"Created {path.name} in {path.parent}: prompts can use {used_as(path)} now, and Train "
                           "trains it."), listing(path.stem)

    def train(self, session: TrainSession, *values: Any) -> Iterator[tuple]:
        """Train Embedding: check the fields, queue the run, and follow it to its end: (session, progress, preview,
        result)."""
        yield from self._train(session, lambda: plan_training(_train_fields(TrainEmbedding, TRAIN_FIELDS, values),
                                                              self.services.settings), LABELS)

    def train_hypernetwork(self, session: TrainSession, *values: Any) -> Iterator[tuple]:
        """Train Hypernetwork, as train does for an embedding."""
        yield from self._train(session, lambda: plan_hypernetwork_training(
            _train_fields(TrainHypernetwork, HYPERNETWORK_FIELDS, values), self.services.settings), HYPERNETWORK_LABELS)

    def _train(self, session: TrainSession, plan_of: Callable[[], TrainingPlan], labels: dict) -> Iterator[tuple]:
        try:
            plan = plan_of()
        except InvalidRequest as err:
            yield session, "", gr.skip(), error_html(_labelled(str(err), labels))
            return
        run = TrainingRun(plan, origin="ui", owner=session.owner)
        try:
            future = self.services.worker.train(run)
        except WorkerStopped as err:
            yield session, "", gr.skip(), error_html(str(err))
            return
        session.run = run
        # Kept until it has finished, not until this page stops following it: a reloaded page follows it again.
        self.runs = [*(kept for kept in self.runs if not kept.finished), run]
        yield from self._follow(session, run, future.done)
        error = future.exception()
        # the progress line goes with the result: its last step and ETA would read as a run still going
        if error is not None and not run.finished:  # the server stopped before the run started
            yield session, "", gr.skip(), error_html(str(error))
        else:
            yield session, "", gr.skip(), _result_html(run)

    def resume(self, session: TrainSession, tab: str | None) -> Iterator[tuple]:
        """A page (re)loaded in a browser tab whose training is still queued or running follows it again. On a server
        not open to anyone (this machine, or behind a login), a page opened anew follows the page's training that
        runs too, and its Interrupt stops it, as in A1111: a run whose page was closed would otherwise hold the queue
        until it ends."""
        session.tab = tab or ""
        unfinished = [run for run in list(self.runs) if not run.finished]
        run = next((run for run in unfinished if session.owner and run.owner == session.owner), None)
        if run is None and not self.services.settings.open_to_anyone:
            run = next(iter(unfinished), None)
        if run is None:
            yield session, gr.skip(), gr.skip(), gr.skip()
            return
        session.run = run
        yield from self._follow(session, run, lambda: run.finished)
        yield session, "", gr.skip(), _result_html(run)

    def interrupt(self, session: TrainSession) -> None:
        """Stop this page's run: at once if it waits in the queue, after the step under way if it trains (what it
        trains is saved as it then is)."""
        if session.run is not None:
            session.run.stop()

    def _follow(self, session: TrainSession, run: TrainingRun, ended) -> Iterator[tuple]:
        """(session, progress, preview, result) as the run goes, until `ended()` or the run has finished."""
        shown_text, shown_preview = self._progress(run), 0
        yield session, shown_text, gr.update(value=None, visible=False), ""
        while not (ended() or run.finished):
            time.sleep(POLL_SECONDS)
            text, new_preview = self._progress(run), run.preview_step != shown_preview
            if text != shown_text or new_preview:
                shown_text, shown_preview = text, run.preview_step
                preview = gr.update(value=run.preview_image, visible=True) if new_preview else gr.skip()
                yield session, text, preview, ""
        yield session, self._progress(run), gr.skip(), ""

    def _progress(self, run: TrainingRun) -> str:
        waiting = self.services.worker.queue_length()
        behind = (f" · {waiting} job{'s wait' if waiting != 1 else ' waits'} until it ends" if waiting else "")
        status = run.status
        if run.state == QUEUED:
            activity = self.services.worker.activity
            return bar_html(0.0, f"Queued: waiting for the work before it{f' · {activity}' if activity else ''}")
        if status is None:
            return bar_html(0.0, f"{run.stage_text}{behind}")
        copy = f" · last copy {status.last_copy.name}" if status.last_copy else ""
        return bar_html(run.fraction, f"Step {status.step}/{status.last_step} · loss {status.loss:.4f} · "
                                      f"ETA {format_seconds(run.eta_seconds)}{copy}{behind}")


def _choices(names: list[str], keep: str | None) -> dict:
    return gr.update(choices=names, value=keep if keep in names else (names[0] if names else None))


def _result_html(run: TrainingRun) -> str:
    if run.state == FAILED:
        return error_html(f"Training failed: {_labelled(run.error or '')}")
    return notice_html(run.result())


def _train_fields(model: type[TrainFields], names: tuple[str, ...], values: tuple) -> TrainFields:
    """The Train fields as A1111's train_embedding or train_hypernetwork arguments; InvalidRequest naming the
    field."""
    data = dict(zip(names, values))
    for name in set(_WHOLE_NUMBERS) & set(data):
        if data[name] is None:
            raise InvalidRequest(f"{name}: give a number")
        data[name] = int(data[name])
    data = {name: ("" if value is None else value) for name, value in data.items()}
    try:
        return model(**data)
    except ValidationError as err:
        raise InvalidRequest(describe_validation_errors(err.errors())) from None


# The page's labels for the fields messages name (A1111's labels).
LABELS = {"name": "Name", "num_vectors_per_token": "Number of vectors per token", "embedding_name": "Embedding",
          "learn_rate": "Embedding Learning rate", "clip_grad_value": "Gradient Clipping value",
          "batch_size": "Batch size", "gradient_step": "Gradient accumulation steps", "data_root": "Dataset directory",
          "log_directory": "Log directory", "template_filename": "Prompt template", "training_width": "Width",
          "training_height": "Height", "steps": "Max steps", "create_image_every": "Save an image every N steps",
          "save_embedding_every": "Save a copy of embedding every N steps", "tag_drop_out": "Drop out tags",
          "hypernetwork_name": "Hypernetwork", "save_hypernetwork_every": "Save a copy of embedding every N steps",
          "enable_sizes": "Modules", "layer_structure": "Enter hypernetwork layer structure",
          "activation_func": "Select activation function of hypernetwork",
          "weight_init": "Select Layer weights initialization",
          "dropout_structure": "Enter hypernetwork Dropout structure"}


HYPERNETWORK_LABELS = LABELS | {"learn_rate": "Hypernetwork Learning rate"}


def _labelled(message: str, labels: dict = LABELS) -> str:
    """A message that starts with a field's name, with the page's label for it instead."""
    field, colon, rest = message.partition(": ")
    return f"{labels[field]}: {rest}" if colon and field in labels else message


@dataclass
class CreateHypernetworkTab:
    """Create hypernetwork's controls (A1111's, in its order)."""
    name: gr.Textbox
    sizes: gr.CheckboxGroup
    layer_structure: gr.Textbox
    activation: gr.Dropdown
    weight_init: gr.Dropdown
    layer_norm: gr.Checkbox
    use_dropout: gr.Checkbox
    dropout_structure: gr.Textbox
    overwrite: gr.Checkbox
    create: gr.Button
    result: gr.HTML

    @property
    def inputs(self) -> list:
        """TrainActions.create_hypernetwork's arguments, in its order."""
        return [self.name, self.sizes, self.layer_structure, self.activation, self.weight_init, self.layer_norm,
                self.use_dropout, self.dropout_structure, self.overwrite]


@dataclass
class TrainTab:
    name: gr.Textbox
    init_text: gr.Textbox
    vectors: gr.Slider
    overwrite: gr.Checkbox
    create: gr.Button
    create_result: gr.HTML
    new_hypernetwork: CreateHypernetworkTab
    embedding: gr.Dropdown
    embedding_refresh: gr.Button
    hypernetwork: gr.Dropdown
    hypernetwork_refresh: gr.Button
    template: gr.Dropdown
    template_refresh: gr.Button
    fields: dict[str, gr.components.Component]  # Train Embedding's fields, by A1111's names (TRAIN_FIELDS)
    hypernetwork_fields: dict[str, gr.components.Component]  # Train Hypernetwork's (HYPERNETWORK_FIELDS)
    train: gr.Button
    train_hypernetwork: gr.Button
    interrupt: gr.Button
    progress: gr.HTML
    preview: gr.Image
    result: gr.HTML
    session: gr.State
    tab_token: gr.Textbox  # filled from the browser tab's sessionStorage when the page loads (blocks.py)
    actions: TrainActions


def _create_hypernetwork_tab(locked: str | None) -> CreateHypernetworkTab:
    gr.Markdown(f"Shown, not usable: {locked}." if locked else
                "A new hypernetwork in the hypernetworks folder, which prompts use as <hypernet:name>; Train trains "
                "it.")
    name = gr.Textbox(label="Name", elem_id="train_new_hypernetwork_name")
    sizes = gr.CheckboxGroup([str(size) for size in MODULE_SIZES], value=[str(size) for size in DEFAULT_SIZES],
                             label="Modules", elem_id="train_new_hypernetwork_sizes",
                             info="the attention widths it gets networks for: 768, 320, 640, 1280 for SD 1.x")
    layer_structure = gr.Textbox("1, 2, 1", label="Enter hypernetwork layer structure",
                                 placeholder="1st and last digit must be 1. ex:'1, 2, 1'",
                                 elem_id="train_new_hypernetwork_layer_structure")
    activation = gr.Dropdown(list(OFFERED_ACTIVATIONS), value="linear",
                             label="Select activation function of hypernetwork. Recommended : Swish / Linear(none)",
                             elem_id="train_new_hypernetwork_activation_func")
    weight_init = gr.Dropdown(list(WEIGHT_INITS), value="Normal",
                              label="Select Layer weights initialization. Recommended: Kaiming for relu-like, Xavier "
                                    "for sigmoid-like, Normal otherwise",
                              elem_id="train_new_hypernetwork_initialization_option")
    layer_norm = gr.Checkbox(False, label="Add layer normalization", elem_id="train_new_hypernetwork_add_layer_norm")
    use_dropout = gr.Checkbox(False, label="Use dropout", elem_id="train_new_hypernetwork_use_dropout")
    dropout_structure = gr.Textbox("0, 0, 0", label="Enter hypernetwork Dropout structure (or empty). Recommended : "
                                                    "0~0.35 incrementing sequence: 0, 0.05, 0.15",
                                   placeholder="1st and last digit must be 0 and values should be between 0 and 1. "
                                               "ex:'0, 0.01, 0'", elem_id="train_new_hypernetwork_dropout_structure")
    overwrite = gr.Checkbox(False, label="Overwrite Old Hypernetwork", elem_id="train_overwrite_old_hypernetwork")
    create = gr.Button("Create hypernetwork", variant="primary", elem_id="train_create_hypernetwork",
                       interactive=locked is None)
    result = gr.HTML("", elem_id="train_create_hypernetwork_result")
    return CreateHypernetworkTab(name, sizes, layer_structure, activation, weight_init, layer_norm, use_dropout,
                                 dropout_structure, overwrite, create, result)


def build_train_tab(services: Services) -> TrainTab:
    actions = TrainActions(services)
    settings = services.settings
    embeddings = trainable_embeddings(settings.embeddings_folder)
    hypernetworks = trainable_hypernetworks(settings.hypernetwork_folder)
    templates = template_names(settings.textual_inversion_templates_dir)
    with gr.Tabs(elem_id="train_tabs"):
        with gr.Tab("Create embedding", id="create_embedding", elem_id="train_create_tab"):
            locked = actions.create_locked_because
            gr.Markdown(f"Shown, not usable: {locked}." if locked else
                        "A new embedding in the embeddings folder, which prompts use by its name; Train trains it.")
            name = gr.Textbox(label="Name", elem_id="train_new_embedding_name")
            init_text = gr.Textbox("*", label="Initialization text", elem_id="train_new_embedding_init_text",
                                   info="its tokens' vectors are where training starts (empty: zeros)")
            vectors = gr.Slider(1, MAX_VECTORS, value=1, step=1, label="Number of vectors per token",
                                elem_id="train_new_embedding_vectors")
            overwrite = gr.Checkbox(False, label="Overwrite Old Embedding", elem_id="train_new_embedding_overwrite")
            create = gr.Button("Create embedding", variant="primary", elem_id="train_create_embedding",
                               interactive=locked is None)
            create_result = gr.HTML("", elem_id="train_create_result")
        with gr.Tab("Create hypernetwork", id="create_hypernetwork", elem_id="train_create_hypernetwork_tab"):
            new_hypernetwork = _create_hypernetwork_tab(locked)
        with gr.Tab("Train", id="train", elem_id="train_train_tab"):
            reads = settings.reads_server_folders
            about = ("Train an embedding or a hypernetwork on a folder of pictures on this server, best of one size "
                     "and square. It "
                     "runs in the queue like a picture and may take hours: **pictures asked for meanwhile wait until "
                     "it ends**. Interrupt stops it and keeps what it has learned; copies and previews go to the log "
                     "directory (inside the outputs folder).")
            gr.Markdown(about if reads else f"Shown, not usable: {NO_SERVER_FOLDERS.split(': ', 1)[1]}.")
            with gr.Row():
                embedding = gr.Dropdown(embeddings, value=embeddings[0] if embeddings else None, label="Embedding",
                                        elem_id="train_embedding")
                embedding_refresh = gr.Button("↻", elem_id="train_embedding_refresh", scale=0, min_width=40)
                hypernetwork = gr.Dropdown(hypernetworks, value=hypernetworks[0] if hypernetworks else None,
                                           label="Hypernetwork", elem_id="train_hypernetwork")
                hypernetwork_refresh = gr.Button("↻", elem_id="train_hypernetwork_refresh", scale=0, min_width=40)
            with gr.Row():
                learn_rate = gr.Textbox("0.005", label="Embedding Learning rate", elem_id="train_learn_rate",
                                        info="or a schedule: 0.005:100, 1e-3:1000, 1e-5")
                hypernetwork_learn_rate = gr.Textbox("0.00001", label="Hypernetwork Learning rate",
                                                     elem_id="train_hypernetwork_learn_rate",
                                                     info="or a schedule: 1e-5:100, 1e-6:1000, 1e-7")
                clip_grad_mode = gr.Dropdown(list(CLIP_GRAD_MODES), value="disabled", label="Gradient Clipping",
                                             elem_id="train_clip_grad_mode")
                clip_grad_value = gr.Textbox("0.1", label="Gradient Clipping value", elem_id="train_clip_grad_value")
            with gr.Row():
                batch_size = gr.Number(1, label="Batch size", precision=0, minimum=1, elem_id="train_batch_size")
                gradient_step = gr.Number(1, label="Gradient accumulation steps", precision=0, minimum=1,
                                          elem_id="train_gradient_step")
            data_root = gr.Textbox(label="Dataset directory", placeholder="Path to directory with input images",
                                   elem_id="train_data_root", interactive=reads,
                                   info="a .txt file beside a picture gives its [filewords]; else its file name")
            log_directory = gr.Textbox(DEFAULT_LOG_DIRECTORY, label="Log directory", elem_id="train_log_directory",
                                       info="inside the outputs folder; the run writes to <it>/<date>/<embedding>")
            with gr.Row():
                template = gr.Dropdown(templates, value=DEFAULT_TEMPLATE if DEFAULT_TEMPLATE in templates else None,
                                       label="Prompt template", elem_id="train_template")
                template_refresh = gr.Button("↻", elem_id="train_template_refresh", scale=0, min_width=40)
            with gr.Row():
                width = gr.Slider(MIN_SIZE, MAX_SIZE, value=512, step=8, label="Width", elem_id="train_width")
                height = gr.Slider(MIN_SIZE, MAX_SIZE, value=512, step=8, label="Height", elem_id="train_height")
            steps = gr.Number(100000, label="Max steps", precision=0, minimum=1, elem_id="train_steps")
            with gr.Row():
                create_image_every = gr.Number(500, label="Save an image to log directory every N steps, 0 to disable",
                                               precision=0, minimum=0, elem_id="train_create_image_every")
                save_embedding_every = gr.Number(500, precision=0, minimum=0, elem_id="train_save_embedding_every",
                                                 label="Save a copy of embedding to log directory every N steps, 0 to "
                                                       "disable")
            with gr.Row():
                shuffle_tags = gr.Checkbox(False, label="Shuffle tags by ',' when creating prompts.",
                                           elem_id="train_shuffle_tags")
                tag_drop_out = gr.Slider(0.0, 1.0, value=0.0, step=0.1, label="Drop out tags when creating prompts.",
                                         elem_id="train_tag_drop_out")
            latent_sampling = gr.Radio(list(LATENT_SAMPLING), value="once", label="Choose latent sampling method",
                                       elem_id="train_latent_sampling_method")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id="train_interrupt")
                train = gr.Button("Train Embedding", variant="primary", elem_id="train_embedding_button",
                                  interactive=reads)
                train_hypernetwork = gr.Button("Train Hypernetwork", variant="primary",
                                               elem_id="train_hypernetwork_button", interactive=reads)
            progress = gr.HTML("", elem_id="train_progress", padding=False)
            preview = gr.Image(label="Preview", visible=False, interactive=False, elem_id="train_preview",
                               height=256)
            result = gr.HTML("", elem_id="train_result")
    session = gr.State(TrainSession())
    tab_token = gr.Textbox(visible=False, elem_id="train_tab_token")
    train_fields = dict(zip(TRAIN_FIELDS, (embedding, learn_rate, clip_grad_mode, clip_grad_value, batch_size,
                                           gradient_step, data_root, log_directory, template, width, height, steps,
                                           create_image_every, save_embedding_every, shuffle_tags, tag_drop_out,
                                           latent_sampling)))
    hypernetwork_fields = dict(zip(HYPERNETWORK_FIELDS, (hypernetwork, hypernetwork_learn_rate,
                                                         *list(train_fields.values())[2:])))
    private = dict(api_visibility="private", show_progress="hidden")
    create.click(actions.create, [name, init_text, vectors, overwrite], [create_result, embedding], **private)
    new_hypernetwork.create.click(actions.create_hypernetwork, new_hypernetwork.inputs,
                                  [new_hypernetwork.result, hypernetwork], **private)
    embedding_refresh.click(actions.embedding_list, [embedding], [embedding], **private)
    hypernetwork_refresh.click(actions.hypernetwork_list, [hypernetwork], [hypernetwork], **private)
    template_refresh.click(actions.template_list, [template], [template], **private)
    follow = dict(outputs=[session, progress, preview, result], concurrency_limit=None, **private)
    train.click(actions.train, [session, *train_fields.values()], **follow)
    train_hypernetwork.click(actions.train_hypernetwork, [session, *hypernetwork_fields.values()], **follow)
    tab_token.change(actions.resume, [session, tab_token], **follow)
    interrupt.click(actions.interrupt, [session], [], **private)
    return TrainTab(name, init_text, vectors, overwrite, create, create_result, new_hypernetwork, embedding,
                    embedding_refresh, hypernetwork, hypernetwork_refresh, template, template_refresh, train_fields,
                    hypernetwork_fields, train, train_hypernetwork, interrupt, progress, preview, result, session,
                    tab_token, actions)
