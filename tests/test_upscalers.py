"""Model upscalers (ESRGAN, Real-ESRGAN): networks built from weights alone, the folder's names, passes and sizes."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
import pytest
from PIL import Image
from safetensors.torch import save_file

from webui.engine.upscaler_nets import RRDBNet, SRVGGNetCompact, UpscalerFileError, build_network, upscale_tensor
from webui.engine.upscalers import REAL_ESRGAN_FILES, UpscalerError, UpscalerLibrary, picture_upscalers
from webui.schemas import InvalidRequest


def rrdb_weights(features=4, growth=2, blocks=1, ups=2, unfold=1, seed=0) -> dict[str, torch.Tensor]:
    """A random RRDBNet in BasicSR's layout (conv_up1, conv_up2, ...), small weights so values stay sane."""
    gen = torch.Generator().manual_seed(seed)

    def conv(out_c, in_c):
        return {"weight": torch.randn(out_c, in_c, 3, 3, generator=gen) * 0.1, "bias": torch.randn(out_c, generator=gen) * 0.1}

    layers = {"conv_first": conv(features, 3 * unfold * unfold)}
    for b in range(blocks):
        for r in (1, 2, 3):
            for c in range(1, 6):
                out_c = features if c == 5 else growth
                layers[f"body.{b}.rdb{r}.conv{c}"] = conv(out_c, features + (c - 1) * growth)
    layers["conv_body"] = conv(features, features)
    for u in range(ups):
        layers[f"conv_up{u + 1}"] = conv(features, features)
    layers["conv_hr"] = conv(features, features)
    layers["conv_last"] = conv(3, features)
    return {f"{name}.{kind}": value for name, kinds in layers.items() for kind, value in kinds.items()}


def esrgan_layout(basicsr: dict[str, torch.Tensor], ups: int) -> dict[str, torch.Tensor]:
    """The same weights under the original ESRGAN's sequential `model.N` names (upsample, conv, act per doubling)."""
    old = {}
    for key, value in basicsr.items():
        name, kind = key.rsplit(".", 1)
        if name == "conv_first":
            old[f"model.0.{kind}"] = value
        elif name.startswith("body."):
            _, b, rdb, conv = name.split(".")
            old[f"model.1.sub.{b}.{rdb.upper()}.{conv}.0.{kind}"] = value
        elif name == "conv_body":
            blocks = 1 + max(int(k.split(".")[1]) for k in basicsr if k.startswith("body."))
            old[f"model.1.sub.{blocks}.{kind}"] = value
        elif name.startswith("conv_up"):
            old[f"model.{3 * int(name[-1])}.{kind}"] = value  # model.3, model.6: after each Upsample
        elif name == "conv_hr":
            old[f"model.{3 * ups + 2}.{kind}"] = value
        elif name == "conv_last":
            old[f"model.{3 * ups + 4}.{kind}"] = value
    return old


def reference_rrdbnet(weights: dict[str, torch.Tensor], x: torch.Tensor, ups: int, unfold: int = 1) -> torch.Tensor:
    """ESRGAN's forward written out with F.conv2d over the weight table, as the papers describe it."""
    def conv(name, t):
        return F.conv2d(t, weights[f"{name}.weight"], weights[f"{name}.bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    if unfold > 1:
        x = F.pixel_unshuffle(x, unfold)
    feat = conv("conv_first", x)
    trunk = feat
    blocks = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("body."))
    for b in range(blocks):
        block_in = trunk
        for r in (1, 2, 3):
            dense_in, xs = trunk, [trunk]
            for c in range(1, 5):
                xs.append(lrelu(conv(f"body.{b}.rdb{r}.conv{c}", torch.cat(xs, 1))))
            trunk = conv(f"body.{b}.rdb{r}.conv5", torch.cat(xs, 1)) * 0.2 + dense_in
        trunk = trunk * 0.2 + block_in
    feat = feat + conv("conv_body", trunk)
    for u in range(ups):
        feat = lrelu(conv(f"conv_up{u + 1}", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("conv_hr", feat)))


def test_rrdbnet_matches_the_written_out_forward_in_both_layouts():
    weights = rrdb_weights(blocks=2)
    x = torch.rand(1, 3, 10, 12, generator=torch.Generator().manual_seed(1))
    expected = reference_rrdbnet(weights, x, ups=2)
    for state in (dict(weights), esrgan_layout(weights, ups=2)):
        network = build_network(state, "tiny")
        assert isinstance(network, RRDBNet) and network.scale == 4
        torch.testing.assert_close(network(x), expected)


def test_real_esrgan_2x_folds_the_picture_first_and_pads_odd_sides():
    weights = rrdb_weights(unfold=2)
    network = build_network({"params_ema": weights}["params_ema"], "2x")
    assert network.scale == 2
    x = torch.rand(1, 3, 8, 10, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(network(x), reference_rrdbnet(weights, x, ups=2, unfold=2))
    assert network(torch.rand(1, 3, 7, 9)).shape[-2:] == (14, 18)


def test_compact_network_adds_its_residual_to_the_nearest_enlargement():
    features, scale = 4, 4
    state = {"body.0.weight": torch.randn(features, 3, 3, 3) * 0.1, "body.0.bias": torch.zeros(features),
             "body.1.weight": torch.full((features,), 0.25),
             "body.2.weight": torch.randn(features, features, 3, 3) * 0.1, "body.2.bias": torch.zeros(features),
             "body.3.weight": torch.full((features,), 0.25),
             "body.4.weight": torch.zeros(3 * scale * scale, features, 3, 3), "body.4.bias": torch.zeros(48)}
    network = build_network(state, "compact")
    assert isinstance(network, SRVGGNetCompact) and network.scale == 4
    x = torch.rand(1, 3, 5, 6)
    # the last conv is zero: what is left is the input, each pixel a 4x4 square
    torch.testing.assert_close(network(x), x.repeat_interleave(4, 2).repeat_interleave(4, 3))
    state["body.4.bias"] = torch.full((48,), 0.5)
    network.load_state_dict(state)
    torch.testing.assert_close(network(x), x.repeat_interleave(4, 2).repeat_interleave(4, 3) + 0.5)


def test_files_of_other_kinds_are_refused_with_what_is_read():
    with pytest.raises(UpscalerFileError, match="RRDBNet and SRVGGNetCompact"):
        build_network({"layers.0.residual_group.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, "swinir")
    relu_compact = {"body.0.weight": torch.zeros(4, 3, 3, 3), "body.0.bias": torch.zeros(4),
                    "body.2.weight": torch.zeros(48, 4, 3, 3), "body.2.bias": torch.zeros(48)}  # no PReLU at body.1
    with pytest.raises(UpscalerFileError, match="without PReLU"):
        build_network(relu_compact | {"body.1.weight": torch.zeros(4, 4, 3, 3)}, "relu")
    broken = rrdb_weights()
    broken["conv_hr.weight"] = torch.zeros(4, 5, 3, 3)
    with pytest.raises(UpscalerFileError, match="do not fit"):
        build_network(broken, "broken")


def test_tiles_with_a_margin_give_the_whole_pass():
    network = build_network(rrdb_weights(blocks=1, ups=1, seed=3), "tiny")  # 2x
    x = torch.rand(1, 3, 37, 29, generator=torch.Generator().manual_seed(4))
    whole = network(x).clamp(0, 1)
    # the network sees 17 convolutions deep at the input size and 3 after, so a margin of 24 covers it all
    torch.testing.assert_close(upscale_tensor(network, x, tile=16, margin=24), whole)
    assert not torch.allclose(upscale_tensor(network, x, tile=16, margin=0), whole)


@pytest.fixture
def folders(tmp_path):
    esrgan, real = tmp_path / "ESRGAN", tmp_path / "RealESRGAN"
    esrgan.mkdir()
    real.mkdir()
    return esrgan, real


def test_names_follow_a1111_and_downloadables_only_when_online(folders):
    esrgan, real = folders
    torch.save(rrdb_weights(), esrgan / "4x-Tiny.pth")
    save_file(rrdb_weights(unfold=2), str(real / "RealESRGAN_x2plus.pth"))
    (esrgan / "notes.txt").write_text("not a model")
    offline = UpscalerLibrary(esrgan, real, downloads=False)
    assert offline.names() == ["4x-Tiny", "R-ESRGAN 2x+"]
    assert picture_upscalers(offline) == ["None", "Lanczos", "Nearest", "4x-Tiny", "R-ESRGAN 2x+"]
    online = UpscalerLibrary(esrgan, real, downloads=True)
    assert online.names()[:2] == ["4x-Tiny", "R-ESRGAN 2x+"]
    assert set(online.names()) == {"4x-Tiny", *REAL_ESRGAN_FILES}
    with pytest.raises(UpscalerError, match="no upscaler 'R-ESRGAN 4x\\+'.*4x-Tiny"):
        offline.check("R-ESRGAN 4x+")


def test_resize_passes_until_large_enough_then_lanczos(folders):
    esrgan, real = folders
    torch.save({"params_ema": rrdb_weights(ups=1)}, esrgan / "2x-Tiny.pth")  # BasicSR's wrapper
    library = UpscalerLibrary(esrgan, real, downloads=False)
    picture = Image.new("RGB", (10, 6), (200, 40, 90))
    calls = []
    network = library.network(library.find("2x-Tiny"))
    network.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape[-2:])))
    assert library.resize(picture, (30, 18), "2x-Tiny").size == (30, 18)
    assert calls == [(6, 10), (12, 20)]  # 2x twice reaches 40x24, then Lanczos down to 30x18
    calls.clear()
    assert library.resize(picture, (10, 6), "2x-Tiny").size == (10, 6)
    assert calls == [(6, 10)]  # the picture's own size: one pass, as A1111 runs a model at scale 1
    assert library.resize(picture, (20, 12), "Nearest").getpixel((5, 5)) == (200, 40, 90)


def test_a_changed_file_is_built_again_and_a_broken_one_refused(folders):
    esrgan, real = folders
    path = esrgan / "x.pth"
    torch.save(rrdb_weights(ups=1), path)
    library = UpscalerLibrary(esrgan, real, downloads=False)
    first = library.network(library.find("x"))
    torch.save(rrdb_weights(ups=2), path)
    os.utime(path, ns=(1, 1))  # a stamp unlike the first file's, however fast the test writes
    assert library.network(library.find("x")).scale == 4 and first.scale == 2
    path.write_bytes(b"<html>not found</html>")
    os.utime(path, ns=(2, 2))
    with pytest.raises(UpscalerError, match="upscaler x: x.pth could not be read"):
        library.check("x")


def test_a_missing_release_file_is_downloaded_whole(folders, tmp_path, monkeypatch):
    esrgan, real = folders
    source = tmp_path / "release.pth"
    torch.save({"params_ema": rrdb_weights(ups=2)}, source)
    monkeypatch.setitem(REAL_ESRGAN_FILES, "R-ESRGAN 4x+", ("RealESRGAN_x4plus.pth", source.as_uri()))
    library = UpscalerLibrary(esrgan, real, downloads=True)
    assert library.network(library.find("R-ESRGAN 4x+")).scale == 4
    assert (real / "RealESRGAN_x4plus.pth").read_bytes() == source.read_bytes()
    monkeypatch.setitem(REAL_ESRGAN_FILES, "R-ESRGAN 2x+", ("RealESRGAN_x2plus.pth", (tmp_path / "gone").as_uri()))
    with pytest.raises(UpscalerError, match="could not download .*download it yourself"):
        library.network(library.find("R-ESRGAN 2x+"))
    assert sorted(p.name for p in real.iterdir()) == ["RealESRGAN_x4plus.pth"]  # no partial file left


# --- where the model upscalers are used ---------------------------------------------------------------
@pytest.fixture
def upscaling_services(models_dir, tmp_path):
    """Services whose ESRGAN folder holds a tiny 2x network, "2x-Tiny" (the shared models folder stays as it is)."""
    from tests.conftest import TINY
    from webui.config import Settings
    from webui.services import build_services

    esrgan = tmp_path / "ESRGAN"
    esrgan.mkdir()
    torch.save({"params_ema": rrdb_weights(ups=1, seed=7)}, esrgan / "2x-Tiny.pth")
    settings = Settings(models_dir=models_dir, outdir=tmp_path / "outputs", ckpt=TINY, device="cpu",
                        esrgan_dir=esrgan, real_esrgan_dir=tmp_path / "RealESRGAN", offline=True)
    built = build_services(settings)
    yield built
    built.close()


def spy_network(services, name="2x-Tiny") -> list[tuple[int, int]]:
    """The (height, width) of each picture the named network is run on, from now on."""
    library = services.engine.upscalers
    seen = []
    library.network(library.find(name)).register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[-2:])))
    return seen


def finished(services, request, **kwargs):
    from webui.schemas import JobState

    job = services.worker.submit(request, **kwargs)
    assert job.wait(120) and job.state is JobState.DONE, job.error
    return job


def test_the_hires_fix_enlarges_the_first_pass_with_a_model_upscaler(upscaling_services):
    from webui.storage.infotext import request_fields_from_infotext

    seen = spy_network(upscaling_services)
    hires = {"prompt": "a red apple", "steps": 3, "seed": 5, "width": 64, "height": 64, "enable_hr": True,
             "denoising_strength": 0.5, "hr_scale": 1.5, "save_images": False}
    job = finished(upscaling_services, hires | {"hr_upscaler": "2x-Tiny"})
    assert seen == [(64, 64)]  # once, on the first pass's picture (2x gives 128, Lanczos then 96)
    assert job.images[0].image.size == (96, 96)
    assert "Hires upscaler: 2x-Tiny" in job.images[0].infotext
    assert request_fields_from_infotext(job.images[0].infotext)["hr_upscaler"] == "2x-Tiny"
    lanczos = finished(upscaling_services, hires | {"hr_upscaler": "Lanczos"})
    assert np.abs(np.asarray(job.images[0].image, np.int16) - np.asarray(lanczos.images[0].image, np.int16)).mean() > 1


def test_sd_upscale_enlarges_with_a_model_upscaler(upscaling_services):
    from tests.helpers import noise_picture

    seen = spy_network(upscaling_services)
    request = {"prompt": "a barn", "steps": 3, "seed": 7, "width": 64, "height": 64, "denoising_strength": 0.3,
               "sd_upscale": True, "sd_upscale_scale": 2, "sd_upscale_upscaler": "2x-Tiny", "sd_upscale_overlap": 16,
               "save_images": False}
    job = finished(upscaling_services, request, init_image=noise_picture(1, 64, 64))
    assert seen == [(64, 64)] and job.images[0].image.size == (128, 128)
    assert "SD upscale upscaler: 2x-Tiny" in job.images[0].infotext


def test_extras_run_a_model_upscaler_on_the_worker_and_crop_its_result(upscaling_services):
    from tests.helpers import noise_picture
    from webui.extras import Upscalers, parse_upscale, upscale

    upscalers = Upscalers(upscaling_services.worker)
    assert upscalers.names() == ["None", "Lanczos", "Nearest", "2x-Tiny"]
    picture = noise_picture(3, 30, 20)
    library = upscaling_services.engine.upscalers
    settings = parse_upscale({"upscaler_1": "2x-Tiny", "resize_mode": 1, "upscaling_resize_w": 40,
                              "upscaling_resize_h": 60})  # covering 40x60 takes 3x: 90x60, cropped to its middle
    done = upscale(picture, settings, upscalers)
    direct = library.resize(picture, (90, 60), "2x-Tiny")  # run here, in this thread
    assert np.array_equal(np.asarray(done.image), np.asarray(direct.crop((25, 0, 65, 60))))
    assert done.info["Postprocess upscaler"] == "2x-Tiny"
    (library.esrgan_folder / "broken.pth").write_bytes(b"not weights")
    with pytest.raises(InvalidRequest, match="upscaler_2: upscaler broken: broken.pth could not be read"):
        upscalers.check(parse_upscale({"upscaler_1": "Lanczos", "upscaler_2": "broken"}))


def test_the_api_lists_and_uses_a_model_upscaler(upscaling_services):
    import base64
    import io

    from fastapi.testclient import TestClient
    from tests.helpers import noise_picture
    from webui.api import create_api_app

    buffer = io.BytesIO()
    noise_picture(4, 16, 16).save(buffer, format="PNG")
    with TestClient(create_api_app(upscaling_services)) as client:
        listed = client.get("/sdapi/v1/upscalers").json()
        assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "2x-Tiny"]  # offline: no downloadables
        assert listed[3]["model_path"].endswith("2x-Tiny.pth")
        r = client.post("/sdapi/v1/extra-single-image", json={"image": base64.b64encode(buffer.getvalue()).decode(),
                                                                 "upscaler_1": "2x-Tiny", "upscaling_resize": 2})
        assert r.status_code == 200, r.text[:300]
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).size == (32, 32)
        assert "Postprocess upscaler: 2x-Tiny" in r.json()["html_info"]
        r = client.post("/sdapi/v1/extra-single-image", json={"image": base64.b64encode(buffer.getvalue()).decode(),
                                                                 "upscaler_1": "4x-Missing"})
        assert r.status_code == 422 and "upscaler_1: there is no upscaler '4x-Missing'" in r.json()["detail"]


@pytest.mark.parametrize("unfold", [2, 4])
@pytest.mark.parametrize("size", [(1, 1), (2, 2), (40, 1), (1, 3), (3, 2)])
def test_a_folding_network_takes_pictures_narrower_than_its_fold(unfold, size):
    """Real-ESRGAN's 2x and 1x networks fold 2x2 or 4x4 pixels into channels: a side of 1 to 3 pixels is padded by
    repeating its edge (a mirror needs more pixels than it adds), not refused with a RuntimeError."""
    network = build_network(rrdb_weights(unfold=unfold), "fold")
    x = torch.rand(1, 3, size[1], size[0])
    assert network(x).shape[-2:] == (size[1] * network.scale, size[0] * network.scale)


class _Answer:
    """A download's answer as urllib gives it: headers, then reads until b""; `cut` raises mid-way."""

    def __init__(self, body: bytes, length: int | None = None, cut: Exception | None = None):
        import email.message

        self.headers = email.message.Message()
        if length is not None:
            self.headers["Content-Length"] = str(length)
        self.body, self.cut = body, cut

    def read(self, size):
        if not self.body and self.cut:
            raise self.cut
        chunk, self.body = self.body[:size], self.body[size:]
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("answer, says", [
    (lambda whole: _Answer(whole[:100], length=len(whole)), "ended after 100 of"),  # urllib's short read: no error
    (lambda whole: _Answer(whole[:100], cut=__import__("http.client").client.IncompleteRead(b"")), "IncompleteRead"),
    (lambda whole: _Answer(b"<html>rate limited</html>", length=25), "could not be read as weights"),
])
def test_a_cut_or_wrong_download_leaves_no_file(folders, monkeypatch, answer, says):
    """A download cut short (urllib reports a cut connection with a known length as the end of the file), a chunked
    one cut (http.client's IncompleteRead, no OSError) or a page that is no weights file: refused with the message
    that says to download it by hand, and nothing is left in the folder, so the next use downloads it again."""
    import io
    import webui.engine.downloads as downloads

    esrgan, real = folders
    buffer = io.BytesIO()
    torch.save({"params_ema": rrdb_weights()}, buffer)
    monkeypatch.setattr(downloads, "open_url", lambda url, timeout: answer(buffer.getvalue()))
    library = UpscalerLibrary(esrgan, real, downloads=True)
    with pytest.raises(UpscalerError, match=f"(?s)R-ESRGAN 4x\\+: could not download .*{says}.*download it yourself"):
        library.network(library.find("R-ESRGAN 4x+"))
    assert list(real.iterdir()) == []
    monkeypatch.setattr(downloads, "open_url", lambda url, timeout: _Answer(buffer.getvalue(), len(buffer.getvalue())))
    assert library.network(library.find("R-ESRGAN 4x+")).scale == 4  # tried again, and whole this time
    assert [p.name for p in real.iterdir()] == ["RealESRGAN_x4plus.pth"]


def test_a_download_does_not_hold_up_checks_of_files_that_are_there(folders, monkeypatch):
    """The worker downloading a Real-ESRGAN file for minutes; meanwhile a request naming a file that is there is
    checked at once (it used to wait on the same lock for the whole download)."""
    import threading
    import webui.engine.downloads as downloads

    esrgan, real = folders
    torch.save(rrdb_weights(), esrgan / "4x-Here.pth")
    started, release = threading.Event(), threading.Event()

    def slow(url, timeout):
        started.set()
        release.wait(30)
        raise OSError("gave up")

    monkeypatch.setattr(downloads, "open_url", slow)
    library = UpscalerLibrary(esrgan, real, downloads=True)
    downloading = threading.Thread(target=lambda: pytest.raises(UpscalerError, library.network,
                                                                library.find("R-ESRGAN 4x+")))
    downloading.start()
    try:
        assert started.wait(10)
        checked = threading.Thread(target=library.check, args=("4x-Here",))
        checked.start()
        checked.join(10)
        assert not checked.is_alive()
    finally:
        release.set()
        downloading.join(30)


def test_extras_crop_runs_a_model_on_the_kept_middle_only(upscaling_services, monkeypatch):
    """Scale to with Crop to fit: a thin picture covering a square is enlarged many times over along its length, and
    only the middle is kept. A filter resizes only that middle; a model upscaler used to be asked for the whole
    uncut size (here 2048x16 to 2048x2048 asked for 262144x2048: 537 megapixels, hours of work and gigabytes),
    now for the kept part and a little context around it, or refused when even that is too large."""
    from tests.helpers import noise_picture
    from webui.extras import Upscalers, parse_upscale, upscale

    asked = []
    engine = upscaling_services.engine
    real = engine.upscale_picture

    def spy(picture, size, name):
        asked.append(size)
        if size[0] * size[1] > 20_000_000:
            raise AssertionError(f"asked for {size}")
        return real(picture, size, name)

    monkeypatch.setattr(engine, "upscale_picture", spy)
    upscalers = Upscalers(upscaling_services.worker)
    settings = parse_upscale({"upscaler_1": "2x-Tiny", "resize_mode": 1, "upscaling_resize_w": 64,
                              "upscaling_resize_h": 64})
    done = upscale(noise_picture(5, 64, 2), settings, upscalers)  # covering 64x64 takes 32x: 2048x64
    assert done.image.size == (64, 64)
    assert asked[-1][1] == 64 and asked[-1][0] < 2048 / 2  # the middle and its context, not the 2048 wide whole
    settings = parse_upscale({"upscaler_1": "2x-Tiny", "resize_mode": 1, "upscaling_resize_w": 2048,
                              "upscaling_resize_h": 2048})
    asked.clear()
    try:
        done = upscale(noise_picture(6, 2048, 16), settings, upscalers)
        assert done.image.size == (2048, 2048)
    except InvalidRequest as err:  # refused before any pass, naming what to change
        assert "Crop" in str(err) or "crop" in str(err)
    assert all(w * h <= 20_000_000 for w, h in asked)
    settings = parse_upscale({"upscaler_1": "2x-Tiny", "resize_mode": 1, "upscaling_resize_w": 8192,
                              "upscaling_resize_h": 8192})
    asked.clear()
    with pytest.raises(InvalidRequest, match="2x-Tiny: the 8192x8192 kept of 8192000x8192 .*untick Crop to fit"):
        upscale(noise_picture(7, 1000, 1), settings, upscalers)  # each pixel of it 8192 wide
    assert asked == []


def test_extras_crop_of_a_model_matches_the_middle_of_the_whole(upscaling_services):
    """The kept middle made from its part of the picture is the middle of the whole enlargement (but for the last
    bits of the network's reach at the part's edges)."""
    from tests.helpers import noise_picture
    from webui.extras import Upscalers, parse_upscale, upscale

    picture = noise_picture(8, 100, 20)
    settings = parse_upscale({"upscaler_1": "2x-Tiny", "resize_mode": 1, "upscaling_resize_w": 60,
                              "upscaling_resize_h": 60})  # 3x: 300x60, its middle 60x60 kept
    done = upscale(picture, settings, Upscalers(upscaling_services.worker))
    whole = upscaling_services.engine.upscalers.resize(picture, (300, 60), "2x-Tiny").crop((120, 0, 180, 60))
    difference = np.abs(np.asarray(done.image, np.int16) - np.asarray(whole, np.int16))
    assert done.image.size == (60, 60) and difference.mean() < 0.5 and difference.max() <= 8


def test_a_hires_picture_sent_to_img2img_warns_of_no_upscaler(monkeypatch):
    """img2img has no hires fix: the hires upscaler of a picture sent there is not applied, and no warning says that
    'Latent' is not on this server (the img2img tab's list is SD upscale's, which has no latent upscalers)."""
    import webui.ui.params as params
    from webui.engine.hires import PICTURE_UPSCALERS

    notes = []
    monkeypatch.setattr(params.gr, "Warning", lambda note, *args, **kwargs: notes.append(note))
    fields = {"prompt": "a cat", "enable_hr": True, "hr_upscaler": "Latent", "hr_scale": 2.0}
    params.widget_updates(fields, params.TAB_FIELDS["img2img"], [], lambda *a: None, [],
                          [*PICTURE_UPSCALERS, "4x-Tiny"])
    assert notes == []
    params.widget_updates(fields | {"hr_upscaler": "4x-Gone"}, params.TAB_FIELDS["txt2img"], [], lambda *a: None, [],
                          ["Latent", "Lanczos", "4x-Tiny"])
    assert len(notes) == 1 and "'4x-Gone' is not on this server" in notes[0]


def test_an_unknown_hires_upscaler_is_refused_naming_the_latent_ones_too(upscaling_services):
    with pytest.raises(InvalidRequest, match="hr_upscaler: there is no upscaler 'Bogus'.*2x-Tiny.*or a latent "
                                             "upscaler: Latent, Latent \\(antialiased\\)"):
        upscaling_services.worker.check({"prompt": "x", "enable_hr": True, "hr_upscaler": "Bogus"})
    with pytest.raises(InvalidRequest, match="sd_upscale_upscaler: there is no upscaler 'Bogus'.*put the file there\\)$"):
        upscaling_services.worker.check({"prompt": "x", "sd_upscale": True, "sd_upscale_upscaler": "Bogus"})


@pytest.mark.parametrize("name, make, scale", [
    ("RealESRGAN_x4plus", lambda: {"params_ema": rrdb_weights(64, 32, 23, ups=2)}, 4),
    ("RealESRGAN_x4plus_anime_6B", lambda: {"params_ema": rrdb_weights(64, 32, 6, ups=2)}, 4),
    ("RealESRGAN_x2plus", lambda: {"params_ema": rrdb_weights(64, 32, 23, ups=2, unfold=2)}, 2),
    ("4x-UltraSharp (ESRGAN's model.N)", lambda: esrgan_layout(rrdb_weights(64, 32, 23, ups=2), ups=2), 4),
    ("8x ESRGAN", lambda: esrgan_layout(rrdb_weights(64, 32, 23, ups=3), ups=3), 8),
    ("2x ESRGAN", lambda: esrgan_layout(rrdb_weights(64, 32, 23, ups=1), ups=1), 2),
    ("1x ESRGAN", lambda: esrgan_layout(rrdb_weights(64, 32, 23, ups=0), ups=0), 1),
    ("realesr-general-x4v3", lambda: {"params": compact_weights(64, 32, 4)}, 4),
    ("realesr-animevideov3", lambda: {"params": compact_weights(64, 16, 4)}, 4),
])
def test_the_released_networks_full_size_load_and_enlarge_by_their_scale(name, make, scale, tmp_path):
    """The published files' key names and shapes (BasicSR's params_ema/params, ESRGAN's model.N from 1x to 8x,
    SRVGGNetCompact's body.N with PReLU), at full size."""
    from webui.engine.upscaler_nets import read_weights

    path = tmp_path / "model.pth"
    torch.save(make(), path)
    network = build_network(read_weights(path), name)
    assert network.scale == scale
    with torch.inference_mode():
        assert network(torch.rand(1, 3, 10, 12)).shape == (1, 3, 10 * scale, 12 * scale)


def compact_weights(features: int, convs: int, scale: int) -> dict[str, torch.Tensor]:
    state = {"body.0.weight": torch.randn(features, 3, 3, 3) * 0.05, "body.0.bias": torch.zeros(features),
             "body.1.weight": torch.full((features,), 0.25)}
    for n in range(convs):
        state |= {f"body.{2 * n + 2}.weight": torch.randn(features, features, 3, 3) * 0.05,
                  f"body.{2 * n + 2}.bias": torch.zeros(features), f"body.{2 * n + 3}.weight": torch.full((features,), 0.25)}
    last = 2 * convs + 2
    return state | {f"body.{last}.weight": torch.randn(3 * scale * scale, features, 3, 3) * 0.05,
                    f"body.{last}.bias": torch.zeros(3 * scale * scale)}


def test_releasing_the_device_lets_go_of_the_upscalers_network_too(upscaling_services):
    library = upscaling_services.engine.upscalers
    built = library.network(library.find("2x-Tiny"))
    assert library.network(library.find("2x-Tiny")) is built  # kept between uses
    assert upscaling_services.worker.release_device().result(60)
    assert library.network(library.find("2x-Tiny")) is not built  # read again after the release


def test_a_sent_hires_upscaler_comes_with_the_list_as_it_is_now():
    """An upscaler file added after the page was built: the dropdown gets the list with it, else Gradio would refuse
    the value at every Generate (found by review)."""
    import webui.ui.params as params

    names = params.TAB_FIELDS["txt2img"]
    fields = {"prompt": "a cat", "enable_hr": True, "hr_upscaler": "4x-New", "hr_scale": 2.0}
    update = dict(zip(names, params.widget_updates(fields, names, [], lambda *a: None, [],
                                                   ["Latent", "Lanczos", "4x-New"])))["hr_upscaler"]
    assert update["value"] == "4x-New" and update["choices"] == ["Latent", "Lanczos", "4x-New"]
