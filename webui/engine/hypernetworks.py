"""Hypernetworks: A1111's small networks that bend what the UNet's attention layers make their keys and values
from, named in the prompt as A1111 names them:

    <hypernet:anime>        multiplier 1
    <hypernet:anime:0.6>    multiplier 0.6

Files are A1111's .pt from the hypernetworks folder (models/hypernetworks, --hypernetwork-dir), named by their
file name. One holds, for each width an attention's key/value projection reads (320, 640, 768, 1024, 1280), a pair
of small networks, one for the key and one for the value, and the structure they share ('layer_structure',
'activation_func', 'is_layer_norm', the dropout settings). Each network is the Sequential A1111 builds from that
structure (Linear layers, with an activation, a LayerNorm and a Dropout after each where the structure has them:
they take places in the Sequential, so its keys name them) and computes x + mlp(x) * multiplier.

As in A1111 every attention of the UNet, self-attention as well as cross-attention, hands its key and value
projections their input through the networks made for its width; several tags apply one after another, in the
prompt's order. Here that is a forward pre-hook on each projection, on while a pass runs (bent_attention), so the
UNet's weights never change. The networks run in float32 and give back the UNet's dtype.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from webui.engine.models import file_stamp, files_by_name
from webui.schemas import InvalidRequest

log = logging.getLogger(__name__)

HYPERNETWORK_SUFFIXES = (".pt",)  # A1111 lists only these
NO_HYPERNETWORK = "None"  # A1111's lists' empty choice: a file of this name is left out of them, as there
HYPERNET_TAG = "hypernet"
MAX_HYPERNETWORKS = 10  # in one prompt: each is a file to read, and each runs at every attention
MAX_MULTIPLIER = 10.0
_TAG = re.compile(rf"<{HYPERNET_TAG}:([^>]+)>")  # as A1111 (and lora.py) read a tag
# A1111's activation names: its own few, then every activation class of torch by its name in lower case ('swish'
# is Hardswish there, and stays so: a file trained with it must compute the same).
ACTIVATIONS = {name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
                if cls.__module__ == torch.nn.modules.activation.__name__}
ACTIVATIONS |= {"relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
                 "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
_OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",  # the first files' names
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


class HypernetworkError(InvalidRequest):
    """A hypernetwork the prompt names cannot be used: the message says what to fix. The job is refused."""


@dataclass(frozen=True)
class HypernetworkUse:
    name: str
    multiplier: float


@dataclass(frozen=True)
class HypernetworkFile:
    name: str  # what a prompt names: the file's stem
    path: Path


def hypernetwork_uses(prompt: str) -> list[HypernetworkUse]:
    """The hypernetworks the prompt's tags name, in its order (a name given twice runs twice, as in A1111)."""
    uses = [_parse_tag(match.group(1), match.group(0)) for match in _TAG.finditer(prompt or "")]
    if len(uses) > MAX_HYPERNETWORKS:
        raise HypernetworkError(f"the prompt names {len(uses)} hypernetworks; use at most {MAX_HYPERNETWORKS}")
    return uses


def _parse_tag(body: str, tag: str) -> HypernetworkUse:
    name, *values = [part.strip() for part in body.split(":")]
    if not name:
        raise HypernetworkError(f"{tag} names no hypernetwork; write <hypernet:name> or <hypernet:name:0.6>")
    if len(values) > 1:
        raise HypernetworkError(f"{tag} has {len(values)} values; give one multiplier, as in <hypernet:{name}:0.6>")
    if not values:
        return HypernetworkUse(name, 1.0)
    try:
        multiplier = float(values[0])
    except ValueError:
        raise HypernetworkError(f"{tag}: {values[0]!r} is not a number; write a multiplier such as 0.6") from None
    if not math.isfinite(multiplier) or abs(multiplier) > MAX_MULTIPLIER:
        raise HypernetworkError(f"{tag}: the multiplier must be between -{MAX_MULTIPLIER:g} and {MAX_MULTIPLIER:g}")
    return HypernetworkUse(name, multiplier)


# --- the structure and the networks --------------------------------------------------------


@dataclass(frozen=True)
class Structure:
    """What a file says its networks are made of, with A1111's defaults for what older files leave out."""
    layers: tuple[float, ...]  # each layer's width as a multiple of the input's, from 1 to 1
    activation: str | None
    layer_norm: bool
    dropout: tuple[float, ...]  # after layer i: dropout[i + 1] (0: none)
    activate_output: bool

    @classmethod
    def of(cls, state: dict, where: str) -> "Structure":
        layers = state.get("layer_structure") or [1, 2, 1]
        if (not isinstance(layers, (list, tuple)) or len(layers) < 2 or layers[0] != 1 or layers[-1] != 1
                or not all(isinstance(value, (int, float)) and value > 0 for value in layers)):
            raise HypernetworkError(f"{where}: its layer_structure {layers!r} is not a list of widths from 1 to 1")
        activation = state.get("activation_func")
        if activation not in (None, "linear") and activation not in ACTIVATIONS:
            raise HypernetworkError(f"{where}: its activation function {activation!r} is not one A1111 has")
        dropout = state.get("dropout_structure")
        use_dropout = bool(dropout and any(dropout)) or bool(state.get("use_dropout", False))
        if dropout is None:
            dropout = _dropout_of(len(layers), use_dropout, bool(state.get("last_layer_dropout", False)))
        if (not isinstance(dropout, (list, tuple)) or len(dropout) < len(layers)
                or not all(isinstance(p, (int, float)) and 0 <= p < 1 for p in dropout)):
            raise HypernetworkError(f"{where}: its dropout_structure {dropout!r} does not fit its layer_structure "
                                    f"{list(layers)} (a probability below 1 for each)")
        return cls(tuple(layers), activation, bool(state.get("is_layer_norm", False)), tuple(dropout),
                   bool(state.get("activate_output", True)))

    def parameter_count(self, width: int) -> int | float:
        """The weights network(width) holds, counted without building it (an activation's own, as PReLU's, too);
        inf where a layer is too wide to count (1e308 times the width), which no file or limit fits."""
        if not all(math.isfinite(width * layer) for layer in self.layers):
            return math.inf
        count, last = 0, len(self.layers) - 2
        activation = 0
        with contextlib.suppress(TypeError):  # one that needs arguments: network() says it cannot be built
            if self.activation not in (None, "linear"):
                activation = sum(weights.numel() for weights in ACTIVATIONS[self.activation]().parameters())
        for i in range(len(self.layers) - 1):
            inputs, size = int(width * self.layers[i]), int(width * self.layers[i + 1])
            count += inputs * size + size + (2 * size if self.layer_norm else 0)
            count += activation if i < last or self.activate_output else 0
        return count

    def network(self, width: int) -> "KeyValueNetwork":
        """The network for inputs `width` wide, laid out as A1111 lays it out (its Sequential's indexes)."""
        parts: list[torch.nn.Module] = []
        last = len(self.layers) - 2
        for i in range(len(self.layers) - 1):
            size = int(width * self.layers[i + 1])
            parts.append(torch.nn.Linear(int(width * self.layers[i]), size))
            if self.activation not in (None, "linear") and (i < last or self.activate_output):
                parts.append(ACTIVATIONS[self.activation]())
            if self.layer_norm:
                parts.append(torch.nn.LayerNorm(size))
            if self.dropout[i + 1] > 0:  # nothing at run time (eval), but it takes its index
                parts.append(torch.nn.Dropout(p=self.dropout[i + 1]))
        return KeyValueNetwork(torch.nn.Sequential(*parts))


def _dropout_of(count: int, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's dropout for files that give only use_dropout: 0.3 after every layer but the last two, and after
    the one before the output too where last_layer_dropout says so."""
    if not use_dropout:
        return [0.0] * count
    return [0.0, *[0.3] * (count - 3), 0.3 if last_layer_dropout else 0.0, 0.0]


class KeyValueNetwork(torch.nn.Module):
    """One of a pair: x + mlp(x) * multiplier. `linear` is A1111's name for the Sequential (its keys say so)."""

    def __init__(self, linear: torch.nn.Sequential):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        return x + self.linear(x) * multiplier


@dataclass
class Hypernetwork:
    name: str
    path: Path
    stamp: tuple[int, int]  # the file's size and time when read
    layers: dict[int, tuple[KeyValueNetwork, KeyValueNetwork]] = field(default_factory=dict)  # width -> (key, value)

    def to(self, device: torch.device | str) -> None:
        for pair in self.layers.values():
            for network in pair:
                network.to(device)


def read_hypernetwork(entry: HypernetworkFile) -> Hypernetwork:
    """The file's networks, loaded strictly into A1111's layout; a file that does not fit is a HypernetworkError
    naming it. weights_only: a .pt must not run code while it loads."""
    where = f"hypernetwork {entry.name} ({entry.path.name})"
    stamp = file_stamp(entry.path)
    try:
        state = torch.load(entry.path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise HypernetworkError(f"{where} could not be read ({type(err).__name__}: {str(err)[:200]}); the file may be "
                                "incomplete or not a hypernetwork: download it again") from err
    if not isinstance(state, dict):
        raise HypernetworkError(f"{where} is not a hypernetwork file (A1111's holds a dict of widths)")
    widths = {key: pair for key, pair in state.items() if isinstance(key, int) and not isinstance(key, bool)}
    if not widths:
        raise HypernetworkError(f"{where} holds no layers by width (320, 768, ...); it may be a LoRA, an embedding "
                                "or a checkpoint: put it in its own folder")
    structure = Structure.of(state, where)
    network = Hypernetwork(entry.name, entry.path, stamp)
    for width, pair in sorted(widths.items()):
        if width <= 0 or not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
                isinstance(weights, dict) for weights in pair):
            raise HypernetworkError(f"{where}: width {width} holds no pair of key and value networks")
        network.layers[width] = tuple(_loaded(structure, width, weights, f"{where}, width {width} {part}")
                                      for part, weights in zip(("key", "value"), pair))
    return network


def _loaded(structure: Structure, width: int, weights: dict, where: str) -> KeyValueNetwork:
    # Checked before anything is built: a structure far larger than the weights (a huge width or layer) would
    # otherwise take all the memory before load_state_dict could say they do not fit.
    needed = structure.parameter_count(width)
    given = sum(value.numel() for value in weights.values() if torch.is_tensor(value))
    if needed != given:
        raise HypernetworkError(f"{where}: its weights do not fit the structure it gives (layers "
                                f"{list(structure.layers)}, layer norm {structure.layer_norm}): that needs {needed} "
                                f"weights, and it holds {given}")
    try:
        network = structure.network(width)
    except (TypeError, ValueError, RuntimeError) as err:  # an activation that needs arguments, a zero width
        raise HypernetworkError(f"{where}: its structure cannot be built ({type(err).__name__}: {err})") from err
    weights = {_OLD_KEYS.get(key, key): value for key, value in weights.items()}
    try:
        network.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:  # missing or unexpected keys, other shapes
        raise HypernetworkError(f"{where}: its weights do not fit the structure it gives (layers "
                                f"{list(structure.layers)}, activation {structure.activation}, layer norm "
                                f"{structure.layer_norm}, dropout {list(structure.dropout)}): "
                                f"{' '.join(str(err).split())[:300]}") from err
    return network.float().eval().requires_grad_(False)


# --- the folder ----------------------------------------------------------------------------


class HypernetworkLibrary:
    """The hypernetwork files in one folder (and its subfolders), by name; the networks of the last job, read."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[str, HypernetworkFile] | None = None
        self._loaded: dict[tuple, Hypernetwork] = {}  # (path, stamp) -> its networks: only the last job's

    def refresh(self) -> list[HypernetworkFile]:
        files = {name: HypernetworkFile(name, path) for name, path in files_by_name(
            self.folder, HYPERNETWORK_SUFFIXES, "hypernetworks", left_out=(NO_HYPERNETWORK,)).items()}
        self._files = files
        return list(files.values())

    def entries(self) -> list[HypernetworkFile]:
        return list(self._files.values()) if self._files is not None else self.refresh()

    def find(self, name: str) -> HypernetworkFile:
        """The file for a name a prompt gives; a file added since the last look is found too."""
        files = self._files if self._files is not None else {entry.name: entry for entry in self.refresh()}
        found = files.get(name)
        if found is None or not found.path.is_file():
            found = {entry.name: entry for entry in self.refresh()}.get(name)
        if found is None:
            names = ", ".join(sorted(entry.name for entry in self.entries())[:20]) or "none"
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise HypernetworkError(f"no hypernetwork named {shown!r} in {self.folder} (hypernetworks there: {names}); "
                                    "put its .pt file in that folder, or fix the name in the prompt")
        return found

    def check(self, uses: list[HypernetworkUse]) -> None:
        for use in uses:
            self.find(use.name)

    def networks(self, uses: list[HypernetworkUse], device: torch.device | str = "cpu"
                 ) -> list[tuple[Hypernetwork, float]]:
        """Each use's networks (on `device`) and multiplier, in order. Files read for an earlier job are kept while
        jobs name them (a file saved again is read again); the others go, as A1111 keeps only those in use."""
        keys = []
        for use in uses:
            entry = self.find(use.name)
            keys.append((entry.path, file_stamp(entry.path), entry))
        wanted = {}
        for path, stamp, entry in keys:
            if (path, stamp) not in wanted:
                wanted[(path, stamp)] = self._loaded.get((path, stamp)) or read_hypernetwork(entry)
        self._loaded = wanted
        for network in wanted.values():
            network.to(device)
        return [(wanted[(path, stamp)], use.multiplier) for (path, stamp, _), use in zip(keys, uses)]

    def forget(self) -> None:
        """Let go of the networks read (their memory on the device too)."""
        self._loaded = {}


# --- applying them -------------------------------------------------------------------------


@contextlib.contextmanager
def bent_attention(models: list[torch.nn.Module], networks: list[tuple[Hypernetwork, float]]) -> Iterator[None]:
    """While inside, every attention of `models` whose key/value width a network has reads its keys and values
    from its input passed through those networks, one after another (none: the models are left alone)."""
    if not networks:
        yield
        return
    from diffusers.models.attention_processor import Attention

    handles = []
    try:
        for model in models:
            for attention in (module for module in model.modules() if isinstance(module, Attention)):
                if getattr(attention, "fused_projections", False):
                    raise ValueError("hypernetworks need the attention's key and value projections apart; this "
                                     "model's are fused (fuse_qkv_projections)")
                for index, name in enumerate(("to_k", "to_v")):
                    projection = getattr(attention, name)
                    width = getattr(projection, "in_features", None) or projection.weight.shape[1]
                    chain = [(network.layers[width][index], multiplier) for network, multiplier in networks
                             if width in network.layers]
                    if chain:
                        handles.append(projection.register_forward_pre_hook(_through(chain)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _through(chain: list[tuple[KeyValueNetwork, float]]):
    def bend(_module, args):
        x, *rest = args
        bent = x.float()
        for network, multiplier in chain:
            bent = network(bent, multiplier)
        return (bent.to(x.dtype), *rest)

    return bend
