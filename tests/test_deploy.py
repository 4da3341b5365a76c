"""Where users run the app: the Colab notebook, a Hugging Face Space, a GPU box (README), and ZeroGPU.

The notebook's shell lines (`!cmd`, `%magic`) become calls to a recorder, the way IPython turns them into
get_ipython().system(...), so its cells compile and its commands can be compared with the README and run.
"""
from __future__ import annotations

import http.server
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import nbformat
import pytest
import yaml
from packaging.requirements import Requirement
from PIL import Image

from webui.config import ENV_ARGS, ENV_OVERRIDES, parse_settings, spaces_outdir

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "colab" / "diffusers_webui.ipynb"
README = ROOT / "README.md"
EMBEDDED = ROOT / "models" / "sd-emoji-tiny"
# What the Spaces runtime sets for a Gradio Space (besides its hardware and user variables).
SPACES_ENV = {
    "SYSTEM": "spaces",
    "SPACE_ID": "someone/diffusers-webui",
    "SPACE_AUTHOR_NAME": "someone",
    "SPACE_REPO_NAME": "diffusers-webui",
    "SPACE_TITLE": "diffusers-webui",
    "SPACE_HOST": "someone-diffusers-webui.hf.space",
    "GRADIO_SERVER_NAME": "0.0.0.0",
}


# --- the notebook as IPython would run it ---------------------------------------------------------------
_SHELL_LINE = re.compile(r"^(\s*)([!%])(.*)$")


def _expand(text: str) -> str:
    """IPython's {expression} expansion in shell lines, written as a Python expression."""
    parts = re.split(r"\{([^{}]+)\}", text)
    pieces = [repr(part) if i % 2 == 0 else f"str({part})" for i, part in enumerate(parts) if part or i % 2]
    return " + ".join(pieces) or "''"


def as_python(source: str) -> str:
    lines = []
    for line in source.splitlines():
        match = _SHELL_LINE.match(line)
        if match is None:
            lines.append(line)
            continue
        indent, kind, rest = match.groups()
        if kind == "!":
            lines.append(f"{indent}__shell__({_expand(rest)})")
        else:
            assert not rest.startswith("%"), "no cell magics: Colab runs them differently"
            name, _, args = rest.partition(" ")
            lines.append(f"{indent}__magic__({name!r}, {_expand(args)})")
    return "\n".join(lines)


def notebook():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def cell(nb, tag: str) -> str:
    found = [c.source for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(found) == 1, f"one cell tagged {tag!r}"
    return found[0]


def run_cells(nb, tags: list[str], namespace: dict) -> list[str]:
    """Run the tagged cells in order; shell lines are recorded, not run. Returns the recorded commands."""
    commands: list[str] = []
    namespace["__shell__"] = commands.append
    namespace["__magic__"] = lambda name, args: commands.append(f"%{name} {args}")
    for tag in tags:
        exec(compile(as_python(cell(nb, tag)), f"<cell {tag}>", "exec"), namespace)
    return commands


def normalize(command: str) -> str:
    """A notebook line as a README line: no `-q`, no `|| echo ...` fallback."""
    command = command.split(" || ")[0]
    return " ".join(word for word in command.split(" ") if word not in ("-q", "--quiet")).strip()


def readme_section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has a section {title!r}"
    return match.group(1)


def code_lines(markdown: str) -> list[str]:
    """Commands in the ```bash blocks, without comments."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_notebook_is_valid_and_every_code_cell_compiles():
    nb = notebook()
    assert nb.nbformat == 4 and nb.metadata.get("accelerator") == "GPU"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.metadata["tags"][0] for c in code_cells] == ["gpu", "clone", "install", "drive", "model", "launch"]
    for number, c in enumerate(code_cells, start=1):
        assert not c.outputs and c.execution_count is None, "saved without outputs"
        compile(as_python(c.source), f"<cell {number}>", "exec")
        first = c.source.splitlines()[0]
        assert first.startswith(f"# @title {number}. "), first  # numbered, titled steps for beginners
        comments = [line for line in c.source.splitlines() if line.lstrip().startswith("#")]
        assert len(comments) >= 2, f"cell {number} explains itself"


def test_notebook_installs_and_launches_with_the_readme_commands():
    nb = notebook()
    installs = [normalize(c) for c in run_cells(nb, ["install"], {})]
    launch = re.search(r'^LAUNCH = "([^"]+)"', cell(nb, "launch"), re.M).group(1)
    readme = code_lines(readme_section("On Google Colab"))
    assert installs == [line for line in readme if line.startswith("pip ")]
    assert [launch] == [line for line in readme if line.startswith("python app.py")]
    clone = re.search(r'^REPO_URL = "([^"]+)"', cell(nb, "clone"), re.M).group(1)
    assert f"git clone {clone}" in readme
    # The launch command's flags are real flags.
    assert parse_settings(shlex.split(launch)[2:], environ={}).share


def test_readme_badge_opens_this_notebook_from_the_cloned_repository():
    clone = re.search(r'^REPO_URL = "https://github.com/([^"]+)"', cell(notebook(), "clone"), re.M).group(1)
    badges = re.findall(r"\(https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/[^/]+/([^)]+)\)",
                        README.read_text())
    assert badges and all(repo == clone and (ROOT / path) == NOTEBOOK for repo, path in badges)
    assert "colab.research.google.com/assets/colab-badge.svg" in README.read_text()


def test_notebook_defaults_pick_the_embedded_model_and_local_outputs():
    namespace = {"REPO_DIR": str(ROOT)}
    commands = run_cells(notebook(), ["drive", "model", "launch"], namespace)
    assert namespace["CKPT"] == "sd-emoji-tiny" and namespace["OUTDIR"] == str(ROOT / "outputs")
    assert commands == [f"python app.py --share --xformers --ckpt sd-emoji-tiny --outdir {ROOT / 'outputs'}"]
    source = cell(notebook(), "launch").replace('GRADIO_AUTH = ""', 'GRADIO_AUTH = "me:pa ss"')
    commands = []
    exec(compile(as_python(source), "<launch>", "exec"),
         {"CKPT": "a/b", "OUTDIR": "/o", "__shell__": commands.append})
    assert shlex.split(commands[0])[-2:] == ["--gradio-auth", "me:pa ss"]


def test_the_notebook_model_cell_finds_a_checkpoint_in_models_and_stops_on_an_empty_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the notebook runs in the repository folder; models/ is relative to it
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.safetensors").write_bytes(b"weights")
    source = cell(notebook(), "model")
    namespace = {"__shell__": print}
    exec(compile(as_python(source.replace('MODEL = "sd-emoji-tiny"', 'MODEL = "mine.safetensors"')), "<model>",
                 "exec"), namespace)
    assert namespace["CKPT"] == os.path.join("models", "mine.safetensors")
    namespace = {"__shell__": lambda command: _wget_target(command).write_bytes(b"")}
    with pytest.raises(RuntimeError, match="download failed"):  # wget wrote an empty file
        exec(compile(as_python(source.replace('MODEL = "sd-emoji-tiny"', 'MODEL = "https://example.com/x"')),
                     "<model>", "exec"), namespace)
    assert os.listdir(tmp_path / "models") == ["mine.safetensors"]  # the empty file is gone


def test_the_notebook_sends_the_hf_token_with_a_hub_link_and_says_why_wget_failed(tmp_path, monkeypatch):
    """The HF_TOKEN secret was read after the download and never sent, so a private or gated file could not come
    by link; wget's error was hidden (-q) and its exit status ignored: offline, the message blamed the link. Found
    by a probe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    source = cell(notebook(), "model").replace(
        'MODEL = "sd-emoji-tiny"', 'MODEL = "https://huggingface.co/org/gated/resolve/main/m.safetensors"')
    commands = []
    namespace = {}

    def refused_wget(command):  # as wget run by IPython: a 401/403 (exit 8), and an empty file
        commands.append(command)
        _wget_target(command).write_bytes(b"")
        namespace["_exit_code"] = 8

    namespace["__shell__"] = refused_wget
    with pytest.raises(RuntimeError, match="the server answered with an error.*HF_TOKEN"):
        exec(compile(as_python(source), "<model>", "exec"), namespace)
    assert "--header=Authorization: Bearer hf_secret" in shlex.split(commands[0])
    assert os.listdir(tmp_path / "models") == []


def test_the_notebook_stops_at_step_2_when_the_code_cannot_be_downloaded(tmp_path, monkeypatch):
    """With Run all, a failed clone went on to 'install' nothing and report success until the last cell."""
    monkeypatch.chdir(tmp_path)  # not inside a copy: step 2 clones
    source = cell(notebook(), "clone").replace('REPO_DIR = "/content/diffusers-webui"',
                                               f'REPO_DIR = {str(tmp_path / "diffusers-webui")!r}')
    commands = []
    namespace = {"__shell__": commands.append, "__magic__": lambda name, args: commands.append(f"%{name} {args}")}
    with pytest.raises(RuntimeError, match="Could not download the code from https://github.com/.*Check REPO_URL"):
        exec(compile(as_python(source), "<clone>", "exec"), namespace)  # the recorded git clone makes no folder
    assert commands[0].startswith("git clone") and not any(c.startswith("%cd") for c in commands)


def test_the_notebook_launches_when_the_optional_drive_step_is_skipped():
    namespace = {}
    commands = run_cells(notebook(), ["clone", "model", "launch"], namespace)  # step 4 (Drive) not run
    assert commands[-1].endswith(f"--outdir {namespace['REPO_DIR']}/outputs")



def test_the_notebook_never_prints_the_login(capsys):
    source = cell(notebook(), "launch")
    for login in ["me:it's-secret", 'me:"secret" $x', "me:pa ss-secret,you:secret2"]:  # quoted in many ways
        commands = []
        exec(compile(as_python(source.replace('GRADIO_AUTH = ""', f"GRADIO_AUTH = {login!r}")), "<launch>", "exec"),
             {"CKPT": "a/b", "OUTDIR": "/o", "__shell__": commands.append})
        printed = capsys.readouterr().out
        assert "secret" not in printed and printed.rstrip().endswith("--gradio-auth <login>"), printed
        assert shlex.split(commands[0])[-2:] == ["--gradio-auth", login]


# --- the notebook downloads a checkpoint from a link ---------------------------------------------------------
# A page, like the one a huggingface.co .../blob/... link opens.
WEB_PAGE = b"<!DOCTYPE html>\n<html><head><title>model.safetensors</title></head><body>A model</body></html>\n"


def _safetensors() -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"weight": np.arange(4096, dtype=np.float32), "bias": np.zeros(3, np.float16)}, {"format": "pt"})


def _wget_target(command: str) -> Path:
    """The FILE of `wget ... -O FILE URL`."""
    argv = shlex.split(command)
    return Path(argv[argv.index("-O") + 1])


def _python_wget(command: str) -> None:
    """What `wget [-c] ... -O FILE URL` does, for a machine without wget: -O creates FILE, an HTTP error adds
    nothing to it, and -c asks the server for the rest of a non-empty FILE and adds it."""
    argv = shlex.split(command)
    assert argv[0] == "wget", command
    path, have = _wget_target(command), 0
    if "-c" in argv and path.exists():
        have = path.stat().st_size
    with open(path, "ab" if have else "wb") as out:
        request = urllib.request.Request(argv[-1], headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                if have and response.status != 206:
                    out.truncate(0)  # the server sent the whole file
                out.write(response.read())
        except urllib.error.HTTPError:
            pass  # 416: nothing left to fetch; any other error: nothing fetched


@pytest.fixture(params=["python", "wget"])
def wget(request, monkeypatch):
    """Runs the notebook's wget line: in Python, and with the real wget where one is installed."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # the file server is on this machine
    if request.param == "python":
        return _python_wget
    if shutil.which("wget") is None:
        pytest.skip("wget is not installed")
    return lambda command: subprocess.run(command, shell=True, check=False, timeout=120)


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves server.files ({path: bytes}), with Range requests (resuming) as Hugging Face does; server.ranges
    records the Range of each request."""

    def do_GET(self):
        body = self.server.files.get(self.path)
        wanted = self.headers.get("Range")
        self.server.ranges.append(wanted)
        if body is None:
            return self.send_error(404)
        start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1)) if wanted else 0
        if start >= len(body) > 0:
            return self.send_error(416)
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Type", "text/html" if body.startswith(b"<") else "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    server.files, server.ranges = {}, []
    server.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the notebook runs in the repository folder; models/ is relative to it
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def _run_model_cell(model: str, shell) -> dict:
    source = cell(notebook(), "model").replace('MODEL = "sd-emoji-tiny"', f"MODEL = {model!r}")
    namespace = {"__shell__": shell}
    exec(compile(as_python(source), "<model>", "exec"), namespace)
    return namespace


def test_the_notebook_model_cell_tells_a_checkpoint_from_a_web_page_or_a_cut_download(models):
    problem = _run_model_cell("sd-emoji-tiny", print)["checkpoint_problem"]

    def check(name: str, content: bytes):
        (models / name).write_bytes(content)
        return problem(str(models / name))

    weights = _safetensors()
    assert check("ok.safetensors", weights) is None
    assert check("empty.safetensors", b"") == "the file is empty"
    assert "web page" in check("page.safetensors", WEB_PAGE)
    assert "web page" in check("page.ckpt", WEB_PAGE)
    for cut in (12, 100, len(weights) - 1):  # in the header, in the tensors
        assert "stopped before the end" in check("cut.safetensors", weights[:cut])
    assert "longer than its header" in check("long.safetensors", weights + b"\0")
    assert "not a .safetensors" in check("list.safetensors", (2).to_bytes(8, "little") + b"[]")
    assert "not a .safetensors" in check("text.safetensors", b'{"error": "Repository not found"}')
    assert check("big-header.safetensors", (500).to_bytes(8, "little") + b"{}") is not None  # N > the file
    with zipfile.ZipFile(models / "zip.ckpt", "w") as archive:  # what torch.save writes
        archive.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}}))
    assert problem(str(models / "zip.ckpt")) is None
    assert "stopped before the end" in check("cut.ckpt", (models / "zip.ckpt").read_bytes()[:-30])
    assert check("legacy.ckpt", pickle.dumps({"state_dict": {}}, protocol=2)) is None
    assert "not a .ckpt" in check("text.ckpt", b"Not Found")


def test_the_notebook_model_cell_stops_on_a_web_page_and_keeps_nothing(models, file_server, wget):
    file_server.files["/someone/model/blob/main/model.safetensors"] = WEB_PAGE
    with pytest.raises(RuntimeError, match=r"web page.*/resolve/main/"):  # says what link to use instead
        _run_model_cell(f"{file_server.url}/someone/model/blob/main/model.safetensors", wget)
    assert list(models.iterdir()) == []  # nothing to be taken for a model, nothing to resume onto


def test_the_notebook_model_cell_replaces_a_broken_download_instead_of_resuming_onto_it(models, file_server, wget):
    weights = _safetensors()
    file_server.files["/someone/model/resolve/main/model.safetensors"] = weights
    (models / "model.safetensors").write_bytes(WEB_PAGE)  # what the cell kept from a .../blob/... link before
    namespace = _run_model_cell(f"{file_server.url}/someone/model/resolve/main/model.safetensors", wget)
    assert namespace["CKPT"] == os.path.join("models", "model.safetensors")
    assert (models / "model.safetensors").read_bytes() == weights and os.listdir(models) == ["model.safetensors"]
    assert file_server.ranges == [None]  # the whole file, not "the rest" after the page
    # Once there, the file is used as it is.
    namespace = _run_model_cell(f"{file_server.url}/someone/model/resolve/main/model.safetensors", pytest.fail)
    assert namespace["CKPT"] == os.path.join("models", "model.safetensors")


def test_the_notebook_model_cell_never_takes_a_stopped_download_for_the_model(models, file_server, wget):
    weights = _safetensors()
    file_server.files["/model.safetensors"] = weights
    half = len(weights) // 2

    def stopped_wget(command):  # the connection broke half-way (or the cell was stopped)
        _wget_target(command).write_bytes(weights[:half])

    with pytest.raises(RuntimeError, match="stopped before the end: run this cell again"):
        _run_model_cell(f"{file_server.url}/model.safetensors", stopped_wget)
    assert not (models / "model.safetensors").exists()
    namespace = _run_model_cell(f"{file_server.url}/model.safetensors", wget)  # running it again goes on
    assert file_server.ranges == [f"bytes={half}-"]
    assert (models / "model.safetensors").read_bytes() == weights and os.listdir(models) == ["model.safetensors"]
    assert namespace["CKPT"] == os.path.join("models", "model.safetensors")


def test_the_notebook_model_cell_downloads_a_ckpt(models, file_server, wget):
    with zipfile.ZipFile(models / "made.zip", "w") as archive:  # what torch.save writes
        archive.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}}))
    file_server.files["/old-model.ckpt"] = (models / "made.zip").read_bytes()
    (models / "made.zip").unlink()
    namespace = _run_model_cell(f"{file_server.url}/old-model.ckpt", wget)
    assert namespace["CKPT"] == os.path.join("models", "old-model.ckpt")
    assert (models / "old-model.ckpt").read_bytes() == file_server.files["/old-model.ckpt"]
    assert os.listdir(models) == ["old-model.ckpt"]

def test_the_notebook_model_cell_downloads_a_hugging_face_file_from_its_page_link(models, capsys):
    commands = []

    def wget(command):
        commands.append(command)
        _wget_target(command).write_bytes(_safetensors())

    namespace = _run_model_cell("https://huggingface.co/someone/model/blob/main/sub/my-model.safetensors", wget)
    url = shlex.split(commands[0])[-1]
    assert url == "https://huggingface.co/someone/model/resolve/main/sub/my-model.safetensors"
    assert "/resolve/ instead of /blob/" in capsys.readouterr().out  # says what it did
    assert namespace["CKPT"] == os.path.join("models", "my-model.safetensors")
    assert (models / "my-model.safetensors").read_bytes() == _safetensors()

# --- the README ---------------------------------------------------------------------------------------------
def front_matter() -> dict:
    text = README.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_readme_front_matter_makes_the_repository_a_gradio_space():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and (ROOT / meta["app_file"]).is_file()
    assert meta["title"] and meta["emoji"] and meta["license"] == "apache-2.0"
    assert len(meta["short_description"]) <= 60  # the Hub's limit
    gradio = next(Requirement(line.split("#")[0]) for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if line.startswith("gradio"))
    assert gradio.specifier.contains(str(meta["sdk_version"]))
    assert str(meta["python_version"]) == "3.11"


def test_readme_commands_use_real_flags_and_show_the_gpu_box_way():
    lines = code_lines(README.read_text())
    launches = [line for line in lines if line.startswith("python app.py")]
    assert "python app.py --listen --xformers --ckpt models/my.safetensors" in launches
    for line in launches:
        parse_settings(shlex.split(line)[2:], environ={})  # exits on an unknown flag
    gpu_box = readme_section("On a GPU box")
    assert "--medvram" in gpu_box and "--lowvram" in gpu_box and "--no-half-vae" in gpu_box
    # The commands the project promises stay as they are.
    assert code_lines(readme_section("Install and run"))[-1] == "python app.py"
    test_commands = code_lines(readme_section("Test"))
    assert test_commands == ["pip install -r requirements-dev.txt", "python -m pytest -q -n 2 --dist loadfile"]
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("\n" + test_commands[-1])  # CI runs exactly it
    variables = readme_section("Environment variables")
    for name in [*ENV_OVERRIDES, ENV_ARGS, "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "SPACE_ID", "SPACES_ZERO_GPU"]:
        assert f"`{name}`" in variables, name
    licences = readme_section("Licences")
    assert "CreativeML OpenRAIL-M" in licences and "CC BY 4.0" in licences


# --- environment variables -------------------------------------------------------------------------------------
def test_flags_win_over_environment_variables():
    env = {"WEBUI_CKPT": "from-env", "WEBUI_OUTDIR": "/env-out", "WEBUI_GRADIO_AUTH": "a:b",
           "WEBUI_API_AUTH": "c:d,e:f", "WEBUI_CKPT_DIR": "/env-models", "GRADIO_SERVER_PORT": "7999"}
    s = parse_settings([], environ=env)
    assert (s.ckpt, str(s.outdir), str(s.models_dir), s.port) == ("from-env", "/env-out", "/env-models", 7999)
    assert s.gradio_auth == [("a", "b")] and s.api_auth == [("c", "d"), ("e", "f")]
    s = parse_settings(["--ckpt", "flag", "--port", "8001", "--gradio-auth", "x:y"], environ=env)
    assert (s.ckpt, s.port, s.gradio_auth) == ("flag", 8001, [("x", "y")])
    s = parse_settings(["--ckpt", "flag"], environ=env | {"WEBUI_ARGS": "--api --ckpt from-args --no-half-vae"})
    assert s.api and s.no_half_vae and s.ckpt == "flag"

    assert parse_settings([], environ=env | {"WEBUI_ARGS": "--ckpt from-args"}).ckpt == "from-args"
    # ~ in a folder flag is the home folder, also where no shell expands it (inside WEBUI_ARGS)
    folders = parse_settings([], environ=env | {"WEBUI_ARGS": "--outdir ~/out --ckpt-dir=~/models"})
    assert (folders.outdir, folders.models_dir) == (Path.home() / "out", Path.home() / "models")
    s = parse_settings([], environ={})
    assert (s.host, s.port, s.ckpt, s.gradio_auth) == ("127.0.0.1", 7860, "sd-emoji-tiny", [])


def test_a_gradio_server_port_that_is_no_number_stops_the_start_with_what_to_set(capsys):
    """Gradio reads it too and failed on it after the model had loaded, with a traceback."""
    with pytest.raises(SystemExit) as stopped:
        parse_settings(["--port", "7867"], environ={"GRADIO_SERVER_PORT": "abc"})
    assert stopped.value.code == 2
    assert "GRADIO_SERVER_PORT='abc' is not a port number; set a number such as 7860, or unset it" in \
        capsys.readouterr().err


def test_a_bad_secret_is_reported_without_being_shown(capsys):
    with pytest.raises(SystemExit):
        parse_settings([], environ={"WEBUI_GRADIO_AUTH": "hunter2-without-user"})
    err = capsys.readouterr().err
    assert "WEBUI_GRADIO_AUTH must look like user:password" in err and "hunter2" not in err


def test_on_a_space_listen_everywhere_ignore_share_and_use_persistent_storage(tmp_path):
    s = parse_settings(["--share"], environ=SPACES_ENV | {"GRADIO_SERVER_PORT": "7860"})
    assert (s.host, s.port, s.share) == ("0.0.0.0", 7860, False)
    assert spaces_outdir(tmp_path) == tmp_path / "outputs"  # /data exists: persistent storage
    assert spaces_outdir(tmp_path / "absent") is None  # no storage: the repository's outputs/
    if spaces_outdir() is None:
        assert parse_settings([], environ=SPACES_ENV).outdir == parse_settings([], environ={}).outdir
    assert parse_settings([], environ={"GRADIO_SERVER_NAME": "0.0.0.0"}).host == "0.0.0.0"


# --- ZeroGPU -----------------------------------------------------------------------------------------------
@pytest.fixture
def fake_spaces(monkeypatch):
    """A stand-in for the `spaces` package: spaces.GPU pickles what crosses into the GPU process."""
    calls = types.SimpleNamespace(gpu=[], durations=[], mode_threads=[])

    def GPU(task=None, *, duration=None):
        def decorate(fn):
            def run(*args, **kwargs):
                calls.durations.append(duration(*args, **kwargs) if callable(duration) else duration)
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # fails on closures, as ZeroGPU does
                calls.gpu.append(args)
                return pickle.loads(pickle.dumps(fn(*args, **kwargs)))
            return run
        return decorate if task is None else decorate(task)

    spaces = types.ModuleType("spaces")
    spaces.GPU = GPU
    zero = types.ModuleType("spaces.zero")
    zero_torch = types.ModuleType("spaces.zero.torch")
    zero_torch.enter_mode = lambda: calls.mode_threads.append(threading.current_thread().name)
    zero.torch = zero_torch
    spaces.zero = zero
    for name, module in (("spaces", spaces), ("spaces.zero", zero), ("spaces.zero.torch", zero_torch)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    return calls


def test_zerogpu_runs_each_batch_through_spaces_gpu(fake_spaces, settings):
    from webui.engine.loader import ModelLoadError
    from webui.services import build_services

    services = build_services(settings)
    try:
        job = services.worker.submit({"prompt": "red apple", "steps": 2, "seed": 3, "batch_size": 2, "n_iter": 2})
        assert job.wait(120) and job.state.value == "done", job.error
        assert [im.seed for im in job.images] == [3, 4, 5, 6]
        assert [args[1] for args in fake_spaces.gpu] == [[3, 4], [5, 6]]
        varied = services.worker.submit({"prompt": "red apple", "steps": 2, "seed": 3, "subseed": 9,
                                         "subseed_strength": 0.5})  # the variation seeds cross over too
        assert varied.wait(120) and varied.state.value == "done", varied.error
        assert fake_spaces.gpu[-1][2] == [9] and "Variation seed: 9," in varied.images[0].infotext
        started = services.worker.submit({"prompt": "red apple", "steps": 2, "seed": 3, "denoising_strength": 0.5},
                                         init_image=Image.new("RGB", (64, 64), "red"))  # img2img's picture too
        assert started.wait(120) and started.state.value == "done", started.error
        assert fake_spaces.gpu[-1][3].getpixel((5, 5)) == (255, 0, 0) and "Denoising strength: 0.5" in \
            started.images[0].infotext
        assert all(isinstance(d, int) and 20 <= d <= 120 for d in fake_spaces.durations)
        assert fake_spaces.mode_threads == ["gpu-worker"]  # where models are loaded
        assert services.engine.release_device() is False  # the GPU is lent per call: nothing to release
        with pytest.raises(ModelLoadError, match="WEBUI_CKPT=other/model"):
            services.worker.load_model("other/model")
    finally:
        services.close()


def test_without_zerogpu_nothing_is_wrapped_or_imported(settings, monkeypatch):
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry
    from webui.zerogpu import wrap_engine

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    engine = Engine(settings, ModelRegistry(settings.models_dir, settings.outdir / "hashes.json"))
    assert wrap_engine(engine) is engine and engine.generate.__func__ is Engine.generate
    assert "spaces" not in sys.modules


# --- starting the server the way each place starts it ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_and_fetch(command: list[str], port: int, log_path: Path, env: dict, ready: str) -> tuple[int, str, str]:
    """Start the command, wait until http://127.0.0.1:port/ answers and the log shows `ready`; return
    (status, page, log)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # a generous bound for a busy machine, not a speed check
        answer = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            if answer is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                        answer = response.status, response.read().decode("utf-8", "replace")
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
            if answer is not None and ready in log_path.read_text():  # printed once launch() returns
                return *answer, log_path.read_text()
            time.sleep(0.5)
        pytest.fail(f"no answer on port {port} with {ready!r} in the log:\n{log_path.read_text()[-3000:]}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _quiet_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WEBUI_", "SPACE", "GRADIO_SERVER", "COMMANDLINE_ARGS"))}
    return env | {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"} | extra


def _embedded_model_loaded(log: str) -> None:
    if (EMBEDDED / "model_index.json").is_file():
        assert "loaded model sd-emoji-tiny" in log, log[-3000:]
    assert "torchvision" not in log  # transformers' advice to install it, which this project does not need


def test_the_notebook_launch_cell_serves_the_ui(tmp_path):
    namespace = {"REPO_DIR": str(ROOT)}
    run_cells(notebook(), ["drive"], namespace)
    namespace["OUTDIR"] = str(tmp_path / "outputs")  # what ticking USE_DRIVE changes
    commands = run_cells(notebook(), ["model", "launch"], namespace)
    argv = shlex.split(commands[-1])
    assert argv[:2] == ["python", "app.py"] and "--share" in argv
    # CI has no network, so no share link: the rest of the command is run as the notebook runs it.
    port = _free_port()
    argv = [sys.executable, *[a for a in argv[1:] if a != "--share"], "--port", str(port)]
    ready = f"Running on local URL: http://127.0.0.1:{port}"
    status, page, log = _serve_and_fetch(argv, port, tmp_path / "server.log", _quiet_env(), ready)
    assert status == 200 and "gradio" in page.lower()
    _embedded_model_loaded(log)
    assert (tmp_path / "outputs" / "history.sqlite3").is_file()


def test_app_py_serves_the_page_as_a_space_starts_it(tmp_path):
    port = _free_port()
    env = _quiet_env(**SPACES_ENV, GRADIO_SERVER_PORT=str(port), WEBUI_OUTDIR=str(tmp_path / "space-outputs"))
    ready = f"Running on http://0.0.0.0:{port}"  # every interface, as Spaces needs
    status, page, log = _serve_and_fetch([sys.executable, "app.py"], port, tmp_path / "space.log", env, ready)
    assert status == 200 and "gradio" in page.lower()
    _embedded_model_loaded(log)
    assert (tmp_path / "space-outputs" / "history.sqlite3").is_file()
