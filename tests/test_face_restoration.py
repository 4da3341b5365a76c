"""Restore faces (webui/engine/face_restoration.py): the weight files, the run from detected face to pasted result
(with stand-in networks: the networks themselves are tested in test_gfpgan_net.py, test_codeformer_net.py and
test_face_detection.py), and the feature through the worker, the infotext, the Settings tab, Extras and the API."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import webui.engine.face_detection as face_detection
import webui.engine.face_restoration as face_restoration
from tests.helpers import finished_job
from webui.engine.face_detection import Face
from webui.engine.face_restoration import FaceRestorationError, FaceRestorers
from webui.storage.infotext import request_fields_from_infotext

# FFHQ's five points on its 512x512 face (facexlib's face_template): eyes, nose, mouth corners
TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]])
RED, BLUE = (255, 0, 0), (0, 0, 255)


class PaintingNet(torch.nn.Module):
    """A stand-in restorer that draws every face in one colour, and records the CodeFormer weight it is given."""

    def __init__(self, colour: tuple[int, int, int]):
        super().__init__()
        self.colour = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
        self.weights = []

    def forward(self, faces: torch.Tensor, w: float | None = None, adain: bool = False):
        assert faces.shape[1:] == (3, 512, 512) and -1 <= float(faces.min()) and float(faces.max()) <= 1
        self.weights.append(w)
        painted = self.colour.expand_as(faces)
        return (painted, None, None) if w is not None else painted  # CodeFormer's tuple, GFPGAN's picture


class ClassParser(torch.nn.Module):
    """A stand-in face-parsing network that reads every pixel as one class (1: skin, pasted; 17: hair, not)."""

    def __init__(self, face_class: int = 1):
        super().__init__()
        self.face_class = torch.nn.Parameter(torch.tensor(float(face_class)), requires_grad=False)

    def forward(self, faces: torch.Tensor):
        logits = torch.zeros(faces.shape[0], 19, *faces.shape[2:])
        logits[:, int(self.face_class)] = 1
        return logits, faces


def face_at(scale: float, offset: tuple[float, float]) -> Face:
    """A face whose five points are the template's, scaled and moved (so its aligned face is the template's)."""
    points = TEMPLATE * scale + np.array(offset)
    return Face(box=(*points.min(0) - 20 * scale, *points.max(0) + 20 * scale), score=0.99, landmarks=points)


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """FaceRestorers over folders holding the three files, whose networks are stand-ins, and a detector that finds
    the faces the test puts in `found`."""
    gfpgan, codeformer = tmp_path / "GFPGAN", tmp_path / "Codeformer"
    gfpgan.mkdir()
    codeformer.mkdir()
    for path in (gfpgan / "detection_Resnet50_Final.pth", gfpgan / "parsing_parsenet.pth", gfpgan / "GFPGANv1.4.pth",
                 codeformer / "codeformer-v0.1.0.pth"):
        path.write_bytes(b"weights")
    nets = {"detector": torch.nn.Identity(), "parser": ClassParser(), "GFPGAN": PaintingNet(RED),
            "CodeFormer": PaintingNet(BLUE)}
    loaded = []

    def loader(network):
        def load(path):
            loaded.append(network)
            return nets[network]
        return load

    monkeypatch.setattr(face_restoration, "_LOADERS", {name: loader(name) for name in nets})
    found: list[Face] = []
    monkeypatch.setattr(face_detection, "detect_faces", lambda detector, picture, **_: list(found))
    return FaceRestorers(gfpgan, codeformer, downloads=False), nets, found, loaded


def grey_picture(size=(256, 256)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(100, 156, (size[1], size[0], 3), dtype=np.uint8))


def test_a_face_is_drawn_again_where_it_is_and_nothing_else_changes(stand_ins):
    faces, nets, found, _ = stand_ins
    found.append(face_at(0.25, (60, 50)))
    picture = grey_picture()
    restored = np.asarray(faces.restore(picture, "GFPGAN"), dtype=np.int16)
    original = np.asarray(picture, dtype=np.int16)
    nose = np.round(TEMPLATE[2] * 0.25 + (60, 50)).astype(int)
    assert np.abs(restored[nose[1], nose[0]] - RED).max() <= 2  # the middle of the face: the restorer's
    assert np.array_equal(restored[:20], original[:20]) and np.array_equal(restored[-60:], original[-60:])
    assert np.array_equal(restored[:, -40:], original[:, -40:])  # far from the face: as it was
    assert nets["GFPGAN"].weights == [None]  # GFPGAN takes no weight


def test_codeformer_gets_its_weight_and_every_face_is_restored(stand_ins):
    faces, nets, found, _ = stand_ins
    found += [face_at(0.2, (10, 10)), face_at(0.2, (140, 130))]
    restored = np.asarray(faces.restore(grey_picture(), "codeformer", codeformer_weight=0.7), dtype=np.int16)
    for offset in ((10, 10), (140, 130)):
        nose = np.round(TEMPLATE[2] * 0.2 + offset).astype(int)
        assert np.abs(restored[nose[1], nose[0]] - BLUE).max() <= 2
    assert nets["CodeFormer"].weights == [0.7, 0.7]


def test_a_picture_without_faces_comes_back_as_it_was_and_no_restorer_is_read(stand_ins):
    faces, _, _, loaded = stand_ins
    picture = grey_picture()
    assert np.array_equal(np.asarray(faces.restore(picture, "GFPGAN")), np.asarray(picture))
    assert loaded == ["detector"]


def test_the_networks_are_read_once_and_again_after_forget(stand_ins):
    faces, _, found, loaded = stand_ins
    found.append(face_at(0.25, (60, 50)))
    faces.restore(grey_picture(), "GFPGAN")
    faces.restore(grey_picture(), "GFPGAN")
    assert loaded == ["detector", "GFPGAN", "parser"]
    faces.forget()
    faces.restore(grey_picture(), "GFPGAN")
    assert loaded == ["detector", "GFPGAN", "parser"] * 2


def test_the_face_is_pasted_where_the_parsing_network_sees_face_not_hair(stand_ins):
    """A1111's paste mask comes from face parsing: a face read as hair everywhere leaves the picture as it was."""
    faces, nets, found, _ = stand_ins
    found.append(face_at(0.25, (60, 50)))
    nets["parser"].face_class.fill_(17)
    picture = grey_picture()
    assert np.array_equal(np.asarray(faces.restore(picture, "GFPGAN")), np.asarray(picture))


def test_the_files_are_a1111s_and_a_newer_gfpgan_file_wins(tmp_path):
    faces = FaceRestorers(tmp_path / "GFPGAN", tmp_path / "Codeformer")
    assert faces.weight_file("GFPGAN").path == tmp_path / "GFPGAN" / "GFPGANv1.4.pth"
    assert faces.weight_file("CodeFormer").path == tmp_path / "Codeformer" / "codeformer-v0.1.0.pth"
    assert faces.weight_file("detector").path == tmp_path / "GFPGAN" / "detection_Resnet50_Final.pth"
    assert faces.weight_file("parser").path == tmp_path / "GFPGAN" / "parsing_parsenet.pth"
    (tmp_path / "GFPGAN").mkdir()
    for name in ("GFPGANv1.3.pth", "GFPGANv1.4.pth", "notes.txt"):
        (tmp_path / "GFPGAN" / name).write_bytes(b"x")
    assert faces.weight_file("GFPGAN").path.name == "GFPGANv1.4.pth"
    (tmp_path / "GFPGAN" / "GFPGANv1.4.pth").unlink()
    assert faces.weight_file("GFPGAN").path.name == "GFPGANv1.3.pth"  # the one that is there


def test_checks_name_what_to_fix(tmp_path):
    offline = FaceRestorers(tmp_path / "GFPGAN", tmp_path / "Codeformer", downloads=False)
    with pytest.raises(FaceRestorationError, match="'RestoreFormer' is no face restorer; use one of CodeFormer, GFPGAN"):
        offline.check("RestoreFormer")
    with pytest.raises(FaceRestorationError, match="(?s)GFPGANv1.4.pth is not there.*--offline.*untick Restore faces"):
        offline.check("GFPGAN")
    FaceRestorers(tmp_path / "GFPGAN", tmp_path / "Codeformer", downloads=True).check("GFPGAN")  # downloads at use


def test_a_download_that_is_no_network_leaves_nothing_and_a_good_one_is_kept(tmp_path, monkeypatch):
    def loader(path):
        if path.read_bytes() != b"good":
            raise ValueError("no weights in it")
        return torch.nn.Identity()

    monkeypatch.setattr(face_restoration, "_LOADERS", {"detector": loader})
    source = tmp_path / "served.pth"
    source.write_bytes(b"<html>rate limited</html>")
    monkeypatch.setitem(face_restoration._FILES, "detector", ("detection_Resnet50_Final.pth", source.as_uri()))
    faces = FaceRestorers(tmp_path / "GFPGAN", tmp_path / "Codeformer", downloads=True)
    with pytest.raises(FaceRestorationError, match="(?s)could not download.*no weights in it.*yourself"):
        faces._network("detector", "cpu")
    assert list((tmp_path / "GFPGAN").iterdir()) == []
    source.write_bytes(b"good")
    faces._network("detector", "cpu")
    assert (tmp_path / "GFPGAN" / "detection_Resnet50_Final.pth").read_bytes() == b"good"


def test_a_broken_file_is_refused_naming_it(tmp_path, monkeypatch):
    def broken(path):
        raise ValueError("missing keys: conv_body_first.weight")

    monkeypatch.setattr(face_restoration, "_LOADERS", {"detector": broken})
    (tmp_path / "GFPGAN").mkdir()
    (tmp_path / "GFPGAN" / "detection_Resnet50_Final.pth").write_bytes(b"x")
    faces = FaceRestorers(tmp_path / "GFPGAN", tmp_path / "Codeformer", downloads=False)
    with pytest.raises(FaceRestorationError, match="detection_Resnet50_Final.pth could not be used .*missing keys"):
        faces._network("detector", "cpu")


# --- through the worker, the infotext, Settings, Extras and the API ------------------------------------------------

QUICK = {"prompt": "a portrait", "steps": 2, "seed": 5, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    from tests.helpers import running_services

    yield from running_services(models_dir, tmp_path_factory.mktemp("faces") / "outputs")


@pytest.fixture
def painting(services, stand_ins, monkeypatch):
    """The server's face restorers are the stand-ins, and every picture has one face, in its middle."""
    faces, nets, found, _ = stand_ins
    found.append(face_at(0.08, (12, 8)))
    monkeypatch.setattr(services.engine, "faces", faces)
    return nets


def middle(image: Image.Image) -> np.ndarray:
    nose = np.round(TEMPLATE[2] * 0.08 + (12, 8)).astype(int)
    return np.asarray(image.convert("RGB"), dtype=np.int16)[nose[1], nose[0]]


def test_a_job_restores_faces_with_the_settings_restorer_and_says_so(services, painting):
    plain = finished_job(services, QUICK).images[0]
    assert "Face restoration" not in plain.infotext
    assert request_fields_from_infotext(plain.infotext)["restore_faces"] is False
    restored = finished_job(services, QUICK | {"restore_faces": True}).images[0]
    assert np.abs(middle(restored.image) - BLUE).max() <= 2  # CodeFormer, A1111's default
    assert "Face restoration: CodeFormer," in restored.infotext
    assert painting["CodeFormer"].weights == [0.5]
    pasted = request_fields_from_infotext(restored.infotext)
    assert (pasted["restore_faces"], pasted["face_restoration_model"]) == (True, "CodeFormer")
    services.worker.options.update({"face_restoration_model": "GFPGAN", "code_former_weight": 0.2})
    try:
        gfpgan = finished_job(services, QUICK | {"restore_faces": True}).images[0]
        own = finished_job(services, QUICK | {"restore_faces": True, "face_restoration_model": "CodeFormer",
                                              "code_former_weight": 0.9}).images[0]
    finally:
        services.worker.options.update({"face_restoration_model": "CodeFormer", "code_former_weight": 0.5})
    assert np.abs(middle(gfpgan.image) - RED).max() <= 2 and "Face restoration: GFPGAN," in gfpgan.infotext
    assert "Face restoration: CodeFormer," in own.infotext and painting["CodeFormer"].weights[-1] == 0.9


def test_a_job_whose_restorer_cannot_run_is_refused_before_it_queues(services, tmp_path, monkeypatch):
    from webui.schemas import InvalidRequest

    monkeypatch.setattr(services.engine, "faces", FaceRestorers(tmp_path / "G", tmp_path / "C", downloads=False))
    with pytest.raises(InvalidRequest, match="is not there and this server does not download"):
        services.worker.submit(QUICK | {"restore_faces": True})
    with pytest.raises(InvalidRequest, match="face_restoration_model"):
        services.worker.submit(QUICK | {"restore_faces": True, "face_restoration_model": "Restoreformer"})


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_api_restores_faces_and_lists_the_restorers(services, painting):
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    with TestClient(create_api_app(services)) as client:
        listed = client.get("/sdapi/v1/face-restorers").json()
        asked = client.post("/sdapi/v1/txt2img", json=QUICK | {"restore_faces": True, "override_settings": {
            "face_restoration_model": "gfpgan"}})
        pasted = client.post("/sdapi/v1/txt2img", json={"infotext": "a face\nSteps: 2, Sampler: Euler, Seed: 4, "
                                                                   "Size: 64x64, Face restoration: CodeFormer"})
        bad = client.post("/sdapi/v1/txt2img", json=QUICK | {"restore_faces": True, "override_settings": {
            "face_restoration_model": "Restoreformer"}})
        extras = client.post("/sdapi/v1/extra-single-image", json={
            "image": png_b64(grey_picture((64, 64))), "upscaler_1": "None", "gfpgan_visibility": 1,
            "codeformer_visibility": 0.5, "codeformer_weight": 0.25})
    assert [(item["name"], item["cmd_dir"].rsplit("/", 1)[-1]) for item in listed] == [
        ("CodeFormer", "Codeformer"), ("GFPGAN", "GFPGAN")]
    assert asked.status_code == 200, asked.text[:300]
    info = json.loads(asked.json()["info"])
    assert (info["restore_faces"], info["face_restoration_model"]) == (True, "GFPGAN")
    assert "Face restoration: GFPGAN," in info["infotexts"][0]
    assert "Face restoration: CodeFormer," in pasted.json()["info"], pasted.text[:300]
    assert bad.status_code == 422 and "override_settings.face_restoration_model:" in bad.json()["detail"]
    assert extras.status_code == 200, extras.text[:300]
    assert "GFPGAN visibility: 1, CodeFormer visibility: 0.5, CodeFormer weight: 0.25" in extras.json()["html_info"]
    result = Image.open(io.BytesIO(base64.b64decode(extras.json()["image"])))
    # GFPGAN's red face, then half of CodeFormer's blue over it
    assert np.abs(middle(result) - np.array([127.5, 0, 127.5])).max() <= 2
    assert painting["CodeFormer"].weights == [0.5, 0.25]  # the pasted job (the Settings weight), then Extras


def test_the_pages_have_the_controls(services):
    from webui.ui.blocks import create_ui

    ui = create_ui(services)
    for kind, tab in (("txt2img", ui.txt2img), ("img2img", ui.img2img)):
        assert tab.widgets["restore_faces"].elem_id == f"{kind}_restore_faces" and "restore_faces" in tab.field_names
    assert ui.settings.widgets["face_restoration_model"].choices == [("CodeFormer", "CodeFormer"), ("GFPGAN", "GFPGAN")]
    assert {"gfpgan_visibility", "codeformer_visibility", "codeformer_weight"} <= set(ui.extras.actions.labels)


def test_the_plot_has_a1111s_face_restore_axis():
    from webui.xyz_plot import plan, read_axis

    axes = [read_axis("X", "Face restore", "No, Yes, GFPGAN"), read_axis("Y", "Nothing", ""),
            read_axis("Z", "Nothing", "")]
    cells = [cell.request for cell in plan(QUICK, axes).cells]
    assert [cell["restore_faces"] for cell in cells] == [False, True, True]
    assert cells[2]["face_restoration_model"] == "GFPGAN" and cells[1].get("face_restoration_model") is None


def test_a_real_gfpgan_network_draws_a_face_of_the_aligned_size():
    """The run's call fits GFPGAN's own network (a narrow one, random weights): a 512 face in, a 512 face out."""
    from webui.engine.gfpgan_net import GFPGANv1Clean

    face = Image.fromarray(np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    drawn = face_restoration._draw_again(GFPGANv1Clean(narrow=0.125).eval(), face, "GFPGAN", 0.5, "cpu")
    assert drawn.size == (512, 512) and drawn.mode == "RGB" and np.asarray(drawn).std() > 0


def test_extras_answers_a_restorer_that_cannot_be_downloaded_as_the_clients_to_fix(services, tmp_path, monkeypatch):
    """txt2img's Restore faces answered 422 for it; Extras a 500 with a traceback in the log. Found by a probe."""
    from fastapi.testclient import TestClient
    from webui.api import create_api_app

    for name, (file_name, _url) in list(face_restoration._FILES.items()):
        monkeypatch.setitem(face_restoration._FILES, name, (file_name, (tmp_path / "nowhere" / file_name).as_uri()))
    monkeypatch.setattr(services.engine, "faces", FaceRestorers(tmp_path / "GFPGAN", tmp_path / "Codeformer",
                                                                downloads=True))
    with TestClient(create_api_app(services)) as client:
        r = client.post("/sdapi/v1/extra-single-image", json={
            "image": png_b64(grey_picture((64, 64))), "upscaler_1": "None", "gfpgan_visibility": 1})
    assert r.status_code == 422 and r.json()["error"] == "InvalidRequest", r.text[:300]
    assert "could not download" in r.json()["detail"]
