"""Face parsing: ParseNet's shapes and published key layout, loading files, and the soft paste-back mask."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from webui.engine.face_parsing import (
    ConvLayer, ParseNet, colour_mask, face_mask, gaussian_blur, gaussian_kernel, load_parser, soften_mask,
)

FIXTURE = Path(__file__).parent / "data" / "parsenet_keys.json"

# The published layout scaled down: one step down and up, two body blocks, 8 to 16 channels.
TINY = dict(in_size=64, out_size=64, min_feat_size=32, base_ch=8, parsing_ch=19, res_depth=2, ch_range=(8, 16))

# facexlib's 19 parsing classes; the paste mask leaves out background, neck, cloth, hair and hat
LEFT_OUT = {0, 14, 16, 17, 18}
SKIN, HAIR = 1, 17


def tiny_model(seed: int = 0) -> ParseNet:
    torch.manual_seed(seed)
    model = ParseNet(**TINY)
    with torch.no_grad():  # running statistics a trained network would have, so eval mode is not the identity
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


class StandInParser(nn.Module):
    """Logits whose argmax is a given class layout; records what it was given."""

    def __init__(self, classes: np.ndarray):
        super().__init__()
        self.classes = torch.from_numpy(classes)
        self.anchor = nn.Parameter(torch.zeros(()))  # face_mask reads device and dtype from a parameter
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor):
        self.seen.append(x)
        logits = nn.functional.one_hot(self.classes, 19).permute(2, 0, 1)[None].float()
        return logits, x


def layout(left: int, right: int) -> np.ndarray:
    classes = np.full((512, 512), left, dtype=np.int64)
    classes[:, 256:] = right
    return classes


def grey_face(size: int = 512) -> Image.Image:
    return Image.new("RGB", (size, size), (128, 128, 128))


# ---- the network ----

def test_forward_returns_class_logits_first_then_an_image():
    with torch.no_grad():
        out = tiny_model()(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == (2, 19, 64, 64)
    assert out[1].shape == (2, 3, 64, 64)
    assert torch.isfinite(out[0]).all() and out[0].std() > 0


def test_network_is_fully_convolutional():
    with torch.no_grad():
        logits, image = tiny_model()(torch.rand(1, 3, 96, 128) * 2 - 1)
    assert logits.shape == (1, 19, 96, 128) and image.shape == (1, 3, 96, 128)


def test_out_size_above_in_size_upsamples():
    model = ParseNet(**{**TINY, "out_size": 128}).eval()
    with torch.no_grad():
        logits, _ = model(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, 19, 128, 128)


def single_tap_conv(row: int, col: int, activate: bool = False) -> ConvLayer:
    layer = ConvLayer(1, 1, activate=activate)
    with torch.no_grad():
        layer.conv2d.weight.zero_()
        layer.conv2d.weight[0, 0, row, col] = 1
        layer.conv2d.bias.zero_()
    return layer


def test_conv_layer_activation_is_leaky_relu_with_slope_0_2():
    x = torch.linspace(-2, 2, 25).reshape(1, 1, 5, 5)
    with torch.no_grad():
        out = single_tap_conv(1, 1, activate=True)(x)
    torch.testing.assert_close(out, torch.where(x > 0, x, 0.2 * x))


def test_conv_layer_pads_by_reflection():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    with torch.no_grad():
        out = single_tap_conv(0, 0)(x)  # reads the pixel up and left of each output
    assert out[0, 0, 0, 0] == x[0, 0, 1, 1]  # mirrored without repeating the edge
    assert out[0, 0, 2, 3] == x[0, 0, 1, 2]


def test_full_model_has_the_published_keys_and_shapes():
    expected = json.loads(FIXTURE.read_text())
    with torch.device("meta"):
        model = ParseNet()
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == expected


# ---- loading ----

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_round_trip(tmp_path, suffix):
    model = tiny_model(seed=3)
    path = tmp_path / f"parser{suffix}"
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    loaded = load_parser(path, **TINY)
    assert not loaded.training
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_load_accepts_a_file_without_batch_norm_step_counters(tmp_path):
    model = tiny_model(seed=3)
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_parser(tmp_path / "old.pth", **TINY)(x)[0], model(x)[0], rtol=0, atol=0)


def test_load_converts_dtype(tmp_path):
    torch.save(tiny_model().state_dict(), tmp_path / "p.pth")
    assert next(load_parser(tmp_path / "p.pth", dtype=torch.bfloat16, **TINY).parameters()).dtype == torch.bfloat16


def test_mismatched_file_is_a_clear_error(tmp_path):
    state = tiny_model().state_dict()
    del state["out_mask_conv.conv2d.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["encoder.0.conv2d.weight"] = torch.zeros(4, 3, 3, 3)
    torch.save(state, tmp_path / "not_parsenet.pth")
    with pytest.raises(ValueError) as caught:
        load_parser(tmp_path / "not_parsenet.pth", **TINY)
    message = str(caught.value)
    assert "not_parsenet.pth" in message
    assert "missing out_mask_conv.conv2d.bias" in message
    assert "unexpected extra.weight" in message
    assert "encoder.0.conv2d.weight is [4, 3, 3, 3], expected [8, 3, 3, 3]" in message


def test_a_file_for_another_network_is_refused(tmp_path):
    torch.save(tiny_model().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="tiny.pth"):
        load_parser(tmp_path / "tiny.pth")  # the published configuration wants far more and wider layers


# ---- the blur ----

def reflect_101(index: int, size: int) -> int:
    """OpenCV's default border: ... 2 1 | 0 1 2 ... size-2 size-1 | size-2 size-3 ..."""
    while index < 0 or index >= size:
        index = -index if index < 0 else 2 * (size - 1) - index
    return index


def blur_matrix(size: int, ksize: int, sigma: float) -> np.ndarray:
    """The 1-D blur with reflected borders as a (size, size) matrix, from the Gaussian formula."""
    radius = ksize // 2
    weights = [math.exp(-((k - radius) ** 2) / (2 * sigma ** 2)) for k in range(ksize)]
    total = sum(weights)
    matrix = np.zeros((size, size))
    for i in range(size):
        for k, weight in enumerate(weights):
            matrix[i, reflect_101(i + k - radius, size)] += weight / total
    return matrix


def test_kernel_matches_opencv_values():
    kernel = gaussian_kernel(101, 11)
    assert kernel.shape == (101,)
    # cv2.getGaussianKernel(101, 11): centre and end taps
    assert kernel[50] == pytest.approx(0.03626763888547374, rel=1e-12)
    assert kernel[0] == pytest.approx(1.1830580092209053e-06, rel=1e-12)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("shape, ksize, sigma", [((9, 7), 5, 1.5), ((120, 131), 101, 11.0)])
def test_blur_matches_the_hand_computed_reference(shape, ksize, sigma):
    image = np.random.default_rng(0).random(shape) * 255
    expected = blur_matrix(shape[0], ksize, sigma) @ image @ blur_matrix(shape[1], ksize, sigma).T
    np.testing.assert_allclose(gaussian_blur(image, ksize, sigma), expected, rtol=0, atol=1e-9)


def test_blur_keeps_a_constant_image_constant():
    np.testing.assert_allclose(gaussian_blur(np.full((64, 80), 255.0)), 255.0, rtol=0, atol=1e-9)


def test_blur_refuses_an_image_smaller_than_its_reach():
    with pytest.raises(ValueError, match="101x101"):
        gaussian_blur(np.zeros((40, 600)))


# ---- the mask ----

def test_colour_map_keeps_face_classes_and_drops_the_rest():
    classes = np.arange(19).reshape(1, 19)
    mask = colour_mask(classes)
    for cls in range(19):
        assert mask[0, cls] == (0 if cls in LEFT_OUT else 255), cls


def test_face_mask_of_a_known_layout():
    parser = StandInParser(layout(SKIN, HAIR))
    mask = face_mask(parser, grey_face())
    assert mask.dtype == np.float32 and mask.shape == (512, 512)
    assert mask.min() >= 0 and mask.max() <= 1
    # beyond the two blurs' reach (2 x 50 pixels) of the edge between skin and hair, the colour map shows through
    np.testing.assert_allclose(mask[10:-10, 10:150], 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mask[10:-10, 362:-10], 0.0, rtol=0, atol=1e-6)
    assert 0.3 < mask[256, 255] < 0.7  # the edge is feathered
    assert np.all(np.diff(mask[256, 150:362]) <= 1e-7)


def test_face_mask_clears_a_ten_pixel_border():
    mask = face_mask(StandInParser(np.full((512, 512), SKIN)), grey_face())
    frame = np.ones((512, 512), dtype=bool)
    frame[10:-10, 10:-10] = False
    assert np.all(mask[frame] == 0)
    np.testing.assert_allclose(mask[10:-10, 10:-10], 1.0, rtol=0, atol=1e-6)


def test_soften_mask_of_a_left_out_class_is_empty():
    assert not soften_mask(colour_mask(np.full((512, 512), HAIR))).any()


def test_parser_input_is_rgb_in_minus_one_to_one():
    parser = StandInParser(np.zeros((512, 512), dtype=np.int64))
    face_mask(parser, Image.new("RGB", (512, 512), (255, 0, 51)))
    (x,) = parser.seen
    assert x.shape == (1, 3, 512, 512) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]))


def test_a_face_of_another_size_is_parsed_at_512():
    parser = StandInParser(np.full((512, 512), SKIN))
    face = Image.new("RGB", (256, 256), (200, 100, 50))
    mask = face_mask(parser, face)
    (x,) = parser.seen
    assert x.shape == (1, 3, 512, 512) and mask.shape == (512, 512)
    # a uniform face stays uniform through the resize
    expected = torch.tensor([200, 100, 50]) / 255 * 2 - 1
    torch.testing.assert_close(x[0].amax(dim=(1, 2)), expected)
    torch.testing.assert_close(x[0].amin(dim=(1, 2)), expected)


def test_face_mask_runs_a_real_parsenet():
    parser = tiny_model()
    face = Image.fromarray(np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    mask = face_mask(parser, face)
    with torch.no_grad():
        x = torch.from_numpy((np.asarray(face, dtype=np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
        classes = parser(x)[0].argmax(dim=1)[0].numpy()
    np.testing.assert_array_equal(mask, soften_mask(colour_mask(classes)))
