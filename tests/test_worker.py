"""The worker: order, per-job cancel and skip, failures, a full queue, saving and history."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from webui.engine.models import ModelNotFound
from webui.schemas import GenerationRequest, InvalidRequest, JobState
from webui.storage.infotext import request_fields_from_infotext
from webui.storage.outputs import read_infotext
from webui.worker import QueueFull, WorkerStopped
from tests.conftest import TINY
from tests.helpers import finished_job, raising, wait_for

QUICK = {"prompt": "a red apple", "steps": 2, "seed": 1}




def test_a_job_makes_saved_images_with_infotext_and_history(services):
    job = services.worker.submit(QUICK | {"batch_size": 2, "n_iter": 2, "seed": 40})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert job.seeds == [40, 41, 42, 43] and [im.seed for im in job.images] == [40, 41, 42, 43]
    with Image.open(job.images[1].path) as png:
        text = read_infotext(png)
    assert text.startswith("a red apple\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 41")
    assert "Size: 64x64, Model hash: " in text and "Model: tiny-sd, Batch size: 2, Batch pos: 1," in text
    assert "Batch pos: 0," in job.images[2].infotext  # the first of the second batch
    rows, total = services.history.list_images()
    assert total == 4 and rows[0].seed == 43 and rows[0].job_state == "done"
    assert job.grid_path and "txt2img-grids" in job.grid_path


def test_the_grid_takes_the_settings_row_count(services):
    services.options.update({"n_rows": 0})  # as many rows as the batch size: each batch a column
    job = services.worker.submit(QUICK | {"batch_size": 3, "n_iter": 2, "save_images": True})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert job.grid.size == (2 * 64, 3 * 64)
    services.options.update({"n_rows": 6})
    job = services.worker.submit(QUICK | {"batch_size": 3, "n_iter": 2, "save_images": True})
    assert job.wait(60) and job.grid.size == (64, 6 * 64)


def test_same_request_twice_gives_identical_pixels_and_random_seed_is_recorded(services):
    a = services.worker.submit(QUICK)
    b = services.worker.submit(QUICK)
    r = services.worker.submit(QUICK | {"seed": -1})
    for job in (a, b, r):
        assert job.wait(60) and job.state is JobState.DONE
    assert np.array_equal(np.asarray(a.images[0].image), np.asarray(b.images[0].image))
    assert r.seeds[0] != -1 and f"Seed: {r.seeds[0]}," in r.images[0].infotext


def test_a_padded_prompt_says_so_in_the_infotext_as_a1111_does(services):
    long_text = ", ".join(["a red apple"] * 30)  # two 75-token chunks against the negative prompt's one
    padded = services.worker.submit(QUICK | {"prompt": long_text, "negative_prompt": "blurry"})
    even = services.worker.submit(QUICK | {"negative_prompt": "blurry"})
    for job in (padded, even):
        assert job.wait(60) and job.state is JobState.DONE, job.error
    assert "Pad conds: True" in padded.images[0].infotext  # A1111 pads too when this text is pasted there
    assert "Pad conds" not in even.images[0].infotext


def test_the_infotext_keeps_every_digit_of_the_cfg_scale(services):
    job = services.worker.submit(QUICK | {"cfg_scale": 7.1234567})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert "CFG scale: 7.1234567," in job.images[0].infotext  # pasting it back gives the same image


def test_save_images_false_writes_nothing(services):
    job = services.worker.submit(QUICK | {"save_images": False, "batch_size": 2})
    assert job.wait(60) and job.state is JobState.DONE
    assert job.images[0].path is None and services.history.list_images()[1] == 0
    assert job.grid is None  # nor holds a grid nobody sees


def test_jobs_run_in_order_and_report_queue_positions(services):
    long = services.worker.submit(QUICK | {"steps": 30})
    jobs = [services.worker.submit(QUICK | {"seed": s}) for s in (1, 2, 3)]
    wait_for(lambda: long.state is JobState.RUNNING)
    assert [services.worker.position(j.id) for j in jobs] == [1, 2, 3]
    for job in jobs:
        assert job.wait(60)
    assert long.finished_at <= jobs[0].started_at
    assert jobs[0].finished_at <= jobs[1].started_at <= jobs[2].started_at


def test_cancel_a_queued_job_leaves_the_others(services):
    first = services.worker.submit(QUICK | {"steps": 20})
    victim = services.worker.submit(QUICK)
    last = services.worker.submit(QUICK)
    assert services.worker.cancel(victim.id)
    assert victim.state is JobState.CANCELLED and victim.wait(0)
    assert first.wait(60) and last.wait(60)
    assert (first.state, last.state) == (JobState.DONE, JobState.DONE)
    assert services.history.get_job(victim.id)["state"] == "cancelled"


def test_cancel_a_running_job_stops_it_at_the_next_step(services):
    victim = services.worker.submit(QUICK | {"steps": 150, "n_iter": 3})
    other = services.worker.submit(QUICK)
    wait_for(lambda: victim.progress.step >= 2)
    assert services.worker.cancel(victim.id)
    assert victim.wait(30) and victim.state is JobState.CANCELLED
    # As A1111: the picture cut short is shown as it stood, and never saved.
    assert victim.progress.step < 150 and [(im.seed, im.unfinished, im.path) for im in victim.images] == [
        (1, True, None)]
    assert "Steps: 150" in victim.images[0].infotext  # what was asked for, as A1111 writes it
    assert services.history.list_images()[1] == 0
    assert other.wait(60) and other.state is JobState.DONE and len(other.images) == 1
    assert not services.worker.cancel(victim.id)  # already finished


def test_the_add_to_infotext_switches_leave_their_keys_out(services):
    every = finished_image(services).infotext
    for key in ("Model hash: ", "Model: ", "Version: diffusers-webui"):
        assert key in every
    services.options.update({"add_model_hash_to_info": False, "add_model_name_to_info": False,
                             "add_version_to_infotext": False})
    image = finished_image(services)
    bare = image.infotext
    assert "Model hash" not in bare and "Model:" not in bare and "Version" not in bare
    assert "Steps: 2" in bare and "Seed: 1" in bare  # the rest as before
    with Image.open(image.path) as saved:  # the file says the same
        assert read_infotext(saved) == bare


def finished_image(services):
    job = services.worker.submit(QUICK)
    assert job.wait(60) and job.state is JobState.DONE, job.error
    return job.images[0]


@pytest.mark.parametrize("by", ["setting", "request"])
def test_save_incomplete_images_saves_what_interrupt_and_skip_cut_short(services, by):
    # A1111's Save incomplete images: the Settings tab's, or the request's own (override_settings on the API)
    if by == "setting":
        services.options.update({"save_incomplete_images": True})
    fields = {"save_incomplete_images": True} if by == "request" else {}
    skipped = services.worker.submit(QUICK | fields | {"steps": 150, "n_iter": 2, "seed": 20})
    wait_for(lambda: skipped.progress.step >= 2)
    assert services.worker.skip(skipped.id) and skipped.wait(60) and skipped.state is JobState.DONE
    cut = services.worker.submit(QUICK | fields | {"steps": 150, "seed": 30})
    wait_for(lambda: cut.progress.step >= 2)
    assert services.worker.cancel(cut.id) and cut.wait(30) and cut.state is JobState.CANCELLED
    images = [*skipped.images, *cut.images]
    assert [(im.seed, im.unfinished) for im in images] == [(20, True), (21, False), (30, True)]
    assert all(im.path and Path(im.path).exists() for im in images)
    with Image.open(cut.images[0].path) as saved:  # as it stood, with what was asked for (A1111 writes the same)
        assert "Steps: 150" in read_infotext(saved) and "Seed: 30" in read_infotext(saved)
    rows, count = services.history.list_images()
    assert count == 3 and {row.seed for row in rows} == {20, 21, 30}
    assert skipped.grid_path is None  # one finished picture: no grid, as before


def test_an_interrupted_run_keeps_the_grid_of_the_pictures_it_finished(services, monkeypatch):
    """As A1111's, whose grid is made of the pictures a run made before its Interrupt."""
    from webui.worker import Worker

    run_batch = Worker._run_batch

    def interrupted_after_two(self, job, batch, pace):
        run_batch(self, job, batch, pace)
        if batch == 1:
            job.cancel_event.set()  # an Interrupt between the second and the third batch

    monkeypatch.setattr(Worker, "_run_batch", interrupted_after_two)
    job = services.worker.submit(QUICK | {"n_iter": 3, "seed": 40, "save_images": True})
    assert job.wait(60) and job.state is JobState.CANCELLED
    assert [image.seed for image in job.images] == [40, 41]
    assert job.grid_path and Path(job.grid_path).exists() and job.grid.size == (128, 64)


def test_a_job_cancelled_as_the_worker_takes_it_loads_no_model(services, monkeypatch):
    from webui.worker import Job
    from webui.schemas import parse_request

    loads = []
    monkeypatch.setattr(services.engine, "load", loads.append)
    job = Job(id="taken", request=parse_request(QUICK | {"model": "another-model"}), origin="ui")
    services.history.add_job(job.id, "ui", job.request.model_dump(), job.created_at)
    job.cancel_event.set()
    services.worker._run_job(job)  # as the worker thread runs it right after taking it off the queue
    assert job.state is JobState.CANCELLED and loads == []


def test_skip_ends_the_current_batch_and_goes_on(services):
    job = services.worker.submit(QUICK | {"steps": 150, "n_iter": 2, "seed": 10})
    wait_for(lambda: job.progress.step >= 2)
    assert services.worker.skip(job.id)
    assert job.wait(60) and job.state is JobState.DONE
    # Batch 0 (seed 10) was skipped: shown unfinished, not saved, not in the grid (one finished image: no grid).
    assert [(im.seed, im.unfinished, im.path is None) for im in job.images] == [(10, True, True), (11, False, False)]
    assert job.grid_path is None and services.history.list_images()[1] == 1


def test_a_failing_job_is_marked_and_the_next_one_runs(services, caplog):
    with caplog.at_level("WARNING", logger="webui.worker"):
        bad = services.worker.submit(QUICK | {"model": "no-such-model"})
        good = services.worker.submit(QUICK)
        assert bad.wait(60) and bad.state is JobState.FAILED
    assert "no-such-model" in bad.error and "not found" in bad.error
    # a model that is not there is said in a line of the log, not a traceback (each Generate logged one)
    said = [record for record in caplog.records if bad.id in record.getMessage()]
    assert said and not any(record.exc_info for record in said)
    assert good.wait(60) and good.state is JobState.DONE
    assert services.history.get_job(bad.id)["error"] == bad.error


def test_an_exception_inside_the_engine_does_not_kill_the_worker(services, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(services.engine, "generate", explode)
    bad = services.worker.submit(QUICK)
    assert bad.wait(30) and bad.state is JobState.FAILED and "device-side assert" in bad.error
    monkeypatch.undo()
    good = services.worker.submit(QUICK)
    assert good.wait(60) and good.state is JobState.DONE


def test_a_full_queue_refuses_with_a_clear_error(services):
    services.worker.max_queue = 2
    blocker = services.worker.submit(QUICK | {"steps": 150})
    wait_for(lambda: blocker.state is JobState.RUNNING)
    services.worker.submit(QUICK)
    services.worker.submit(QUICK)
    with pytest.raises(QueueFull, match=r"queue is full \(2 jobs waiting\)"):
        services.worker.submit(QUICK)
    services.worker.max_queue = 1
    with pytest.raises(QueueFull, match=r"queue is full \(1 job waiting\)"):  # was "1 jobs"
        services.worker.submit(QUICK)
    services.worker.cancel(blocker.id)


def test_invalid_requests_are_refused_before_queueing(services):
    with pytest.raises(InvalidRequest, match="width: must be a multiple of 8, got 500"):
        services.worker.submit(QUICK | {"width": 500})
    assert services.worker.queue_length() == 0 and services.history.list_images()[1] == 0


def test_a_clip_skip_deeper_than_the_loaded_models_text_encoder_is_refused_before_queueing(services):
    from tests.tiny_sd import TEXT_LAYERS

    with pytest.raises(InvalidRequest, match=f"clip_skip: .*text encoder has {TEXT_LAYERS} layers; use 1 to {TEXT_LAYERS}"):
        services.worker.submit(QUICK | {"clip_skip": TEXT_LAYERS + 1})
    assert services.worker.queue_length() == 0 and services.history.list_images()[1] == 0
    assert services.worker.submit(QUICK | {"clip_skip": TEXT_LAYERS}).wait(60)  # the deepest one runs


def test_progress_and_preview_during_a_run(services):
    job = services.worker.submit(QUICK | {"steps": 60})
    wait_for(lambda: job.watch_preview() is not None)
    frame, step = job.preview_frame()
    assert frame.size == (64, 64) and step % 2 == 0
    assert 0 < job.progress.fraction < 1 and job.progress.total_steps == 60
    assert job.progress.eta_seconds is not None and job.progress.eta_seconds >= 0
    assert job.wait(60) and job.watch_preview() is None and job.progress.step == 60


def test_switching_models_through_the_worker(services, models_dir, tmp_path):
    from tests.tiny_sd import save_tiny_model
    from webui.engine.loader import ModelLoadError

    save_tiny_model(models_dir / "tiny-other", seed=1)
    try:
        services.registry.refresh()
        loaded = services.worker.load_model("tiny-other")
        assert loaded.entry.name == "tiny-other" and services.engine.model.entry.name == "tiny-other"
        job = services.worker.submit(QUICK | {"model": "tiny-sd"})
        assert job.wait(60) and job.model.entry.name == "tiny-sd"
        with pytest.raises((ModelLoadError, ValueError)):
            services.worker.load_model("missing-model")
        assert services.engine.model.entry.name == "tiny-sd"
    finally:
        import shutil
        shutil.rmtree(models_dir / "tiny-other")
        services.registry.refresh()


def finished_jobs(services, monkeypatch, count=3, extra=None, **limits):
    """Jobs run to the end, with the worker's limits on finished jobs set (KEEP_FINISHED_JOBS=2, ...)."""
    import webui.worker as worker_module

    for name, value in limits.items():
        monkeypatch.setattr(worker_module, name, value)
    jobs = [services.worker.submit(QUICK | {"seed": seed} | (extra or {})) for seed in range(count)]
    for job in jobs:
        assert job.wait(60)
    return jobs


def test_old_finished_jobs_are_forgotten_but_stay_in_the_history(services, monkeypatch):
    jobs = finished_jobs(services, monkeypatch, KEEP_FINISHED_JOBS=2, KEEP_FINISHED_SECONDS=0)
    latest = services.worker.submit(QUICK)
    assert services.worker.get(jobs[0].id) is None
    assert services.worker.get(jobs[2].id) is jobs[2] and services.worker.get(latest.id) is latest
    assert services.history.get_job(jobs[0].id)["state"] == "done"
    latest.wait(60)


def test_finished_jobs_holding_too_many_pixels_are_forgotten_but_the_newest_stays(services, monkeypatch):
    jobs = finished_jobs(services, monkeypatch, extra={"batch_size": 2, "save_images": False},
                         KEEP_FINISHED_PIXELS=3 * 64 * 64, KEEP_FINISHED_SECONDS=0)  # room for three 64x64 images
    services.worker.call(lambda engine: None).result(60)  # the worker has tidied up after the last job
    assert [services.worker.get(job.id) for job in jobs] == [None, None, jobs[2]]


def test_the_job_that_finished_last_stays_though_another_was_submitted_later(services, monkeypatch):
    """A job cancelled in the queue finishes before the running one it was queued behind."""
    import webui.worker as worker_module

    monkeypatch.setattr(worker_module, "KEEP_FINISHED_PIXELS", 3 * 64 * 64)
    monkeypatch.setattr(worker_module, "KEEP_FINISHED_SECONDS", 0)
    big = services.worker.submit(QUICK | {"steps": 20, "batch_size": 4, "save_images": False})
    cancelled = services.worker.submit(QUICK)
    services.worker.cancel(cancelled.id)
    assert big.wait(60) and big.state is JobState.DONE
    services.worker.call(lambda engine: None).result(60)
    assert services.worker.get(big.id) is big and services.worker.get(cancelled.id) is None


def test_a_job_that_just_finished_stays_readable_whatever_its_images_weigh(services, monkeypatch):
    import webui.worker as worker_module

    monkeypatch.setattr(worker_module, "KEEP_FINISHED_PIXELS", 64 * 64)
    jobs = [services.worker.submit(QUICK | {"seed": s, "batch_size": 2, "save_images": False}) for s in range(2)]
    for job in jobs:
        assert job.wait(60)
    services.worker.call(lambda engine: None).result(60)
    assert [services.worker.get(job.id) for job in jobs] == jobs  # KEEP_FINISHED_SECONDS has not passed


def test_recent_jobs_past_the_hard_pixel_cap_are_forgotten_too(services, monkeypatch):
    """A fast GPU fills the 120 s grace with ~1,200 images; past KEEP_RECENT_PIXELS even recent jobs go."""
    jobs = finished_jobs(services, monkeypatch, extra={"batch_size": 2, "save_images": False},
                         KEEP_FINISHED_PIXELS=64 * 64, KEEP_RECENT_PIXELS=3 * 64 * 64)
    services.worker.call(lambda engine: None).result(60)
    assert [services.worker.get(job.id) for job in jobs] == [None, None, jobs[2]]


def test_an_idle_worker_forgets_finished_jobs_when_their_time_is_up(services, monkeypatch):
    """Not only at the next submit: a server left idle gives the memory back."""
    jobs = finished_jobs(services, monkeypatch, KEEP_FINISHED_JOBS=1, KEEP_FINISHED_SECONDS=0.2)
    wait_for(lambda: [services.worker.get(job.id) for job in jobs] == [None, None, jobs[2]], timeout=10,
             what="the idle worker to forget the older jobs")


def test_a_full_disk_loses_no_picture_and_says_so(services, monkeypatch):
    import errno

    from webui.ui.progress import final_html

    real_save, calls = services.outputs.save_image, []

    def full_disk_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(services.outputs, "save_image", full_disk_at_the_second)
    job = services.worker.submit(QUICK | {"batch_size": 2, "n_iter": 2})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert len(job.images) == 4 and job.images[1].path is None and job.images[2].path is not None
    assert len(job.warnings) == 1 and "image 2 was not saved" in job.warnings[0] and "No space" in job.warnings[0]
    assert services.history.list_images()[1] == 3
    assert "image 2 was not saved" in final_html(job) and "--outdir" in final_html(job)


def test_a_history_that_cannot_be_written_keeps_the_file_and_the_picture(services, monkeypatch):
    import sqlite3

    monkeypatch.setattr(services.history, "add_image", raising(sqlite3.OperationalError("database or disk is full")))
    monkeypatch.setattr(services.outputs, "save_grid", raising(OSError("read-only")))
    job = services.worker.submit(QUICK | {"batch_size": 2})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert len(job.images) == 2 and all(Path(im.path).is_file() for im in job.images)
    assert "the grid was not saved: OSError: read-only" in job.warnings and job.grid is None
    names = ", ".join(Path(image.path).name for image in job.images)
    assert job.warnings[-1] == (f"saved; the history database did not take their rows now, so {names} join the "
                                "history at the next start")
    # ... and so they do: the next start writes the rows kept beside the database
    monkeypatch.undo()
    assert services.history.reconcile(fail_unfinished_jobs=False)["rows_written_late"] == 2
    assert sorted(row.path for row in services.history.list_images(page_size=100)[0] if row.job_id == job.id) == sorted(
        Path(image.path).relative_to(services.outputs.outdir).as_posix() for image in job.images)
    assert not services.history.later_path.exists()


def test_stopping_releases_every_queued_job_and_call_and_takes_no_more(services):
    from webui.worker import WorkerStopped

    running = services.worker.submit(QUICK | {"steps": 30})
    queued = services.worker.submit(QUICK)
    call = services.worker.call(lambda engine: "never runs")
    wait_for(lambda: running.state is JobState.RUNNING)
    services.worker.stop()
    assert queued.wait(0) and queued.state is JobState.CANCELLED and running.wait(30)
    with pytest.raises(WorkerStopped):
        call.result(0)
    with pytest.raises(WorkerStopped, match="shutting down"):
        services.worker.submit(QUICK)
    assert services.history.get_job(queued.id)["state"] == "cancelled"


def test_a_failing_history_write_neither_hangs_clients_nor_kills_the_worker(services, monkeypatch):
    def locked(*args, **kwargs):
        raise __import__("sqlite3").OperationalError("database is locked")

    monkeypatch.setattr(services.history, "set_job_state", locked)
    job = services.worker.submit(QUICK | {"save_images": False})
    assert job.wait(60), "a client waiting on the job must be released"
    monkeypatch.undo()
    after = services.worker.submit(QUICK)
    assert after.wait(60) and after.state is JobState.DONE


def test_the_eta_counts_the_pace_of_the_steps_not_the_wait_before_the_first(services, monkeypatch):
    """A model load or a compile before step 1 (a minute on a GPU) made the old ETA many times too long."""
    import webui.worker as worker_module
    from webui.worker import BatchSkipped, StepPace

    now, etas = [0.0], {}
    monkeypatch.setattr(worker_module, "StepPace", lambda: StepPace(clock=lambda: now[0]))

    def slow_start_then_quick_steps(request, seeds, on_step, subseeds=None, init_image=None, inpainting=None):
        batch = len(etas) // 20
        now[0] += 60.0  # a compile
        for step in range(1, 21):
            on_step(step, 20, None)
            etas[batch, step] = services.worker.get(job.id).progress.eta_seconds
            now[0] += 0.5  # each step
        raise BatchSkipped  # no pictures needed

    monkeypatch.setattr(services.engine, "generate", slow_start_then_quick_steps)
    job = services.worker.submit(QUICK | {"steps": 20, "n_iter": 2, "save_images": False})
    assert job.wait(30)
    assert etas[0, 1] is None  # no pace yet
    assert etas[0, 10] == 0.5 * (10 + 20)  # 10 steps left in this batch and 20 in the next
    assert etas[1, 1] == 0.5 * 19  # the second batch's own wait before step 1 does not count either


def test_one_step_batches_get_an_eta_from_the_second_batch_on():
    from webui.worker import StepPace

    now = [0.0]
    pace = StepPace(clock=lambda: now[0])
    pace.step(1, 1)
    assert pace.eta(4) is None  # nothing timed yet
    now[0] += 0.8  # the step, its decode and saving
    pace.step(1, 1)
    assert pace.eta(3) == pytest.approx(0.8 * 3)


def test_a_new_batchs_progress_starts_at_step_0(services, monkeypatch):
    """Between batches the progress gave the new batch's number with the last batch's step count (/progress's
    job_no 1 and sampling_step 10 of 10): a client working out progress from them went back. Found by a probe."""
    seen = []
    real = services.engine.generate

    def generate(*args, **kwargs):
        progress = services.worker.current().progress
        seen.append((progress.image_index, progress.step))
        return real(*args, **kwargs)

    monkeypatch.setattr(services.engine, "generate", generate)
    finished_job(services, QUICK | {"steps": 3, "n_iter": 2, "save_images": False})
    assert seen == [(0, 0), (1, 0)]


def test_a_batch_whose_first_report_is_past_step_one_is_timed_from_it():
    """A1111's DDIM at 2 steps calls the model once: its first report is step 2 (the pace had no start to time
    from, and the job failed)."""
    from webui.worker import StepPace

    now = [0.0]
    pace = StepPace(clock=lambda: now[0])
    pace.step(2, 2)
    assert pace.eta(2) is None
    now[0] += 0.6
    pace.step(2, 2)  # the next batch: a whole batch over its steps
    assert pace.eta(2) == pytest.approx(0.3 * 2)
    now[0] += 10.0  # a slow batch (it compiled for a new size): timed anew at every batch (found by review)
    pace.step(2, 2)
    assert pace.eta(2) == pytest.approx(5.0 * 2)
    now[0] += 0.6
    pace.step(2, 2)
    assert pace.eta(2) == pytest.approx(0.3 * 2)
    now[0] += 1.0
    pace.step(4, 10)
    now[0] += 1.0
    pace.step(6, 10)  # two steps in one second, from the first report on
    assert pace.eta(10) == pytest.approx(0.5 * 10)


@pytest.mark.parametrize("sampler", ["Heun", "DPM2", "PLMS"])
def test_progress_counts_the_steps_asked_for_whatever_the_model_calls(services, monkeypatch, sampler):
    # Heun and DPM2 call the model 2 * steps - 1 times, PLMS steps + 1 times: the bar says Step 6/6,
    # as A1111 does, not 11/11 or 7/7.
    seen = []
    real = services.engine.generate

    def record_steps(request, seeds, on_step, subseeds=None, init_image=None, inpainting=None):
        return real(request, seeds, lambda step, total, latents: (step and seen.append((step, total))) or on_step(step, total, latents),
                    subseeds)

    monkeypatch.setattr(services.engine, "generate", record_steps)
    job = services.worker.submit(QUICK | {"sampler_name": sampler, "steps": 6, "n_iter": 2, "save_images": False})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert seen == [(step, 6) for step in range(1, 7)] * 2
    assert (job.progress.step, job.progress.total_steps, job.progress.fraction) == (6, 6, 1.0)


def test_previews_are_decoded_only_while_someone_watches(services, monkeypatch):
    calls = []
    real = services.engine.preview
    monkeypatch.setattr(services.engine, "preview", lambda latents, method: calls.append(method) or real(latents))
    unwatched = services.worker.submit(QUICK | {"steps": 20})
    assert unwatched.wait(60) and calls == []
    watched = services.worker.submit(QUICK | {"steps": 40})
    wait_for(lambda: watched.watch_preview() is not None)  # reading the preview is what asks for it
    assert watched.wait(60) and calls
    services.options.update({"show_progress_type": "Full"})  # the Settings tab's Live preview method
    try:
        calls.clear()
        full = services.worker.submit(QUICK | {"steps": 40})
        wait_for(lambda: full.watch_preview() is not None)
        assert full.wait(60) and set(calls) == {"Full"}
    finally:
        services.options.update({"show_progress_type": "Approx cheap"})


@pytest.mark.parametrize("change, steps", [({"show_progress_every_n_steps": 3}, [3, 6, 9]),
                                           ({"show_progress_every_n_steps": 1}, list(range(1, 10))),
                                           ({"show_progress_every_n_steps": -1}, []),
                                           ({"live_previews_enable": False, "show_progress_every_n_steps": 3}, [])])
def test_the_settings_preview_period_decides_which_steps_are_previewed(services, monkeypatch, change, steps):
    from webui.worker import Job

    monkeypatch.setattr(Job, "preview_watched", lambda job: True)
    previewed = []
    monkeypatch.setattr(Job, "set_preview", lambda job, image, step: previewed.append(step))
    before = services.options.current()
    services.options.update(change)
    try:
        assert services.worker.submit(QUICK | {"steps": 10}).wait(60)
    finally:
        services.options.update(before.model_dump())
    assert previewed == steps  # none at the last step: the picture itself comes then


def test_a_model_asked_for_twice_in_a_row_loads_once(services, monkeypatch):
    """The model dropdown sends each pick twice: a broken checkpoint failed, and the old model was read
    back, twice over."""
    loads, release = [], threading.Event()
    real = services.engine.load
    monkeypatch.setattr(services.engine, "load", lambda name: loads.append(name) or real(name))
    services.worker.call(lambda engine: release.wait(30))  # the loads wait behind this
    first, again = services.worker.queue_model_load("no-such-model"), services.worker.queue_model_load("no-such-model")
    other = services.worker.queue_model_load(TINY)
    then_again = services.worker.queue_model_load("no-such-model")  # after another model: a load of its own
    release.set()
    assert again is first and then_again is not first
    with pytest.raises(ModelNotFound):
        first.result(60)
    with pytest.raises(ModelNotFound):
        then_again.result(60)
    assert other.result(60).entry.name == TINY
    assert loads == ["no-such-model", TINY, "no-such-model"]


def test_a_model_asked_for_again_behind_a_job_naming_another_is_loaded_again(services, monkeypatch):
    release = threading.Event()
    services.worker.call(lambda engine: release.wait(30))
    first = services.worker.queue_model_load("no-such-model")
    job = services.worker.submit(QUICK | {"model": TINY, "save_images": False})  # loads its own model
    again = services.worker.queue_model_load("no-such-model")
    release.set()
    assert again is not first and job.wait(60)


def test_a_model_asked_for_again_while_its_load_runs_shares_it(services, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = services.engine.load
    loads = []
    monkeypatch.setattr(services.engine, "load", lambda name: (loads.append(name), entered.set(), release.wait(30),
                                                             real(name))[-1])
    monkeypatch.setattr(services.worker, "_model_stays", lambda name, wanted: False)  # as if another model were loaded
    first = services.worker.queue_model_load(TINY)
    assert entered.wait(30)  # running now, nothing behind it
    assert services.worker.queue_model_load(TINY) is first
    release.set()
    assert first.result(60).entry.name == TINY and loads == [TINY]


def test_a_full_disk_under_the_history_still_gives_the_pictures(services, monkeypatch):
    import sqlite3

    for write in ("add_job", "set_job_state", "add_image"):
        monkeypatch.setattr(services.history, write, raising(sqlite3.OperationalError("database or disk is full")))
    job = services.worker.submit(QUICK | {"save_images": False})  # was refused: nothing to save, yet no picture
    assert job.wait(60) and job.state is JobState.DONE and len(job.images) == 1
    assert any("missing from the history" in warning for warning in job.warnings)


def test_a_slow_history_write_never_holds_the_queue(services, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    add_job = services.history.add_job
    monkeypatch.setattr(services.history, "add_job",
                        lambda *args: (entered.set(), release.wait(30), add_job(*args)))  # a locked database
    submitting = threading.Thread(target=services.worker.submit, args=(QUICK,))
    submitting.start()
    try:
        assert entered.wait(30)
        answered = threading.Event()
        threading.Thread(target=lambda: (services.worker.queue_length(), answered.set()), daemon=True).start()
        assert answered.wait(10), "the queue waited for the database"
    finally:
        release.set()
        submitting.join(30)


def test_a_saved_grid_leaves_out_the_image_a_skip_cut_short(services):
    job = services.worker.submit(QUICK | {"steps": 150, "n_iter": 3, "seed": 70})
    wait_for(lambda: job.progress.step >= 2)
    services.worker.skip(job.id)  # batch 0 (seed 70)
    assert job.wait(120) and job.state is JobState.DONE
    assert [im.unfinished for im in job.images] == [True, False, False]
    with Image.open(job.grid_path) as grid:
        assert grid.size == (128, 64) and "Seed: 71," in read_infotext(grid)  # two finished images


def add_job_locked_for(monkeypatch, history, times: int) -> None:
    """The first `times` job rows fail to be written, as under a database another program has locked."""
    import sqlite3

    add_job, failures = history.add_job, []

    def locked(*args):
        if len(failures) < times:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        add_job(*args)

    monkeypatch.setattr(history, "add_job", locked)


def test_a_job_row_that_failed_at_submit_is_written_when_the_job_starts(services, monkeypatch):
    add_job_locked_for(monkeypatch, services.history, times=1)
    job = services.worker.submit(QUICK | {"batch_size": 2, "seed": 60})
    assert job.wait(60) and job.state is JobState.DONE and job.warnings == []
    assert services.history.list_images()[1] == 2  # each image has its row (they need the job's)
    assert services.history.get_job(job.id)["state"] == "done"


def test_a_job_row_still_missing_at_the_start_is_written_before_its_images(services, monkeypatch):
    """Locked at submit and at the start, free by the time an image is saved: the image gets its row (it
    failed with a foreign key error, leaving a file the history never showed)."""
    add_job_locked_for(monkeypatch, services.history, times=2)
    job = services.worker.submit(QUICK | {"seed": 61})
    assert job.wait(60) and job.state is JobState.DONE
    assert job.warnings == []  # "the job is missing from the history" was said at the start, and is untrue now
    assert job.images[0].history_id is not None
    row = services.history.get_job(job.id)
    assert row["state"] == "done" and row["started_at"] == job.started_at


def test_images_saved_while_the_job_row_was_missing_get_their_rows_once_it_is_written(services, monkeypatch):
    """Locked at submit, at the start and at the first image: the first image's file was on disk with no row,
    which the History tab then never showed, and no warning named it."""
    add_job_locked_for(monkeypatch, services.history, times=3)
    job = services.worker.submit(QUICK | {"batch_size": 2, "seed": 62})
    assert job.wait(60) and job.state is JobState.DONE and job.warnings == []
    assert all(image.history_id is not None for image in job.images)
    rows, total = services.history.list_images()
    assert total == 2 and {row.seed for row in rows} == {62, 63}
    assert services.history.get_job(job.id)["started_at"] == job.started_at


def test_a_start_time_that_could_not_be_written_is_written_at_the_end(services, monkeypatch):
    """No image saved, so no later write brings it: the job's last write does."""
    import sqlite3

    set_job_state, failures = services.history.set_job_state, []

    def start_locked(job_id, state, **times):
        if state == JobState.RUNNING.value and not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        set_job_state(job_id, state, **times)

    monkeypatch.setattr(services.history, "set_job_state", start_locked)
    job = services.worker.submit(QUICK | {"save_images": False})
    assert job.wait(60) and job.state is JobState.DONE and failures
    assert services.history.get_job(job.id)["started_at"] == job.started_at


def test_the_queue_limit_holds_while_history_writes_are_slow(services, monkeypatch):
    import time as clock

    blocker = services.worker.submit(QUICK | {"steps": 150})
    wait_for(lambda: blocker.state is JobState.RUNNING)
    add_job = services.history.add_job
    monkeypatch.setattr(services.history, "add_job", lambda *args: (clock.sleep(0.5), add_job(*args)))
    monkeypatch.setattr(services.worker, "max_queue", 1)
    outcomes = []

    def submit():
        try:
            outcomes.append(services.worker.submit(QUICK))
        except QueueFull as err:
            outcomes.append(err)

    threads = [threading.Thread(target=submit) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    accepted = [job for job in outcomes if not isinstance(job, QueueFull)]
    assert len(accepted) == 1 and services.worker.queue_length() == 1
    services.worker.cancel(blocker.id)


def test_a_job_refused_after_its_row_was_written_is_not_left_queued(services, monkeypatch):
    add_job, seen = services.history.add_job, []

    def stop_meanwhile(job_id, *args):
        add_job(job_id, *args)
        seen.append(job_id)
        services.worker.stop()  # the server shuts down between the two halves of submit

    monkeypatch.setattr(services.history, "add_job", stop_meanwhile)
    with pytest.raises(WorkerStopped):
        services.worker.submit(QUICK)
    assert services.history.get_job(seen[0])["state"] == "cancelled"


def test_one_step_batches_keep_their_eta_current():
    from webui.worker import StepPace

    now = [0.0]
    pace = StepPace(clock=lambda: now[0])
    pace.step(1, 1)
    now[0] += 40.0  # the first image compiled the VAE decoder
    pace.step(1, 1)
    now[0] += 0.2
    pace.step(1, 1)
    assert pace.eta(5) == pytest.approx(0.2 * 5)


def test_an_unfinished_image_that_cannot_be_decoded_still_ends_the_job_as_interrupted(services, monkeypatch):
    def broken_vae(*args, **kwargs):
        raise RuntimeError("the VAE ran out of memory")

    job = services.worker.submit(QUICK | {"steps": 150})
    wait_for(lambda: job.progress.step >= 2)
    monkeypatch.setattr(services.engine, "decode", broken_vae)
    services.worker.cancel(job.id)
    assert job.wait(30) and job.state is JobState.CANCELLED and job.images == []


def test_generation_runs_in_the_context_of_whoever_submitted_the_job(services, monkeypatch):
    """On ZeroGPU, spaces.GPU reads the visitor's request from a context variable (Gradio's LocalContext) to
    charge their quota; the worker thread must see the submitter's, not none (the anonymous pool)."""
    import contextvars

    visitor = contextvars.ContextVar("visitor", default=None)
    seen, generate = [], services.engine.generate
    monkeypatch.setattr(services.engine, "generate",
                        lambda *args: (seen.append(visitor.get()), generate(*args))[-1])

    def submit_as(name):
        visitor.set(name)
        return services.worker.submit(QUICK | {"n_iter": 2})

    jobs = [contextvars.copy_context().run(submit_as, name) for name in ("alice", "bob")]
    assert all(job.wait(60) for job in jobs)
    assert seen == ["alice", "alice", "bob", "bob"] and visitor.get() is None


def test_a_running_job_on_another_model_for_a_while_means_a_pick_of_that_model_waits(services):
    """A job naming its own model (an API override) loads it and puts the old one back afterwards: a pick of
    the model it runs on must not be answered 'loaded already', or the old one comes back after it."""
    from webui.schemas import GenerationRequest
    from webui.worker import Job

    worker, loaded = services.worker, services.engine.model.entry
    assert worker._model_stays(loaded.name, loaded)
    assert worker._model_stays(loaded.name, None)  # a model from outside the models folder: found by its name
    # The override runs now, so its model is the loaded one; the model before it comes back after it.
    override = Job(id="override", origin="api",
                   request=GenerationRequest(prompt="x", model=loaded.name, restore_model=True))
    with worker._wake:
        worker._current = override
    try:
        assert not worker._model_stays(loaded.name, loaded)
    finally:
        with worker._wake:
            worker._current = None


def test_a_pick_that_goes_away_does_not_cancel_the_load_others_wait_for():
    """Gradio cancels a pick's task when its tab closes; the load it shares with other waiters goes on."""
    import asyncio
    from concurrent.futures import Future

    from webui.worker import await_result

    shared = Future()

    async def one_pick_goes_away():
        gone, staying = asyncio.create_task(await_result(shared)), asyncio.create_task(await_result(shared))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert not shared.cancelled()
        shared.set_result("loaded")  # the worker finishes the load
        return await staying

    assert asyncio.run(one_pick_goes_away()) == "loaded"


def test_a_history_locked_all_along_is_said_once_not_at_every_image(services, monkeypatch):
    import sqlite3

    monkeypatch.setattr(services.history, "add_job", raising(sqlite3.OperationalError("database is locked")))
    job = services.worker.submit(QUICK | {"batch_size": 3})
    assert job.wait(60) and job.state is JobState.DONE and len(job.images) == 3
    names = ", ".join(Path(image.path).name for image in job.images)
    assert job.warnings == [f"saved; the history database did not take their rows now, so {names} join the history "
                            "at the next start"]  # each file named, once
    monkeypatch.undo()
    assert services.history.reconcile(fail_unfinished_jobs=False)["rows_written_late"] == 3
    assert services.history.get_job(job.id)["state"] == "done"


def test_rows_that_cannot_be_kept_for_later_either_are_named_as_missing(services, monkeypatch):
    import sqlite3

    monkeypatch.setattr(services.history, "add_job", raising(sqlite3.OperationalError("database is locked")))
    monkeypatch.setattr(services.history, "keep_for_later", raising(OSError("no space left on device")))
    job = services.worker.submit(QUICK | {"batch_size": 2})
    assert job.wait(60) and job.state is JobState.DONE and len(job.images) == 2
    names = ", ".join(Path(image.path).name for image in job.images)
    assert job.warnings == ["the job is missing from the history: OperationalError: database is locked",
                            f"saved but missing from the history: {names}"]


def test_variation_seeds_count_up_per_image_and_are_written_as_a1111_writes_them(services):
    """As in A1111, a run with a variation strength is variations of one picture: the seed stays, the
    variation seed counts up."""
    job = services.worker.submit(QUICK | {"seed": 70, "subseed": 100, "subseed_strength": 0.25, "n_iter": 2})
    assert job.wait(60) and job.state is JobState.DONE
    assert (job.seeds, job.subseeds) == ([70, 70], [100, 101])
    for image, subseed in zip(job.images, [100, 101]):
        assert f"Variation seed: {subseed}, Variation seed strength: 0.25" in image.infotext
        assert f"Variation seed: {subseed}," in read_infotext(Image.open(image.path))
    random_one = services.worker.submit(QUICK | {"subseed_strength": 0.5})  # -1: drawn once, then recorded
    assert random_one.wait(60) and f"Variation seed: {random_one.subseeds[0]}," in random_one.images[0].infotext
    plain = services.worker.submit(QUICK | {"seed": 70, "subseed": 100, "n_iter": 2})  # strength 0: no variation
    assert plain.wait(60) and (plain.seeds, plain.subseeds) == ([70, 71], [100, 101])
    assert "Variation" not in plain.images[0].infotext


def test_seeds_past_2_to_the_32_count_on_as_a1111s_and_reproduce_from_the_history_and_infotext(services):
    """A1111 (and ComfyUI) take seeds up to 2**64 - 1 and count a batch on past 2**32 (seed 4294967295, batch of 2:
    4294967296), where the NV source draws other noise than at 0; they were refused, and a batch wrapped to 0
    (found by review). Seeds picked at random stay below 2**32, as A1111's."""
    from webui.engine.philox import PhiloxGenerator

    assert not torch.equal(PhiloxGenerator(2**32).randn((4,), torch.float32),
                           PhiloxGenerator(0).randn((4,), torch.float32))
    job = services.worker.submit(QUICK | {"seed": 2**32 - 1, "batch_size": 2, "randn_source": "NV"})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    assert job.seeds == [2**32 - 1, 2**32]
    last = services.worker.submit(QUICK | {"seed": 2**64 - 1, "batch_size": 2, "randn_source": "NV",
                                           "eta_noise_seed_delta": 31337, "sampler_name": "Euler a"})
    assert last.wait(60) and last.state is JobState.DONE, last.error
    assert last.seeds == [2**64 - 1, 0]  # past the largest: from 0 again (A1111 would fail)
    for done in (job, last):
        for image in done.images:
            row = services.history.get_image(image.history_id)
            assert row.seed == image.seed  # SQLite's signed integers hold them too
            assert f"Seed: {image.seed}," in read_infotext(Image.open(image.path))
    assert request_fields_from_infotext(job.images[1].infotext)["seed"] == 2**32
    again = services.worker.submit(QUICK | {"seed": 2**32, "randn_source": "NV"})  # image 2 of the batch, alone
    assert again.wait(60) and again.seeds == [2**32]
    alone, in_batch = (np.asarray(done.images[index].image, int) for done, index in ((again, 0), (job, 1)))
    assert np.abs(alone - in_batch).max() <= 2  # (a batch's arithmetic rounds apart by a level at most)
    other = services.worker.submit(QUICK | {"seed": 0, "randn_source": "NV"})  # 2**32 wrapped, as it was
    assert other.wait(60) and np.abs(np.asarray(other.images[0].image, int) - in_batch).max() > 20
    drawn = services.worker.submit(QUICK)
    assert drawn.wait(60) and 0 <= drawn.seeds[0] < 2**32


def test_the_step_callback_stops_or_waits_quietly_while_the_prompt_is_encoded(services):
    """The engine calls it with no latents between the encodes of a prompt's texts: a stop may come in, and
    nothing is shown."""
    from webui.worker import Job, JobCancelled, StepPace

    job = Job(id="j", request=GenerationRequest(**QUICK), origin="api")
    on_step = services.worker._step_callback(job, 0, [], StepPace())
    assert job.watch_preview() is None  # someone watches the preview
    on_step(0, 20, None)
    assert job.watch_preview() is None and job.progress.total_steps == 0  # untouched
    job.cancel_event.set()
    with pytest.raises(JobCancelled):
        on_step(0, 20, None)
