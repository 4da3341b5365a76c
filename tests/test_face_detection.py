"""Face detection for face restoration: RetinaFace's layout, anchors and decoding worked out by hand, NMS, the
detect -> align -> paste steps on pictures whose answers are known."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from webui.engine.face_detection import (FFHQ_TEMPLATE_512, Face, RetinaFace, align_face, decode_boxes,
                                         decode_landmarks, detect_faces, estimate_similarity, load_detector, nms,
                                         paste_face, prior_boxes, resize_lanczos4)

FIXTURE = Path(__file__).parent / "data" / "retinaface_resnet50_keys.json"
TINY = dict(base=8, blocks=(1, 1, 1, 1), channels=16)


def tiny_detector(seed: int = 0) -> RetinaFace:
    torch.manual_seed(seed)
    return RetinaFace(**TINY).eval()


def similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    turn = math.radians(degrees)
    return np.array([[scale * math.cos(turn), -scale * math.sin(turn), shift[0]],
                     [scale * math.sin(turn), scale * math.cos(turn), shift[1]]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


# --- the network -------------------------------------------------------------------------------------------------

def test_tiny_network_gives_one_prediction_per_anchor():
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        boxes, scores, landmarks = tiny_detector()(x)
    anchors = 2 * (8 * 12 + 4 * 6 + 2 * 3)  # two anchors per cell at strides 8, 16, 32
    assert boxes.shape == (1, anchors, 4) and scores.shape == (1, anchors, 2) and landmarks.shape == (1, anchors, 10)
    assert prior_boxes(64, 96).shape == (anchors, 4)
    torch.testing.assert_close(scores.sum(-1), torch.ones(1, anchors))


def test_odd_sizes_round_the_grids_up():
    x = torch.randn(1, 3, 33, 65)
    with torch.no_grad():
        boxes, _, _ = tiny_detector()(x)
    assert boxes.shape[1] == prior_boxes(33, 65).shape[0] == 2 * (5 * 9 + 3 * 5 + 2 * 3)


def test_published_configuration_has_exactly_the_files_keys_and_shapes():
    expected = json.loads(FIXTURE.read_text())
    with torch.device("meta"):
        model = RetinaFace()
    found = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(found) ^ set(expected)) == []
    assert {key: shape for key, shape in found.items() if expected[key] != shape} == {}


def test_narrow_layers_leak_and_the_published_ones_do_not():
    # RetinaFace's rule (FPN and SSH): LeakyReLU 0.1 at 64 channels or fewer, plain ReLU at the published 256
    with torch.device("meta"):
        published = RetinaFace()
    assert published.fpn.merge1[2].negative_slope == 0 and published.ssh1.conv5X5_1[2].negative_slope == 0
    tiny = tiny_detector()
    assert tiny.fpn.merge1[2].negative_slope == 0.1 and tiny.ssh3.conv7X7_2[2].negative_slope == 0.1


# --- anchors, decoding, NMS -----------------------------------------------------------------------------------------

def test_prior_boxes_by_hand():
    priors = prior_boxes(32, 64).numpy()
    assert priors.shape == (2 * (4 * 8 + 2 * 4 + 1 * 2), 4)
    # stride 8: first cell's centre (4, 4) px, sides 16 and 32 px, as fractions of 64 x 32
    np.testing.assert_allclose(priors[0], [4 / 64, 4 / 32, 16 / 64, 16 / 32])
    np.testing.assert_allclose(priors[1], [4 / 64, 4 / 32, 32 / 64, 32 / 32])
    np.testing.assert_allclose(priors[2], [12 / 64, 4 / 32, 16 / 64, 16 / 32])  # next column
    np.testing.assert_allclose(priors[16], [4 / 64, 12 / 32, 16 / 64, 16 / 32])  # next row
    np.testing.assert_allclose(priors[64], [8 / 64, 8 / 32, 64 / 64, 64 / 32])  # stride 16 starts after 2x32
    np.testing.assert_allclose(priors[81], [16 / 64, 16 / 32, 512 / 64, 512 / 32])  # stride 32, second size


def test_decoding_by_hand():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    offsets = torch.tensor([[1.0, -1.0, 0.0, math.log(2) / 0.2]])
    # centre moves by offset x 0.1 x prior side; the side scales by exp(offset x 0.2)
    torch.testing.assert_close(decode_boxes(offsets, prior), torch.tensor([[0.42, 0.06, 0.62, 0.86]]))
    landmark_offsets = torch.tensor([[1.0, 2.0, 0.0, 0.0, -1.0, 0.0, 0.0, -2.0, 0.5, 0.5]])
    torch.testing.assert_close(decode_landmarks(landmark_offsets, prior),
                               torch.tensor([[[0.52, 0.58], [0.5, 0.5], [0.48, 0.5], [0.5, 0.42], [0.51, 0.52]]]))


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    # box 3 (best) overlaps box 0 at IoU 50/100 = 0.5 > 0.4: box 0 goes; box 1 meets box 3 at 36/114 and stays
    assert nms(boxes, scores, 0.4).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]  # IoU equal to the threshold is kept
    assert nms(boxes[:0], scores[:0], 0.4).tolist() == []


# --- resizing ---------------------------------------------------------------------------------------------------

def test_lanczos_resize_keeps_flat_colour_and_follows_a_ramp():
    flat = np.full((50, 70, 3), (10, 120, 250), np.uint8)
    assert (resize_lanczos4(flat, 90, 64) == flat[0, 0]).all()
    ramp = np.repeat(np.arange(0, 200, 2, dtype=np.uint8)[None, :, None], 8, axis=0).repeat(3, axis=2)
    doubled = resize_lanczos4(ramp, 200, 8).astype(int)
    # output pixel x sits at source position (x + 0.5) / 2 - 0.5, where the ramp is worth twice that
    expected = 2 * ((np.arange(200) + 0.5) / 2 - 0.5)
    assert np.abs(doubled[4, 8:-8, 0] - expected[8:-8]).max() <= 1
    assert resize_lanczos4(flat, 70, 50) is not flat


# --- detection end to end -------------------------------------------------------------------------------------------

def test_detection_decodes_a_known_prediction_to_picture_coordinates(monkeypatch):
    detector = tiny_detector()
    picture = Image.new("RGB", (480, 320), (10, 20, 30))  # resize=640: the short side doubles, to 960 x 640
    anchors = prior_boxes(640, 960).shape[0]
    # stride 32, row 3, column 5, first size (256 px): centre (5.5 x 32, 3.5 x 32) = (176, 112) at 960 x 640
    chosen = 2 * (80 * 120) + 2 * (40 * 60) + 2 * (3 * 30 + 5)
    face_offsets = torch.tensor([-1.0, -0.5, 1.0, -0.5, 0.0, 0.0, -0.5, 1.0, 0.5, 1.0])
    seen = {}

    def fake_forward(x):
        seen["x"] = x
        boxes, landmarks = torch.zeros(1, anchors, 4), torch.zeros(1, anchors, 10)
        scores = torch.tensor([1.0, 0.0]).repeat(1, anchors, 1)
        scores[0, chosen] = torch.tensor([0.01, 0.99])
        landmarks[0, chosen] = face_offsets
        scores[0, chosen + 2] = torch.tensor([0.02, 0.98])  # next cell, 32 px on: IoU 0.78, NMS drops it
        landmarks[0, chosen + 2] = face_offsets
        scores[0, chosen + 10] = torch.tensor([0.005, 0.995])  # eyes on one point: dropped by eye distance
        scores[0, chosen - 20] = torch.tensor([0.03, 0.97])  # row 2, column 25: not above 0.97 (the threshold)
        landmarks[0, chosen - 20] = face_offsets
        return boxes, scores, landmarks

    monkeypatch.setattr(detector, "forward", fake_forward)
    faces = detect_faces(detector, picture)

    assert seen["x"].shape == (1, 3, 640, 960)
    # BGR order minus the mean (104, 117, 123)
    torch.testing.assert_close(seen["x"][0, :, 300, 400], torch.tensor([30 - 104.0, 20 - 117.0, 10 - 123.0]))
    assert len(faces) == 1
    face = faces[0]
    np.testing.assert_allclose(face.box, [(176 - 128) / 2, (112 - 128) / 2, (176 + 128) / 2, (112 + 128) / 2],
                               atol=1e-4)
    assert face.score == pytest.approx(0.99)
    # each landmark: centre + offset x 0.1 x 256, then halved back to the picture's size
    expected = (np.array([176.0, 112.0]) + face_offsets.numpy().reshape(5, 2) * 25.6) / 2
    np.testing.assert_allclose(face.landmarks, expected, atol=1e-4)


def test_a_random_detector_returns_well_formed_faces():
    detector = tiny_detector(seed=1)
    with torch.no_grad():
        for head in detector.ClassHead:  # every anchor confident, so NMS and the eye filter have work to do
            head.conv1x1.bias.copy_(torch.tensor([-6.0, 6.0, -6.0, 6.0]))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    faces = detect_faces(detector, picture, resize=96)
    assert faces
    boxes = np.array([face.box for face in faces])
    scores = [face.score for face in faces]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.97
    assert all(face.landmarks.shape == (5, 2) and np.isfinite(face.landmarks).all() for face in faces)
    assert all(np.linalg.norm(face.landmarks[0] - face.landmarks[1]) >= 5 for face in faces)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert len(nms(boxes.astype(np.float32), np.array(scores, np.float32), 0.4)) == len(faces)  # none overlap


def test_no_faces_from_an_undecided_score_head():
    detector = tiny_detector()
    with torch.no_grad():
        for head in detector.ClassHead:
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.zero_()  # every anchor 50/50
    assert detect_faces(detector, Image.new("RGB", (64, 48), (200, 150, 100))) == []


# --- alignment and pasting -------------------------------------------------------------------------------------

def test_similarity_fit_recovers_an_exact_transform_and_ignores_a_wild_landmark():
    truth = similarity(0.6, 25, (40.0, -12.0))
    landmarks = apply(np.linalg.inv(np.vstack([truth, [0, 0, 1]]))[:2], FFHQ_TEMPLATE_512)
    np.testing.assert_allclose(estimate_similarity(landmarks, FFHQ_TEMPLATE_512), truth, atol=1e-4)
    wild = landmarks.copy()
    wild[2] += (150.0, 90.0)  # the nose far off: LMedS leaves it out of the fit
    np.testing.assert_allclose(estimate_similarity(wild, FFHQ_TEMPLATE_512), truth, atol=1e-4)


def test_alignment_puts_the_landmarks_on_the_template():
    to_picture = similarity(0.5, -20, (90.0, 60.0))  # template -> picture: a face about 256 px wide, tilted
    landmarks = apply(to_picture, FFHQ_TEMPLATE_512)
    canvas = np.zeros((400, 420, 3), np.uint8)
    yy, xx = np.mgrid[0:400, 0:420]
    for x, y in landmarks:  # a bright disc of radius 4 at each landmark
        canvas[(xx - x) ** 2 + (yy - y) ** 2 <= 16] = 255
    aligned = align_face(Image.fromarray(canvas), Face(box=(0, 0, 1, 1), score=1.0, landmarks=landmarks))

    assert aligned.picture.size == (512, 512) and aligned.picture.mode == "RGB"
    to_face_back = np.linalg.inv(np.vstack([aligned.matrix, [0, 0, 1]]))[:2]
    assert np.abs(apply(to_face_back, FFHQ_TEMPLATE_512) - landmarks).max() < 1
    face = np.asarray(aligned.picture)[:, :, 0].astype(float)
    fy, fx = np.mgrid[0:512, 0:512]
    for x, y in FFHQ_TEMPLATE_512:  # each disc (now radius 8) centred on its template point
        near = ((fx - x) ** 2 + (fy - y) ** 2 <= 20 ** 2) * face
        centre = np.array([(near * fx).sum(), (near * fy).sum()]) / near.sum()
        assert np.abs(centre - (x, y)).max() < 1


def test_alignment_fills_beyond_the_picture_with_grey():
    landmarks = apply(similarity(0.5, 0, (-60.0, -60.0)), FFHQ_TEMPLATE_512)  # face hanging off the top left
    aligned = align_face(Image.new("RGB", (200, 200), (255, 0, 0)), Face((0, 0, 1, 1), 1.0, landmarks))
    pixels = np.asarray(aligned.picture)
    assert tuple(pixels[5, 5]) == (132, 133, 135)
    assert tuple(pixels[400, 400]) == (255, 0, 0)


def test_paste_takes_the_restored_face_inside_and_leaves_the_rest():
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (600, 640, 3), dtype=np.uint8)
    restored = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    matrix = similarity(1.0, 0, (-40.0, -30.0))  # the face square sits at x 40..551, y 30..541 of the picture
    out = np.asarray(paste_face(Image.fromarray(picture), Image.fromarray(restored), matrix))

    # the middle of the square is all restored face (mask 1); the mask fades out over ~1/10 of the width
    np.testing.assert_array_equal(out[30 + 110:30 + 400, 40 + 110:40 + 400], restored[110:400, 110:400])
    outside = np.ones(picture.shape[:2], bool)
    outside[30:542, 40:552] = False
    np.testing.assert_array_equal(out[outside], picture[outside])


def test_paste_of_a_tilted_face_changes_only_its_square():
    picture = np.full((300, 320, 3), 50, np.uint8)
    restored = Image.new("RGB", (512, 512), (200, 180, 160))
    matrix = np.linalg.inv(np.vstack([similarity(0.4, 30, (150.0, 20.0)), [0, 0, 1]]))[:2]  # picture -> face
    out = np.asarray(paste_face(Image.fromarray(picture), restored, matrix))
    changed = np.argwhere((out != picture).any(axis=-1))
    assert len(changed)
    in_face = apply(matrix, changed[:, ::-1].astype(float))
    assert (in_face > -1).all() and (in_face < 512).all()
    centre = np.round(apply(np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2], np.array([[256.0, 256.0]]))[0])
    assert tuple(out[int(centre[1]), int(centre[0])]) == (200, 180, 160)


def test_paste_of_a_face_off_the_picture_changes_nothing():
    picture = Image.new("RGB", (64, 64), (1, 2, 3))
    out = paste_face(picture, Image.new("RGB", (512, 512)), similarity(1.0, 0, (1000.0, 1000.0)))
    assert out.tobytes() == picture.tobytes()


# --- loading ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["det.pth", "det.safetensors"])
def test_load_round_trips_and_strips_the_dataparallel_prefix(tmp_path, name):
    model = tiny_detector(seed=3)
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    path = tmp_path / name
    save_file(state, str(path)) if name.endswith(".safetensors") else torch.save(state, path)
    loaded = load_detector(path, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for mine, theirs in zip(loaded(x), model(x)):
            torch.testing.assert_close(mine, theirs)


def test_load_accepts_a_file_without_batchnorm_counters(tmp_path):
    state = {k: v for k, v in tiny_detector().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    assert isinstance(load_detector(tmp_path / "old.pth", **TINY), RetinaFace)


def test_a_mismatched_file_is_refused_with_the_reason(tmp_path):
    state = tiny_detector().state_dict()
    state.pop("fpn.merge1.0.weight")
    state["extra.weight"] = torch.zeros(1)
    state["ClassHead.0.conv1x1.bias"] = torch.zeros(6)
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth.*missing fpn\.merge1\.0\.weight.*unexpected extra\.weight"
                                         r".*ClassHead\.0\.conv1x1\.bias is \[6\], expected \[4\]"):
        load_detector(tmp_path / "other.pth", **TINY)


def test_a_file_that_is_no_weights_is_refused(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken\.pth"):
        load_detector(tmp_path / "broken.pth", **TINY)
