import pytest

from webui.engine.samplers import SAMPLERS, SCHEDULE_TYPES, make_scheduler, resolve_sampler, sampler_names
from tests.tiny_sd import tiny_components

EXPECTED = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
            "DPM++ 2S a", "DDIM", "PLMS", "UniPC", "LCM"]


def test_every_known_sampler_name_is_offered():
    assert sampler_names() == EXPECTED
    assert list(SCHEDULE_TYPES) == ["Automatic", "Karras", "Exponential", "SGM Uniform"]


@pytest.mark.parametrize("name, expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
    ("DPM++ SDE Karras", ("DPM++ SDE", "Karras")),
    ("Euler a", ("Euler a", "Automatic")),
    ("K-LMS", ("LMS", "Automatic")),  # the seed blog's three: K-LMS, PNDM, DDIM
    ("PNDM", ("PLMS", "Automatic")),
    ("ddim", ("DDIM", "Automatic")),
    ("k_dpmpp_2m", ("DPM++ 2M", "Automatic")),
    ("UniPC SGM Uniform", ("UniPC", "SGM Uniform")),
])
def test_names_and_old_combined_names_resolve(name, expected):
    assert resolve_sampler(name, "Automatic") == expected


def test_schedule_type_names_are_case_insensitive():
    assert resolve_sampler("Euler", "karras") == ("Euler", "Karras")
    assert resolve_sampler("Euler", "sgm_uniform") == ("Euler", "SGM Uniform")


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        resolve_sampler("Eular", "Automatic")
    assert "unknown sampler 'Eular'" in str(err.value)
    assert "DPM++ 2M" in str(err.value) and "UniPC" in str(err.value)


def test_unknown_schedule_and_unsupported_pair_are_clear_errors():
    with pytest.raises(ValueError, match="unknown schedule type 'Polyexponential'"):
        resolve_sampler("Euler", "Polyexponential")
    with pytest.raises(ValueError, match="'DDIM' does not support the Karras schedule"):
        resolve_sampler("DDIM", "Karras")


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLERS])
def test_scheduler_keeps_the_models_own_config(sampler):
    from diffusers import EulerDiscreteScheduler

    base = EulerDiscreteScheduler.from_config(tiny_components()["scheduler"].config,
                                              prediction_type="v_prediction").config
    scheduler = make_scheduler(base, sampler)
    assert type(scheduler).__name__ == next(s.scheduler_class for s in SAMPLERS if s.name == sampler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"


def test_schedule_types_change_the_sigmas():
    base = dict(tiny_components()["scheduler"].config)
    plain = make_scheduler(base, "Euler")
    karras = make_scheduler(base, "Euler", "Karras")
    assert karras.config.use_karras_sigmas and not plain.config.use_karras_sigmas
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert not (plain.sigmas == karras.sigmas).all()


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLERS])
def test_every_offered_schedule_really_reaches_the_scheduler(sampler):
    import inspect

    from webui.engine.samplers import get_sampler

    base = dict(tiny_components()["scheduler"].config)
    for schedule in get_sampler(sampler).schedules:
        scheduler = make_scheduler(base, sampler, schedule)
        accepted = inspect.signature(type(scheduler).__init__).parameters
        for option, value in SCHEDULE_TYPES[schedule].items():
            assert option in accepted and scheduler.config[option] == value, (sampler, schedule, option)


SD15_SCHEDULER = {  # stable-diffusion-v1-5's scheduler_config.json (the published facts)
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
    "clip_sample": False, "skip_prk_steps": True,
}


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_every_schedule_a_sampler_accepts_changes_its_schedule(sampler):
    """A schedule type a sampler accepts but ignores would be a setting that silently does nothing."""
    def schedule(schedule_type):
        scheduler = make_scheduler(SD15_SCHEDULER, sampler.name, schedule_type)
        scheduler.set_timesteps(10)
        sigmas = getattr(scheduler, "sigmas", None)
        return scheduler.timesteps.tolist(), None if sigmas is None else [round(float(s), 4) for s in sigmas]

    automatic = schedule("Automatic")
    for schedule_type in sampler.schedules:
        if schedule_type != "Automatic":
            assert schedule(schedule_type) != automatic, schedule_type
