"""stable-diffusion-webui launch lines keep working: its flags, COMMANDLINE_ARGS, GRADIO_SERVER_NAME, --models-dir."""
from __future__ import annotations

import logging
import shlex
from types import SimpleNamespace

import pytest

from webui.config import A1111_REFUSED_FLAGS, Settings, build_parser, parse_settings

IGNORED = "ignored: these stable-diffusion-webui flags do nothing here:"
# Flags A1111 users type that mean nothing here, as they appear in launch lines and webui-user.sh.
A1111_LINE = ("--skip-torch-cuda-test --precision full --opt-sdp-attention --enable-insecure-extension-access "
              "--theme dark --autolaunch --upcast-sampling --disable-nan-check --no-download-sd-model "
              "--opt-split-attention --disable-safe-unpickle --api-log --no-gradio-queue")


def warnings_from_config(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "webui.config" and r.levelno == logging.WARNING]


def test_a1111_flags_that_do_nothing_here_start_with_one_warning_naming_them(caplog):
    with caplog.at_level(logging.WARNING):
        s = parse_settings(shlex.split(A1111_LINE) + ["--api", "--medvram"], environ={})
    assert s.api and s.medvram  # the flags this app knows still work alongside them
    assert not s.no_half  # --precision full alone is not --no-half (A1111 keeps fp16 weights with it)
    [warning] = warnings_from_config(caplog)
    assert warning.startswith(IGNORED)
    for flag in A1111_LINE.split():
        if flag.startswith("--"):
            assert flag in warning, flag
    assert "dark" not in warning  # a flag's value is dropped, not named as a flag

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_settings(["--listen", "--api"], environ={})
    assert warnings_from_config(caplog) == []  # nothing ignored: no warning


@pytest.mark.parametrize("line", [
    "--skip-torch-cuda-test", "--precision full", "--precision=full", "--theme dark", "--use-cpu interrogate",
    "--device-id 1", "--opt-sdp-no-mem-attention", "--medvram-sdxl",
    "--lyco-dir /x/LyCORIS", "--swinir-models-path /x/SwinIR", "--gradio-allowed-path /x/outputs", "-f",
    "--gradio-allowed-path=/x --gradio-allowed-path /y",  # A1111 appends each one
])
def test_each_ignored_flag_takes_its_a1111_argument(line, caplog):
    with caplog.at_level(logging.WARNING):
        s = parse_settings(shlex.split(line) + ["--port", "9001"], environ={})
    assert s.port == 9001  # the value was not taken for another flag, nor left over
    [warning] = warnings_from_config(caplog)
    assert warning.startswith(IGNORED) and line.split()[0].split("=")[0] in warning


def test_use_cpu_all_runs_on_the_cpu():
    assert parse_settings(["--use-cpu", "all"], environ={}).device == "cpu"
    assert parse_settings(["--use-cpu", "sd", "interrogate"], environ={}).device == "cpu"
    assert parse_settings(["--use-cpu", "all", "--device", "cuda"], environ={}).device == "cuda"  # explicit wins
    assert parse_settings(["--use-cpu", "interrogate"], environ={}).device == "auto"


def test_force_enable_xformers_means_xformers():
    assert parse_settings(["--force-enable-xformers"], environ={}).xformers


def test_a1111_flags_pass_but_a_misspelled_one_is_still_an_error(capsys):
    parse_settings(["--skip-torch-cuda-test"], environ={})  # spelled right: accepted
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--skip-torch-cuda-tset"], environ={})
    assert exit_.value.code == 2
    assert "unrecognized arguments: --skip-torch-cuda-tset" in capsys.readouterr().err
    for refused in A1111_REFUSED_FLAGS:
        with pytest.raises(SystemExit):  # an A1111 flag that cannot be honoured safely is refused, not ignored
            parse_settings([refused, "value"], environ={})  # (--ngrok passed as an abbreviation of --ngrok-region)
        # with a sentence saying why and what to do (argparse's bare 'unrecognized arguments' before; a probe)
        assert f"{refused} is a stable-diffusion-webui flag about who may reach" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--cors-allow-origins=*"], environ={})
    assert "a reverse proxy gives TLS" in capsys.readouterr().err
    # newer A1111 flags that do nothing here start with the usual warning
    assert parse_settings(["--no-prompt-history", "--unix-filenames-sanitization", "--filenames-max-length", "128"],
                          environ={})


# --- --server-name and GRADIO_SERVER_NAME ----------------------------------------------------------------------
def test_server_name_is_the_address_served_on():
    s = parse_settings(["--server-name", "192.168.1.5"], environ={})
    assert (s.host, s.public) == ("192.168.1.5", True)  # reachable from the network: treated as public
    s = parse_settings(["--listen", "--server-name", "127.0.0.1"], environ={})
    assert (s.host, s.public) == ("127.0.0.1", False)  # as in A1111, --server-name wins over --listen
    assert not parse_settings(["--server-name", "localhost"], environ={}).public


def test_gradio_server_name_sets_the_address_and_flags_win():
    env = {"GRADIO_SERVER_NAME": "192.168.1.5"}
    assert parse_settings([], environ=env).host == "192.168.1.5"
    assert parse_settings(["--listen"], environ=env).host == "0.0.0.0"
    assert parse_settings(["--server-name", "10.0.0.2"], environ=env).host == "10.0.0.2"
    assert parse_settings([], environ={"GRADIO_SERVER_NAME": "0.0.0.0"}).host == "0.0.0.0"
    assert parse_settings([], environ=env | {"SPACE_ID": "someone/app"}).host == "0.0.0.0"  # a Space needs 0.0.0.0


def test_the_printed_address_reaches_the_server():
    from webui.launch import browser_address, describe

    assert [browser_address(h) for h in ("0.0.0.0", "127.0.0.1", "192.168.1.5", "::")] == \
        ["127.0.0.1", "127.0.0.1", "192.168.1.5", "[::1]"]
    served = SimpleNamespace(blocks=SimpleNamespace(server_port=7860), url="http://127.0.0.1:7860", share_url=None)
    everywhere = describe(served, SimpleNamespace(settings=Settings(server_name="0.0.0.0")))
    assert everywhere[0].startswith("Running on http://0.0.0.0:7860 (all network interfaces")
    served.url = "http://192.168.1.5:7860"
    assert describe(served, SimpleNamespace(settings=Settings(server_name="192.168.1.5")))[0] == \
        "Running on local URL: http://192.168.1.5:7860"


def test_help_names_the_new_flags():
    text = build_parser().format_help()
    assert "--server-name" in text and "--models-dir" in text and "COMMANDLINE_ARGS" in text


# --- COMMANDLINE_ARGS ----------------------------------------------------------------------------------------
def test_commandline_args_is_read_and_the_command_line_wins(caplog):
    env = {"COMMANDLINE_ARGS": "--api --port 9000 --ckpt from-a1111 --xformers --skip-torch-cuda-test"}
    with caplog.at_level(logging.WARNING):
        s = parse_settings([], environ=env)
    assert (s.api, s.port, s.ckpt, s.xformers) == (True, 9000, "from-a1111", True)
    assert "--skip-torch-cuda-test" in warnings_from_config(caplog)[0]
    assert parse_settings(["--port", "8001"], environ=env).port == 8001
    assert parse_settings([], environ=env | {"WEBUI_ARGS": "--port 8002"}).port == 8002  # ours beats A1111's
    assert parse_settings([], environ=env | {"WEBUI_CKPT": "from-env"}).ckpt == "from-a1111"  # flags beat WEBUI_*


def test_a_bad_flag_in_commandline_args_says_where_it_is(capsys):
    with pytest.raises(SystemExit):
        parse_settings([], environ={"COMMANDLINE_ARGS": "--api --lisen"})
    assert "unrecognized arguments: --lisen (set in COMMANDLINE_ARGS)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings([], environ={"COMMANDLINE_ARGS": "--ckpt 'unclosed"})
    assert "COMMANDLINE_ARGS could not be read as flags" in capsys.readouterr().err


# --- --models-dir as A1111 means it ---------------------------------------------------------------------------
def test_models_dir_is_a1111s_models_folder(tmp_path):
    a1111 = tmp_path / "a1111-models"
    for sub in ("Stable-diffusion", "Lora", "VAE"):
        (a1111 / sub).mkdir(parents=True)
    assert parse_settings(["--models-dir", str(a1111)], environ={}).models_dir == a1111 / "Stable-diffusion"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert parse_settings(["--models-dir", str(plain)], environ={}).models_dir == plain  # no Stable-diffusion/
    both = parse_settings(["--models-dir", str(a1111), "--ckpt-dir", str(plain)], environ={})
    assert both.models_dir == plain  # --ckpt-dir names the checkpoints folder itself and wins, as in A1111
    env = {"WEBUI_CKPT_DIR": str(plain)}
    assert parse_settings(["--models-dir", str(a1111)], environ=env).models_dir == a1111 / "Stable-diffusion"
    assert parse_settings([], environ=env).models_dir == plain


def test_loras_come_from_lora_dir_or_the_lora_folder_of_the_models_folder(tmp_path):
    a1111 = tmp_path / "a1111-models"
    (a1111 / "Stable-diffusion").mkdir(parents=True)
    assert parse_settings(["--models-dir", str(a1111)], environ={}).lora_folder == a1111 / "Lora"  # beside it
    plain = tmp_path / "plain"
    plain.mkdir()
    assert parse_settings(["--ckpt-dir", str(plain)], environ={}).lora_folder == plain / "Lora"
    own = parse_settings(["--models-dir", str(a1111), "--lora-dir", str(tmp_path / "mine")], environ={})
    assert own.lora_folder == tmp_path / "mine"


def test_embeddings_come_from_embeddings_dir_or_a1111s_embeddings_folder(tmp_path):
    a1111 = tmp_path / "webui"
    (a1111 / "models" / "Stable-diffusion").mkdir(parents=True)
    assert parse_settings(["--models-dir", str(a1111 / "models")], environ={}).embeddings_folder == a1111 / "embeddings"
    assert parse_settings(["--ckpt-dir", str(tmp_path)], environ={}).embeddings_folder == tmp_path / "embeddings"
    own = parse_settings(["--embeddings-dir", str(tmp_path / "ti")], environ={})
    assert own.embeddings_folder == tmp_path / "ti"


def test_hypernetworks_come_from_hypernetwork_dir_or_the_hypernetworks_folder_of_the_models_folder(tmp_path):
    a1111 = tmp_path / "a1111-models"
    (a1111 / "Stable-diffusion").mkdir(parents=True)
    assert parse_settings(["--models-dir", str(a1111)], environ={}).hypernetwork_folder == a1111 / "hypernetworks"
    assert parse_settings(["--ckpt-dir", str(tmp_path)], environ={}).hypernetwork_folder == tmp_path / "hypernetworks"
    own = parse_settings(["--models-dir", str(a1111), "--hypernetwork-dir", str(tmp_path / "hn")], environ={})
    assert own.hypernetwork_folder == tmp_path / "hn"


def test_styles_come_from_styles_file_or_a1111s_own_or_the_outputs_folder(tmp_path):
    a1111 = tmp_path / "webui"
    (a1111 / "models" / "Stable-diffusion").mkdir(parents=True)
    out = ["--outdir", str(tmp_path / "out")]
    assert parse_settings(["--models-dir", str(a1111 / "models"), *out], environ={}).styles_path == tmp_path / "out" / "styles.csv"
    (a1111 / "styles.csv").write_text("name,prompt,negative_prompt\n")
    assert parse_settings(["--models-dir", str(a1111 / "models"), *out], environ={}).styles_path == a1111 / "styles.csv"
    own = parse_settings(["--styles-file", str(tmp_path / "mine.csv"), *out], environ={})
    assert own.styles_path == tmp_path / "mine.csv"


def test_the_model_list_leaves_out_the_lora_folder(tmp_path):
    """A LoRA is a .safetensors file too; listed as a checkpoint it would fail to load."""
    from webui.engine.models import scan_models_dir

    (tmp_path / "Lora").mkdir()
    (tmp_path / "Lora" / "detail.safetensors").write_bytes(b"x")
    (tmp_path / "sd15.safetensors").write_bytes(b"x")
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "shiny.safetensors").write_bytes(b"x")  # and the embeddings folder
    (tmp_path / "mine" / "Lora").mkdir(parents=True)
    (tmp_path / "mine" / "Lora" / "deep.safetensors").write_bytes(b"x")  # only the top Lora folder is A1111's
    assert sorted(entry.name for entry in scan_models_dir(tmp_path)) == ["mine/Lora/deep", "sd15"]
    # --lora-dir inside the models folder, under any name: left out too
    assert sorted(entry.name for entry in scan_models_dir(tmp_path, (tmp_path / "mine",))) == ["sd15"]


# --- --share with --nowebui -----------------------------------------------------------------------------------
def test_share_with_nowebui_warns_that_no_link_is_made(caplog):
    with caplog.at_level(logging.WARNING):
        s = parse_settings(["--nowebui", "--share"], environ={})
    assert not s.share and s.api_enabled
    assert any("--share is ignored with --nowebui" in w for w in warnings_from_config(caplog))
    assert parse_settings(["--share"], environ={}).share  # with the web UI it still asks for a link


def test_a_models_folder_that_does_not_exist_is_named_in_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        settings = parse_settings(["--ckpt-dir", str(tmp_path / "modles")], environ={})  # a typo
    assert settings.models_dir == tmp_path / "modles"
    assert any(str(tmp_path / "modles") in w and "does not exist" in w and "--ckpt-dir" in w
               for w in warnings_from_config(caplog))


def test_an_outdir_where_nobody_can_write_is_refused_even_for_root(tmp_path, capsys, monkeypatch):
    """os.access says yes to root everywhere; a read-only place (/sys, a root-squashed share) is found by
    trying. Here the write is made to fail as such a filesystem fails it."""
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    with pytest.raises(SystemExit):
        parse_settings(["--outdir", str(tmp_path / "out")], environ={})
    err = capsys.readouterr().err
    assert f"--outdir {tmp_path / 'out'}: {tmp_path} is not writable (Operation not permitted)" in err


def test_nowebui_is_refused_on_zerogpu_which_lends_its_gpu_through_the_web_ui(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--nowebui"], environ={"SPACES_ZERO_GPU": "true", "SPACE_ID": "me/space"})
    assert "--nowebui cannot run on ZeroGPU" in capsys.readouterr().err
    assert parse_settings(["--nowebui"], environ={}).nowebui  # anywhere else it is fine
