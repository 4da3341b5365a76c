"""Finding faces, cutting them out upright and putting restored ones back: facexlib's steps for A1111's
"Restore faces", written without facexlib, OpenCV or torchvision.

A1111 1.10 runs facexlib's FaceRestoreHelper(upscale_factor=1, face_size=512, det_model="retinaface_resnet50"):
  - get_face_landmarks_5(resize=640, eye_dist_threshold=5): the picture (as BGR) is resized with Lanczos so its
    short side is 640, RetinaFace (ResNet-50) finds boxes and five landmarks with a score above 0.97, overlapping
    boxes are thinned by NMS at IoU 0.4, and faces whose eyes are under 5 pixels apart are dropped;
  - align_warp_face(): a similarity transform takes the five landmarks onto FFHQ's 512x512 template and the
    picture is warped through it (bilinear, grey border);
  - paste_faces_to_input_image(): the restored face is warped back and blended in under a soft mask.
The steps here reproduce those numbers: OpenCV's fixed-point Lanczos-4 resize and warp sampling grid are
rebuilt because the detector and the paste see exactly those pixels. Where we differ, the function says so.

RetinaFace's module names follow detection_Resnet50_Final.pth (torchvision's ResNet-50 under `body.`, then
`fpn.`, `ssh1..3.`, `ClassHead.N.`, `BboxHead.N.`, `LandmarkHead.N.`), so the published file loads as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

from webui.engine.upscaler_nets import load_network, read_weights

# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (stride on the 3x3 conv), with its attribute names."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNetBody(nn.Module):
    """torchvision's ResNet-50 up to layer4 (no pooling head), returning layer2, layer3 and layer4's features
    (strides 8, 16, 32), as facexlib's IntermediateLayerGetter does."""

    def __init__(self, base: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = base
        for index, count in enumerate(blocks):
            width = base * 2 ** index
            layer = [Bottleneck(channels, width, stride=1 if index == 0 else 2)]
            channels = width * Bottleneck.expansion
            layer += [Bottleneck(channels, width) for _ in range(count - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


def _conv_bn(in_channels: int, out_channels: int, kernel: int, leaky: float | None) -> nn.Sequential:
    """Conv (no bias) + BatchNorm, then LeakyReLU unless `leaky` is None: keys N.0.weight, N.1.*."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
              nn.BatchNorm2d(out_channels)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(negative_slope=leaky, inplace=True))
    return nn.Sequential(*layers)


def _leak(channels: int) -> float:
    # RetinaFace's rule: narrow (<= 64 channel) FPN/SSH layers leak 0.1; the 256-wide ResNet-50 ones are plain ReLU
    return 0.1 if channels <= 64 else 0.0


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        leaky = _leak(channels)
        self.output1 = _conv_bn(in_channels[0], channels, 1, leaky)
        self.output2 = _conv_bn(in_channels[1], channels, 1, leaky)
        self.output3 = _conv_bn(in_channels[2], channels, 1, leaky)
        self.merge1 = _conv_bn(channels, channels, 3, leaky)
        self.merge2 = _conv_bn(channels, channels, 3, leaky)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        p3 = self.output3(features[2])
        p2 = self.output2(features[1])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.output1(features[0])
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        return [p1, p2, p3]


class SSH(nn.Module):
    """Context module: 3x3, 5x5 and 7x7 receptive fields (as stacked 3x3 convs), concatenated."""

    def __init__(self, channels: int):
        super().__init__()
        leaky = _leak(channels)
        self.conv3X3 = _conv_bn(channels, channels // 2, 3, None)
        self.conv5X5_1 = _conv_bn(channels, channels // 4, 3, leaky)
        self.conv5X5_2 = _conv_bn(channels // 4, channels // 4, 3, None)
        self.conv7X7_2 = _conv_bn(channels // 4, channels // 4, 3, leaky)
        self.conv7x7_3 = _conv_bn(channels // 4, channels // 4, 3, None)  # lower-case x: the file's spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5 = self.conv5X5_1(x)
        branch7 = self.conv7x7_3(self.conv7X7_2(branch5))
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(branch5), branch7], dim=1))


class Head(nn.Module):
    """A 1x1 conv predicting `values` numbers per anchor, flattened to (N, cells x anchors, values) in the
    order row, column, anchor (the prior boxes' order)."""

    def __init__(self, channels: int, values: int, anchors: int = 2):
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(channels, anchors * values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """RetinaFace with a ResNet-50 backbone, at detection_Resnet50_Final.pth's configuration by default.
    `base`, `blocks` and `channels` shrink it for tests (the published network: 64, (3, 4, 6, 3), 256).

    forward(x) takes a BGR picture minus the mean (104, 117, 123), shape (N, 3, H, W), and returns per anchor
    the box offsets (N, A, 4), the softmaxed (background, face) scores (N, A, 2) and landmark offsets (N, A, 10).
    """

    def __init__(self, base: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3), channels: int = 256):
        super().__init__()
        if channels % 4:
            raise ValueError(f"channels must be a multiple of 4, got {channels}")
        self.body = ResNetBody(base, blocks)
        stage_channels = [base * 2 ** level * Bottleneck.expansion for level in (1, 2, 3)]
        self.fpn = FPN(stage_channels, channels)
        self.ssh1, self.ssh2, self.ssh3 = SSH(channels), SSH(channels), SSH(channels)
        self.ClassHead = nn.ModuleList(Head(channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(channels, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = self.fpn(self.body(x))
        features = [ssh(level) for ssh, level in zip((self.ssh1, self.ssh2, self.ssh3), levels)]

        def run(heads: nn.ModuleList) -> torch.Tensor:
            return torch.cat([head(feature) for head, feature in zip(heads, features)], dim=1)

        return run(self.BboxHead), F.softmax(run(self.ClassHead), dim=-1), run(self.LandmarkHead)


def load_detector(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  **architecture) -> RetinaFace:
    """RetinaFace with the weights of a `.pth` (read without running pickled code) or `.safetensors` file, in eval
    mode on `device` as `dtype`. Keys may carry DataParallel's "module." prefix (the published file's do).
    `architecture`: RetinaFace arguments where they differ from the published configuration (tests' tiny
    networks). A file whose keys or shapes do not fit raises ValueError naming the file and the differences."""
    path = Path(path)
    state = {key.removeprefix("module."): value for key, value in read_weights(path).items()}
    return load_network(path, lambda: RetinaFace(**architecture), "a RetinaFace ResNet-50 weights file", state,
                        device, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Anchors, decoding, NMS
# ---------------------------------------------------------------------------------------------------------------

MIN_SIZES = ((16, 32), (64, 128), (256, 512))  # anchor sides in pixels, two per cell, per level
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """The anchors of a height x width input, (A, 4) as (centre x, centre y, width, height) in fractions of the
    picture, ordered level, row, column, anchor size (the heads' order)."""
    priors = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid((torch.arange(rows, dtype=torch.float64) + 0.5) * step / height,
                                (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width, indexing="ij")
        for_size = [torch.stack([cx, cy, torch.full_like(cx, size / width), torch.full_like(cy, size / height)], -1)
                    for size in sizes]
        priors.append(torch.stack(for_size, dim=2).reshape(-1, 4))
    return torch.cat(priors).float()


def decode_boxes(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(A, 4) predicted offsets -> (A, 4) boxes (x0, y0, x1, y1) in fractions of the picture."""
    centres = priors[:, :2] + offsets[:, :2] * VARIANCE[0] * priors[:, 2:]
    sizes = priors[:, 2:] * torch.exp(offsets[:, 2:] * VARIANCE[1])
    corners = centres - sizes / 2
    return torch.cat([corners, corners + sizes], dim=1)


def decode_landmarks(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(A, 10) predicted offsets -> (A, 5, 2) points in fractions of the picture."""
    points = offsets.reshape(-1, 5, 2)
    return priors[:, None, :2] + points * VARIANCE[0] * priors[:, None, 2:]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: the indices of the boxes kept, best first. A box goes when its IoU with a
    better kept box is above `threshold` (areas without the +1 pixel, as torchvision.ops.nms)."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0) * (y1 - y0)
    order = np.argsort(-scores, kind="stable")
    kept = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(best)
        overlap_w = np.clip(np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]), 0, None)
        overlap_h = np.clip(np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]), 0, None)
        inter = overlap_w * overlap_h
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[~(iou > threshold)]  # NaN IoU (two empty boxes) keeps the box, as torchvision does
    return np.array(kept, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------
# OpenCV-exact resampling (the detector and the paste see these pixels, so we match them)
# ---------------------------------------------------------------------------------------------------------------


def _lanczos4_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2.resize(INTER_LANCZOS4) along one axis: for each output pixel the 8 source indices (clamped at the edges)
    and their weights as OpenCV's 11-bit fixed-point integers."""
    pos = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    start = np.floor(pos)
    frac = (pos - start).astype(np.float64)
    distance = frac[:, None] + 3 - np.arange(8)
    weights = np.sinc(distance) * np.sinc(distance / 4)  # the Lanczos window with a = 4, normalised per pixel
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    indices = np.clip(start.astype(np.int64)[:, None] - 3 + np.arange(8), 0, src - 1)
    return indices, np.rint(weights * 2048).astype(np.int64)


def resize_lanczos4(picture: np.ndarray, width: int, height: int) -> np.ndarray:
    """An (H, W, C) uint8 picture resized as cv2.resize(..., interpolation=cv2.INTER_LANCZOS4) does it: no
    antialiasing when shrinking (unlike PIL's LANCZOS), replicated edges, integer arithmetic."""
    if picture.shape[:2] == (height, width):
        return picture.copy()
    cols, col_weights = _lanczos4_taps(picture.shape[1], width)
    rows, row_weights = _lanczos4_taps(picture.shape[0], height)
    horizontal = sum(picture[:, cols[:, k]].astype(np.int64) * col_weights[:, k, None] for k in range(8))
    both = sum(horizontal[rows[:, k]] * row_weights[:, k, None, None] for k in range(8))
    return np.clip((both + (1 << 21)) >> 22, 0, 255).astype(np.uint8)  # OpenCV rounds the 22-bit fixed point


def _invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine map (cv2.invertAffineTransform)."""
    linear = np.linalg.inv(matrix[:, :2])
    return np.hstack([linear, -linear @ matrix[:, 2:]])


def _warp(picture: np.ndarray, to_source: np.ndarray, xs: np.ndarray, ys: np.ndarray,
          border: tuple[float, ...] | float) -> np.ndarray:
    """Bilinear samples of an (H, W, C) picture at to_source @ (x, y, 1) for every output pixel (y in ys, x in xs),
    as cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT) computes them: sample positions snapped to its 1/32-pixel grid
    (its fixed-point arithmetic), taps outside the picture read `border`. Returns float64 (len(ys), len(xs), C);
    for uint8 input, rounding it gives OpenCV's pixels."""
    def on_grid(along_x: np.ndarray, along_y: np.ndarray) -> np.ndarray:
        # OpenCV rounds the x and y contributions to 1/1024 separately, then adds half a 1/32 step and truncates
        return (np.rint(along_y * 1024).astype(np.int64)[:, None]
                + np.rint(along_x * 1024).astype(np.int64)[None, :] + 16) >> 5

    gx = on_grid(to_source[0, 0] * xs, to_source[0, 1] * ys + to_source[0, 2])
    gy = on_grid(to_source[1, 0] * xs, to_source[1, 1] * ys + to_source[1, 2])
    x0, y0 = gx >> 5, gy >> 5
    fx, fy = (gx & 31)[..., None] / 32.0, (gy & 31)[..., None] / 32.0
    height, width = picture.shape[:2]
    fill = np.broadcast_to(np.asarray(border, dtype=np.float64), picture.shape[2:])

    def tap(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        values = picture[np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)].astype(np.float64)
        return np.where(inside[..., None], values, fill)

    top = tap(x0, y0) * (1 - fx) + tap(x0 + 1, y0) * fx
    bottom = tap(x0, y0 + 1) * (1 - fx) + tap(x0 + 1, y0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Face:
    """One detected face in the picture's pixel coordinates. landmarks: (5, 2) x, y of the left eye, right eye,
    nose tip, left mouth corner, right mouth corner ("left" as seen in the picture, facexlib's order)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray


def detect_faces(detector: RetinaFace, image: Image.Image, resize: int | None = 640, threshold: float = 0.97,
                 nms_threshold: float = 0.4, eye_dist_threshold: float | None = 5) -> list[Face]:
    """The faces in an RGB picture, best score first, as facexlib's FaceRestoreHelper.get_face_landmarks_5(
    resize=640, eye_dist_threshold=5) finds them for A1111: the picture (as BGR) Lanczos-resized so its short side
    is `resize` (up or down), faces scoring above 0.97 (the threshold that helper passes, not RetinaFace's own 0.8
    default) thinned by NMS at IoU 0.4, then faces whose eyes are under `eye_dist_threshold` pixels apart dropped.
    One difference: facexlib multiplies the score by the resize factor along with the coordinates (a slip); the
    score here is the detector's own."""
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    height, width = bgr.shape[:2]
    scale = 1.0 if resize is None else min(height, width) / resize
    small = resize_lanczos4(bgr, int(width / scale), int(height / scale))
    parameter = next(detector.parameters())
    x = torch.from_numpy(small.astype(np.float32)).permute(2, 0, 1)[None] - torch.tensor(BGR_MEAN)[:, None, None]
    with torch.no_grad():
        offsets, scores, landmark_offsets = (out[0].float().cpu()
                                             for out in detector(x.to(parameter.device, parameter.dtype)))

    small_h, small_w = small.shape[:2]
    priors = prior_boxes(small_h, small_w)
    size = torch.tensor([small_w, small_h], dtype=torch.float32)
    boxes = (decode_boxes(offsets, priors) * size.repeat(2)).numpy()
    points = (decode_landmarks(landmark_offsets, priors) * size).numpy()
    face_scores = scores[:, 1].numpy()

    confident = np.flatnonzero(face_scores > threshold)
    kept = confident[nms(boxes[confident], face_scores[confident], nms_threshold)]
    faces = []
    for index in kept:
        landmarks = points[index].astype(np.float64) * scale
        if eye_dist_threshold is not None and np.linalg.norm(landmarks[0] - landmarks[1]) < eye_dist_threshold:
            continue  # a face seen from the side, or too small to restore
        box = tuple(float(v) * scale for v in boxes[index])
        faces.append(Face(box=box, score=float(face_scores[index]), landmarks=landmarks))
    return faces


# ---------------------------------------------------------------------------------------------------------------
# Alignment and pasting back
# ---------------------------------------------------------------------------------------------------------------

# Where FFHQ's 512x512 faces have their five landmarks (facexlib's face_template; scaled for other sizes).
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]])
BORDER_RGB = (132, 133, 135)  # facexlib fills outside the picture with BGR (135, 133, 132), a grey


@dataclass
class AlignedFace:
    """A face cut out upright. matrix: the 2x3 affine map from the source picture's pixel coordinates to this
    face picture's (facexlib's affine_matrix); paste_face takes it to put the restored face back."""

    picture: Image.Image
    matrix: np.ndarray


def _fit_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The least-squares rotation + uniform scale + translation [[a, -b, tx], [b, a, ty]] taking source onto
    target (linear in a, b, tx, ty, so solved directly)."""
    x, y = source[:, 0], source[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    system = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(system, np.concatenate([target[:, 0], target[:, 1]]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def _opencv_lmeds_pairs(count: int, draws: int = 13) -> list[tuple[int, int]]:
    """The point pairs cv2's LMedS tries for a 2-point model, in its order: its RNG (multiply-with-carry, seeded
    with all ones at every call) drawing two distinct indices 13 times (the draws its 0.99 confidence at a 45%
    outlier rate asks for). Copying this makes our choice of inliers OpenCV's, not merely as good."""
    state = (1 << 64) - 1

    def draw() -> int:
        nonlocal state
        state = ((state & 0xFFFFFFFF) * 4164903690 + (state >> 32)) & ((1 << 64) - 1)
        return (state & 0xFFFFFFFF) % count

    pairs = []
    for _ in range(draws):
        first, second = draw(), draw()
        while second == first:
            second = draw()
        pairs.append((first, second))
    return pairs


def estimate_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """cv2.estimateAffinePartial2D(source, target, method=cv2.LMEDS) as facexlib calls it, for 3 or more points:
    of the similarities through OpenCV's sampled pairs, the one with the least median squared error picks the
    inliers (points off by under ~9.9x that median error for five points), then the least-squares similarity over
    the inliers, solved exactly where OpenCV polishes it by Levenberg-Marquardt (they agree to ~1e-5 px)."""
    # OpenCV works on float32 copies of the points
    source = np.asarray(source, np.float32).astype(np.float64)
    target = np.asarray(target, np.float32).astype(np.float64)
    count = len(source)

    def squared_errors(model: np.ndarray) -> np.ndarray:
        return (((source @ model[:, :2].T + model[:, 2]) - target) ** 2).sum(axis=1).astype(np.float32)

    best_median, best_model = math.inf, None
    for pair in _opencv_lmeds_pairs(count):
        model = _fit_similarity(source[list(pair)], target[list(pair)])
        median = np.partition(squared_errors(model), count // 2)[count // 2]
        if median < best_median:
            best_median, best_model = median, model
    sigma = max(2.5 * 1.4826 * (1 + 5 / (count - 2)) * math.sqrt(best_median), 0.001)
    inliers = squared_errors(best_model) <= np.float32(sigma ** 2)
    return _fit_similarity(source[inliers], target[inliers])


def align_face(image: Image.Image, face: Face, size: int = 512) -> AlignedFace:
    """The face warped upright onto a size x size picture, its landmarks on FFHQ's template (facexlib's
    align_warp_face: cv2.warpAffine, bilinear, grey border)."""
    template = FFHQ_TEMPLATE_512 * (size / 512)
    matrix = estimate_similarity(np.asarray(face.landmarks, dtype=np.float64), template)
    coords = np.arange(size, dtype=np.float64)
    warped = _warp(np.asarray(image.convert("RGB")), _invert_affine(matrix), coords, coords, BORDER_RGB)
    return AlignedFace(picture=Image.fromarray(_round_to_uint8(warped)), matrix=matrix)


def _gaussian_kernel(size: int) -> np.ndarray:
    """cv2.getGaussianKernel(size, 0): fixed binomial-like tables up to 7 taps, else sigma from the size."""
    tables = {1: [1.0], 3: [0.25, 0.5, 0.25], 5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
              7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125]}
    if size in tables:
        return np.array(tables[size])
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    kernel = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return kernel / kernel.sum()


def _erode(mask: np.ndarray, size: int) -> np.ndarray:
    """cv2.erode with a size x size square (anchor at its centre, size // 2), outside the picture ignored."""
    if size == 0:
        size = 3  # OpenCV's stand-in for an empty kernel
    return ndimage.minimum_filter(mask, size=size, mode="nearest")


def paste_face(image: Image.Image, restored: Image.Image, matrix: np.ndarray,
               mask: np.ndarray | None = None) -> Image.Image:
    """The picture with `restored` (the restored face, at the size it was aligned at) warped back through the
    inverse of `matrix` (AlignedFace.matrix) and blended under facexlib's use_parse=False mask for
    upscale_factor 1: the face square eroded by 2 pixels, eroded again by 1/10 of the face's width and blurred by
    as much, so the face fades out inside its square; or, given `mask` (face_parsing.face_mask: facexlib's
    use_parse=True, which A1111 asks for), through that mask warped back. Pixels outside the face's square keep their
    values exactly.
    As in facexlib the blend is truncated to integers, here per pasted face. Against facexlib with OpenCV 4.x this
    differs by at most one level: its float32 blur peaks at 0.99999994, never 1, so its truncation takes a level
    off wherever the restored face is brighter than the picture; ours keeps the restored pixel."""
    picture = np.asarray(image.convert("RGB"))
    face = np.asarray(restored.convert("RGB"))
    to_face = np.asarray(matrix, dtype=np.float64)
    region = _pasted_region(_invert_affine(to_face), face.shape[1], face.shape[0], picture.shape[1], picture.shape[0])
    if region is None:
        return image.convert("RGB").copy()
    left, top, right, bottom = region
    xs, ys = np.arange(left, right, dtype=np.float64), np.arange(top, bottom, dtype=np.float64)

    # cv2.warpAffine(M) samples the source at M's inverse; the inverse of the inverse is `to_face` itself
    warped_face = _round_to_uint8(_warp(face, to_face, xs, ys, 0)).astype(np.float32)
    if mask is not None:  # facexlib's use_parse=True: the parsed mask, warped back, is the blend itself
        soft = _warp(mask.astype(np.float32)[..., None], to_face, xs, ys, 0)[..., 0].astype(np.float32)[..., None]
        area = picture[top:bottom, left:right].astype(np.float32)
        out = picture.copy()
        out[top:bottom, left:right] = np.clip(soft * warped_face + (1 - soft) * area, 0, 255).astype(np.uint8)
        return Image.fromarray(out)
    square = _warp(np.ones(face.shape[:2] + (1,), np.float32), to_face, xs, ys, 0)[..., 0].astype(np.float32)
    inner = _erode(square, 2)  # drops the half-covered rim
    edge = int(float(inner.sum()) ** 0.5) // 20
    soft = _erode(inner, edge * 2)
    kernel = _gaussian_kernel(edge * 2 + 1)
    for axis in (0, 1):  # OpenCV's default border for the blur reflects about the edge pixel (scipy's "mirror")
        soft = ndimage.convolve1d(soft, kernel, axis=axis, mode="mirror")

    # The blur reaches one pixel past the square's right and bottom edges (the erosion window is one pixel
    # shorter on that side), where facexlib blends in black and darkens that line by a level: keep it out.
    soft = np.where(inner > 0, soft, 0)[..., None]
    area = picture[top:bottom, left:right].astype(np.float32)
    blended = soft * (inner[..., None] * warped_face) + (1 - soft) * area
    out = picture.copy()
    out[top:bottom, left:right] = np.clip(blended, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _pasted_region(to_picture: np.ndarray, face_w: int, face_h: int, width: int,
                   height: int) -> tuple[int, int, int, int] | None:
    """The picture's rectangle (left, top, right, bottom) the face square can reach, with room for the bilinear
    rim; the mask is zero beyond it, so the erosions and blur computed on it equal facexlib's on the whole
    picture. None where the face lies outside the picture."""
    corners = np.array([[-1, -1, 1], [face_w, -1, 1], [-1, face_h, 1], [face_w, face_h, 1]], dtype=np.float64)
    mapped = corners @ to_picture.T
    left, top = (np.floor(mapped.min(axis=0)) - 2).astype(int)
    right, bottom = (np.ceil(mapped.max(axis=0)) + 3).astype(int)
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    return (left, top, right, bottom) if left < right and top < bottom else None
