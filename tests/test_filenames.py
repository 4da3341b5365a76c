"""Saved images' names from A1111's Images filename pattern: its tags, and names that stay inside their folder."""
from __future__ import annotations

import datetime as dt

import pytest
from PIL import Image

from webui.schemas import InvalidRequest, JobState
from webui.storage.filenames import NameParts, file_name_part
from webui.storage.outputs import OutputStore

PARTS = NameParts(seed=1234, prompt="a cat, on a mat: (dusk)", negative_prompt="blurry", steps=20, cfg_scale=7.5,
                  width=512, height=768, sampler="DPM++ 2M", scheduler="Karras", model_name="v1-5 pruned",
                  model_hash="6ce0161689", clip_skip=2, batch_number=1, batch_size=4)
NOW = dt.datetime(2026, 11, 27, 9, 5, 3)


@pytest.mark.parametrize("pattern, name", [
    ("", "1234"),  # A1111's default: [seed]
    ("[seed]-[prompt_spaces]", "1234-a cat, on a mat_ (dusk)"),
    ("[prompt]", "a_cat,_on_a_mat__(dusk)"),
    ("[prompt_words]", "a cat on a mat dusk"),
    ("[steps]-[cfg]-[width]x[height]-[sampler]-[scheduler]", "20-7.5-512x768-DPM++ 2M-Karras"),
    ("[sampler_scheduler]", "DPM++ 2M Karras"),
    ("[model_name]_[model_hash]_[clip_skip]", "v1-5 pruned_6ce0161689_2"),
    ("[date] [datetime] [batch_number]of[batch_size]", "2026-11-27 20261127090503 2of4"),  # counted from 1
    ("[seed][none]", "1234"),
    ("[cfg]", "7.5"),
    ("[SEED]", "1234"),  # tags read in any case
    ("[seed]-[wobbly]", "1234-[wobbly]"),  # a tag not known here stays as written, as in A1111
    ("../../etc/[seed]", ".._.._etc_1234"),  # no folder in a name: it stays where images go
    ("[none]", ""),  # the number alone, as A1111
])
def test_a1111s_tags_fill_the_pattern(pattern, name):
    assert file_name_part(pattern, PARTS, NOW) == name


@pytest.mark.parametrize("pattern, name", [
    ("[datetime]", "20261127090503"),
    ("[datetime<%Y-%m-%d_%H-%M>]", "2026-11-27_09-05"),
    ("[datetime<>]", "20261127090503"),  # an empty format: the default
    ("[datetime<%H:%M><Asia/Tokyo>]", "18_05"),  # 09:05 UTC is 18:05 in Tokyo; ":" cannot be in a file name
    ("[datetime<%H><No/Such_Zone>]", "09"),  # an unknown zone: the server's time, in the format given, as A1111
    ("[datetime<%Y/%m>]-[seed]", "2026_11-1234"),  # never a folder
    ("[seed<x>]", "1234"),  # arguments a tag does not take are ignored
])
def test_datetime_takes_a1111s_format_and_time_zone(pattern, name):
    now = NOW.replace(tzinfo=dt.timezone.utc)
    assert file_name_part(pattern, PARTS, now) == name


MORE = NameParts(seed=12, prompt="film still of a red Cat", sampler="Euler a",
                 scheduler="SGM Uniform", prompt_no_styles="a red Cat", styles=("Film", "None"),
                 seeds=(11, 12, 13, 14), image_number=1, image_count=4, batch_size=4, negative_prompt="styled, blurry",
                 negative_no_styles="blurry", job_started=dt.datetime(2026, 1, 2, 3, 4, 5),
                 vae_file="vae-ft-mse-840000.safetensors", picture=Image.new("RGB", (2, 2), "red"))


@pytest.mark.parametrize("pattern, name", [
    ("[prompt_no_styles]", "a red Cat"),
    ("[styles]", "Film"),  # "None" is no style, as in A1111
    ("[seed_first]-[seed_last]", "11-14"),
    ("[generation_number]", "2"),  # counted from 1 through the job
    ("[job_timestamp]", "20260102030405"),
    ("[hasprompt<cat><dog|nodog>]", "catnodog"),  # the words found (in lower case), else their alternatives
    ("[hasprompt<red|>][hasprompt<blue>]", "red"),
    ("[hasprompt<Red Cat>]", "red_cat"),  # spaces as underscores, as A1111
    ("[negative_prompt_hash<6>]", "a51b6d"),  # of the negative prompt before its styles, as A1111
    ("[vae_filename]", "vae-ft-mse-840000"),
    ("[image_hash<10>]", "fcf067f632"),  # sha256 of the pixels: b'\xff\x00\x00' x 4
    ("[prompt_hash<4>]-[full_prompt_hash<12>]", "7e65-bc8fb87f426d"),  # sha256 cut to the length; full: unstyled
    ("[sampler_scheduler]", "Euler a Sgm uniform"),  # A1111 capitalises the schedule so
    ("[scheduler]", "Sgm uniform"),
    ("[user]", "[user]"),  # A1111's login name; none here, so as written (A1111 writes it so without a login)
])
def test_more_of_a1111s_tags(pattern, name):
    assert file_name_part(pattern, MORE, NOW) == name


def test_the_rest_of_a1111s_tags_without_what_they_read():
    alone = NameParts(seed=3)
    assert file_name_part("[styles]", alone, NOW) == "None"
    assert file_name_part("[prompt_no_styles]", NameParts(seed=3, prompt="plain"), NOW) == "plain"
    assert file_name_part("[seed]-[generation_number]", alone, NOW) == "3"  # a lone picture: nothing, nor the "-"
    # batches of one (several batches), as A1111: the picture's own seed first, no last one
    one_of_many = NameParts(seed=10, seeds=(9, 10), image_number=1, image_count=2)
    assert file_name_part("[seed_first]-[seed_last]", one_of_many, NOW) == "10"
    assert file_name_part("[vae_filename]", alone, NOW) == "NoneType"  # the model's own VAE, as A1111 writes it
    assert file_name_part("[vae_filename]", NameParts(seed=3, vae_file=".hidden.pt"), NOW) == "hidden"
    assert file_name_part("[image_hash]", alone, NOW) == "[image_hash]"


def test_a_picture_made_alone_has_no_batch_number_nor_the_text_before_it():
    alone = NameParts(seed=3, batch_size=1)
    assert file_name_part("[seed]-[batch_number]", alone, NOW) == "3"
    assert file_name_part("[seed] #[batch_number] end", alone, NOW) == "3 end"
    assert file_name_part("[seed]-[cfg]", alone, NOW) == "3-0.0"
    # [denoising] of a picture made with none (txt2img): the text before it goes too, as A1111's
    assert file_name_part("[seed]-[denoising]-end", alone, NOW) == "3-end"
    assert file_name_part("[seed]-[denoising]", NameParts(seed=3, denoising_strength=0.5), NOW) == "3-0.5"


def test_long_prompts_are_cut_to_fit_a_file_system_in_bytes_and_hashes_name_them_shortly():
    long = NameParts(seed=1, prompt="word " * 200)
    assert len(file_name_part("[prompt_spaces]", long, NOW)) <= 128
    assert len(file_name_part("[prompt_spaces] [prompt_spaces] [prompt_spaces]", long, NOW)) <= 200
    for text in ("猫" * 300, "🐱" * 300, "e\u0301" * 300):  # 3, 4 and 1 + 2 bytes a character in UTF-8
        name = file_name_part("[seed]-[prompt_spaces]", NameParts(seed=1, prompt=text), NOW)
        assert len(name.encode("utf-8")) <= 200 and name.startswith("1-")
        name.encode("utf-8").decode("utf-8")  # cut at a character's end
    hashed = file_name_part("[prompt_hash]-[negative_prompt_hash]", PARTS, NOW)
    assert len(hashed) == 17 and hashed != file_name_part("[prompt_hash]-[negative_prompt_hash]",
                                                           NameParts(seed=1, prompt="a dog"), NOW)


def test_the_store_names_a_picture_by_the_pattern_after_its_number(tmp_path):
    store = OutputStore(tmp_path)
    store.options.update({"samples_filename_pattern": "[seed]-[prompt_words]"})
    first = store.save_image(Image.new("RGB", (8, 8)), "x", seed=1234, name_parts=PARTS)
    second = store.save_image(Image.new("RGB", (8, 8)), "x", seed=1234, name_parts=PARTS)
    assert (first.name, second.name) == ("00000-1234-a cat on a mat dusk.png", "00001-1234-a cat on a mat dusk.png")
    with pytest.raises(InvalidRequest, match="samples_filename_pattern: String should have at most 200 characters"):
        store.options.update({"samples_filename_pattern": "[seed]" * 40})


def test_a_cjk_prompt_in_the_name_still_saves(tmp_path):
    store = OutputStore(tmp_path)
    store.options.update({"samples_filename_pattern": "[prompt_spaces]"})
    path = store.save_image(Image.new("RGB", (8, 8)), "x", seed=1, name_parts=NameParts(seed=1, prompt="灯台" * 90))
    assert path.is_file() and path.name.startswith("00000-灯台")
    store.options.update({"samples_filename_pattern": "[none]"})
    assert store.save_image(Image.new("RGB", (8, 8)), "x", seed=1).name == "00001.png"


def test_a_job_names_its_files_by_the_pattern(services):
    services.options.update({"samples_filename_pattern": "[seed]-[model_name]-[prompt_spaces]"})
    job = services.worker.submit({"prompt": "a red apple", "steps": 2, "seed": 9, "batch_size": 2})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert [image.path.rsplit("/", 1)[1] for image in job.images] == [
        "00000-9-tiny-sd-a red apple.png", "00001-10-tiny-sd-a red apple.png"]
    services.options.update({"samples_filename_pattern": "[seed]_[batch_number]"})
    job = services.worker.submit({"prompt": "a red apple", "steps": 2, "seed": 9, "batch_size": 2})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert [image.path.rsplit("/", 1)[1] for image in job.images] == ["00002-9_1.png", "00003-10_2.png"]


def test_a_job_fills_a1111s_job_tags(services):
    from webui.storage.styles import Style

    services.styles.save(Style("Film", "film still of {prompt}", ""))
    services.options.update({"samples_filename_pattern":
                             "[prompt_no_styles]-[styles]-[generation_number]of[seed_first]-[seed_last]-[vae_filename]"})
    job = services.worker.submit({"prompt": "a red apple", "styles": ["Film"], "steps": 1, "seed": 9, "batch_size": 2})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    names = [image.path.rsplit("/", 1)[1] for image in job.images]
    assert names == ["00000-a red apple-Film-1of9-10-NoneType.png", "00001-a red apple-Film-2of9-10-NoneType.png"]
    services.options.update({"samples_filename_pattern": "[job_timestamp]_[image_hash<12>]"})
    job = services.worker.submit({"prompt": "a red apple", "steps": 1, "seed": 9})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    import hashlib
    saved = Image.open(job.images[0].path)
    started = dt.datetime.fromtimestamp(job.started_at).strftime("%Y%m%d%H%M%S")
    expected = f"00002-{started}_{hashlib.sha256(saved.convert('RGB').tobytes()).hexdigest()[:12]}.png"
    assert job.images[0].path.rsplit("/", 1)[1] == expected


def test_width_and_height_in_a_name_are_the_saved_pictures(services):
    """As A1111 (the image's own size): the hires fix's result was named by the first pass's size."""
    services.options.update({"samples_filename_pattern": "[width]x[height]"})
    job = services.worker.submit({"prompt": "a red apple", "steps": 1, "seed": 9, "width": 64, "height": 64,
                                  "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 1})
    assert job.wait(120) and job.state is JobState.DONE, job.error
    assert Image.open(job.images[0].path).size == (128, 128)
    assert job.images[0].path.endswith("-128x128.png")
