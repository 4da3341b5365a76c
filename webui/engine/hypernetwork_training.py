"""A1111's Train tab for hypernetworks: a new hypernetwork's file (its networks freshly initialized), and its
networks trained on pictures while the model stays frozen (the run itself: training.py).

A hypernetwork is trained where prompts use it: bent_attention (hypernetworks.py) puts its networks before every
attention's key and value projections of their width, at multiplier 1 as A1111 trains, so the gradients reach
them and nothing else. The file written back keeps A1111's layout: for each width a (key, value) pair of its
Sequential's weights, and the structure's fields beside them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from webui.engine.hypernetworks import ACTIVATIONS, Hypernetwork, Structure, bent_attention, read_hypernetwork
from webui.engine.training import (
    TrainingError, TrainingHooks, TrainingOutcome, TrainingPlan, prepare, run_training, save_whole,
)

MODULE_SIZES = (768, 1024, 320, 640, 1280)  # A1111's "Modules" choices: the attention widths of SD 1.x and 2.x
DEFAULT_SIZES = (768, 320, 640, 1280)  # its picks: SD 1.x's
WEIGHT_INITS = ("Normal", "KaimingUniform", "KaimingNormal", "XavierUniform", "XavierNormal")
# A1111's page offers every activation it knows but these two; threshold and glu cannot be built without arguments
# (glu also halves the width), so none is made with them here.
_NOT_OFFERED = ("hardswish", "multiheadattention", "threshold", "glu")
_FIRST = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid")  # A1111's own, listed first
OFFERED_ACTIVATIONS = (*_FIRST, *sorted(set(ACTIVATIONS) - {*_FIRST, *_NOT_OFFERED}))


# --- a new hypernetwork -----------------------------------------------------------------------------
def new_hypernetwork_state(name: str, sizes: list[int], structure: Structure, weight_init: str) -> dict:
    """A new hypernetwork in A1111's file layout: a (key, value) pair of freshly initialized networks for each
    size, and the structure's fields (A1111's names), step 0."""
    state: dict = {size: tuple(_initialized(structure.network(size), weight_init, structure.activation).state_dict()
                               for _ in range(2)) for size in sizes}
    return state | structure_fields(structure, weight_init) | {
        "step": 0, "name": name, "sd_checkpoint": None, "sd_checkpoint_name": None, "optional_info": None}


def structure_fields(structure: Structure, weight_init: str) -> dict:
    """The fields A1111 writes about the networks' structure."""
    return {"layer_structure": list(structure.layers), "activation_func": structure.activation,
            "is_layer_norm": structure.layer_norm, "weight_initialization": weight_init,
            "activate_output": structure.activate_output, "use_dropout": any(structure.dropout),
            "dropout_structure": list(structure.dropout), "last_layer_dropout": structure.dropout[-2] != 0}


def _initialized(network: torch.nn.Module, weight_init: str, activation: str | None) -> torch.nn.Module:
    """A1111's initialization: weights N(0, 0.01) and biases 0 for Normal (and for every layer norm); Xavier or
    Kaiming weights and biases 0 otherwise (Kaiming for leaky ReLU where that is the activation)."""
    nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
    for layer in network.modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
            continue
        with torch.no_grad():
            layer.bias.zero_()
            if weight_init == "Normal" or isinstance(layer, torch.nn.LayerNorm):
                torch.nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            elif weight_init == "XavierUniform":
                torch.nn.init.xavier_uniform_(layer.weight)
            elif weight_init == "XavierNormal":
                torch.nn.init.xavier_normal_(layer.weight)
            elif weight_init == "KaimingUniform":
                torch.nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
            else:
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
    return network


# --- training -------------------------------------------------------------------------------------
def train_hypernetwork(engine, plan: TrainingPlan, hooks: TrainingHooks) -> TrainingOutcome:
    """Train the hypernetwork `plan.name` on the loaded model, on the worker thread (training.run_training); its
    file is written back with the trained networks."""
    prepare(engine, plan)
    entry = engine.hypernetworks.find(plan.name)  # HypernetworkError where it is gone
    trainee = _HypernetworkTrainee(engine.pipe, read_hypernetwork(entry), _file_fields(entry.path))
    widths = attention_widths(engine.pipe.unet)
    if not widths & set(trainee.network.layers):
        raise TrainingError(f"hypernetwork_name: {plan.name} has networks for widths "
                            f"{', '.join(map(str, sorted(trainee.network.layers)))}, and the loaded model's attention "
                            f"layers read {', '.join(map(str, sorted(widths)))}: nothing would train; create one with "
                            "those sizes (Modules), or load the model it was made for")
    return run_training(engine, plan, hooks, trainee)


def attention_widths(unet) -> set[int]:
    """The widths the UNet's attention layers make their keys and values from."""
    from diffusers.models.attention_processor import Attention

    return {module.to_k.in_features for module in unet.modules() if isinstance(module, Attention)}


def _file_fields(path: Path) -> dict:
    """The file's fields other than its networks (A1111's structure, step, name...), kept when it is written back."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # read_hypernetwork has read it already
    return {key: value for key, value in state.items() if not isinstance(key, int)}


class _HypernetworkTrainee:
    """The hypernetwork's networks, trained where they run: before the attentions' key and value projections."""

    def __init__(self, pipe, network: Hypernetwork, fields: dict):
        self.network, self.fields = network, fields
        self.path, self.step = network.path, int(fields.get("step") or 0)
        self.structure = Structure.of(fields, network.name)
        network.to(pipe._execution_device)
        self.parameters = [parameter for pair in network.layers.values() for part in pair
                           for parameter in part.parameters()]

    def _train_mode(self, on: bool) -> None:
        """Training: dropout on (as A1111 trains), gradients wanted; else as prompts run them."""
        for pair in self.network.layers.values():
            for part in pair:
                part.train(on)
                part.requires_grad_(on)

    @contextlib.contextmanager
    def wired(self, pipe):
        self._train_mode(True)
        try:
            with bent_attention([pipe.unet], [(self.network, 1.0)]):
                yield
        finally:
            self._train_mode(False)

    @contextlib.contextmanager
    def previewing(self, pipe):
        """The networks as prompts run them (no dropout); the hooks of wired stay on."""
        self._train_mode(False)
        try:
            yield
        finally:
            self._train_mode(True)

    def save(self, path: Path, step: int, model, copy: bool) -> None:
        """A1111's layout; the file's own fields kept (its weight initialization, its notes), A1111's defaults
        written where an older file had none. A copy keeps the hypernetwork's name, as A1111's copies do."""
        networks = {width: tuple(_weights(part) for part in pair) for width, pair in self.network.layers.items()}
        defaults = structure_fields(self.structure, "Normal") | {"optional_info": None}
        save_whole(path, networks | defaults | self.fields | {
            "step": step, "name": self.network.name, "sd_checkpoint": model.short_hash,
            "sd_checkpoint_name": model.entry.name})

    def reload(self, engine) -> None:
        engine.hypernetworks.refresh()  # (the file's networks are read again by its new stamp when a prompt names it)


def _weights(network: torch.nn.Module) -> dict:
    return {key: value.detach().float().cpu().clone() for key, value in network.state_dict().items()}
