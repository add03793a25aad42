"""One run configuration: a preset plus overrides, resolved per kind of run, the same from every interface; errors
name the setting in each interface's own words; the worker's job file carries it unchanged."""

import inspect
import json

import pytest

from SSMSRRegistrationLib.common.errors import InputError
from SSMSRRegistrationLib.common.presets import DEFAULT_PRESET, KINDS, PRESETS
from SSMSRRegistrationLib.common.run_config import OPTIONS, RUN_OPTIONS, RunConfiguration, default_text, options_for
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings
from SSMSRRegistrationLib.interfaces.cli import command_parsers, flag_of, main, read_job


def test_the_paper_preset_is_the_paper_s_settings_for_every_kind_of_run():
    """The paper (Sec. III): lambda 10, Adam at 1e-3, 3500 steps per scale, 1/2,1 for image pairs and 1/8..1 for
    echo cines, no other loss term."""
    for kind in ("pair", "cine"):
        run = RunConfiguration.of("paper").resolve(kind)
        assert (run.smoothness_weight, run.learning_rate, run.steps, run.mse_weight) == (10.0, 1e-3, 3500, 0.0)
    assert RunConfiguration.of("paper").resolve("pair").scales == "1/2,1"
    assert RunConfiguration.of("paper").resolve("cine").scales == "1/8,1/4,1/2,1"


def test_an_override_wins_over_the_preset_for_its_kind_and_nothing_else_changes():
    for name in PRESETS:
        for kind in KINDS:
            plain = RunConfiguration.of(name).resolve(kind).as_dict()
            changed = RunConfiguration.of(name, steps=7, seed=3).resolve(kind).as_dict()
            assert changed == {**plain, "steps": 7, "seed": 3}
            for option in options_for(kind):  # every value is the preset's, else the option's default
                assert plain[option.name] == PRESETS[name].value(kind, option.name, option.default)
    assert RunConfiguration.of().preset == DEFAULT_PRESET
    assert RunConfiguration.of(None, steps=None).overrides == {}  # None means "not given"


def test_values_are_converted_and_checked_and_the_error_names_the_setting():
    configuration = RunConfiguration.of("FAST", steps="12", smoothness_weight=2, scales="0.25, 1/2,1", precision="Float32")
    assert configuration.preset == "fast"
    assert configuration.overrides == {"scales": "1/4,1/2,1", "steps": 12, "precision": "float32",
                                       "smoothness_weight": 2.0}
    for bad, setting in [(dict(smoothness_weight=-1), "smoothness_weight"), (dict(steps=1.5), "steps"),
                         (dict(precision="half"), "precision"), (dict(learning_rate=0), "learning_rate"),
                         (dict(stop_window=3), "stop_window"), (dict(device="gpu"), "device"),
                         (dict(scales="1,1/2"), None), (dict(batchsize=2), "batchsize")]:
        with pytest.raises(InputError) as raised:
            RunConfiguration.of(**bad)
        assert raised.value.setting == setting
    with pytest.raises(InputError) as raised:
        RunConfiguration.of(smoothness_weight=-1)
    assert str(raised.value) == "Smoothness weight must be at least 0, got -1."
    assert raised.value.worded(flag_of) == "--lambda must be at least 0, got -1."


def test_an_option_a_kind_of_run_does_not_take_is_refused_unless_the_configuration_is_narrowed_to_it():
    configuration = RunConfiguration.of(batch_size=4, spacing=1.5)
    with pytest.raises(InputError, match="does not apply to a pair run") as raised:
        configuration.resolve("pair")
    assert raised.value.setting == "batch_size"
    assert configuration.only_for("pair").overrides == {"spacing": 1.5}
    assert configuration.only_for("cine").resolve("cine").batch_size == 4


def test_json_round_trip_and_a_newer_format_is_refused():
    configuration = RunConfiguration.of("fast", steps=12, mse_weight=3.5)
    assert RunConfiguration.from_json(json.loads(json.dumps(configuration.to_json()))) == configuration
    with pytest.raises(InputError, match="newer SSMSR"):
        RunConfiguration.from_json({**configuration.to_json(), "format_version": 99})
    with pytest.raises(InputError, match="not an SSMSR run configuration"):
        RunConfiguration.from_json({"preset": "fast"})


def test_the_engine_settings_are_the_resolved_values():
    run = RunConfiguration.of("balanced", steps=9, precision="float32", ncc_window=7).resolve("cine")
    settings = RegistrationSettings.from_run(run)
    assert [str(scale) for scale in settings.scales] == run.scales.split(",")
    assert (settings.steps_per_scale, settings.mixed_precision, settings.ncc_window) == (9, False, 7)
    assert (settings.smoothness_weight, settings.mse_weight, settings.batch_size) == (
        run.smoothness_weight, run.mse_weight, run.batch_size)


def test_every_command_offers_exactly_the_options_of_its_kind_under_their_flags():
    commands = command_parsers()
    for command, kind in (("register", "pair"), ("segment", "pair"), ("track", "cine"), ("train", "pretrain")):
        flags = {action.dest: action.option_strings for action in commands[command]._actions}
        for option in RUN_OPTIONS:
            if kind in option.kinds:
                assert option.flag in flags[option.name], (command, option.name)
            else:
                assert option.name not in flags, (command, option.name)
    assert flag_of("top_k") == "--top-k" and flag_of("smoothness_weight") == "--lambda"


def test_help_shows_each_presets_default_and_the_options_own_where_a_preset_gives_none():
    """3D+t cines: ``balanced`` and ``fast`` give 8 pairs a step, ``paper`` none (the option's own default, 1)."""
    assert default_text(OPTIONS["batch_size"], "volume_cine") == "balanced: 8, paper: 1, fast: 8"
    assert default_text(OPTIONS["batch_size"], "cine") == "1"
    assert default_text(OPTIONS["ncc_window"], "pair") == OPTIONS["ncc_window"].automatic


def test_the_api_functions_show_every_option_of_their_kind_in_their_signature():
    import SSMSRRegistrationLib as ssmsr

    for function, kind in ((ssmsr.register, "pair"), (ssmsr.segment, "pair"), (ssmsr.track, "cine"),
                           (ssmsr.train, "pretrain")):
        parameters = inspect.signature(function).parameters
        assert {option.name for option in options_for(kind)} <= set(parameters), function.__name__
        assert all(parameters[option.name].default is None for option in options_for(kind))
        assert "config" in parameters and "preset" in parameters
        assert "smoothness_weight:" in function.__doc__
    assert sorted(ssmsr.__all__) == sorted(ssmsr._PUBLIC)


def test_a_command_line_error_names_the_flag_and_an_api_error_the_keyword(capsys, tmp_path):
    code = main(["track", str(tmp_path / "cine.nii.gz"), "-o", str(tmp_path / "out"), "--lambda", "-2",
                 "--progress", "jsonl"])
    event = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 2 and event["message"] == "--lambda must be at least 0, got -2.0."
    import SSMSRRegistrationLib as ssmsr

    with pytest.raises(InputError) as raised:
        ssmsr.track(str(tmp_path / "cine.nii.gz"), smoothness_weight=-2)
    assert raised.value.setting == "smoothness_weight"


def test_a_job_file_runs_its_command_with_its_configuration_and_refuses_options_outside_it(tmp_path):
    job = {"format": "ssmsr-job", "format_version": 1, "command": "track",
           "arguments": {"cine": "cine.nii.gz", "output": "out", "no_figures": True},
           "configuration": RunConfiguration.of("fast", steps=5).to_json()}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    args = read_job(str(path))
    assert (args.command, args.cine, args.no_figures, args.progress) == ("track", "cine.nii.gz", True, "jsonl")
    assert args.config == RunConfiguration.of("fast", steps=5) and args.mask == "auto"
    for arguments, problem in (({**job["arguments"], "steps": 5}, "steps"), ({**job["arguments"], "colour": 1},
                                                                            "colour")):
        path.write_text(json.dumps({**job, "arguments": arguments}))
        with pytest.raises(InputError, match=f"unknown arguments for track: {problem}"):
            read_job(str(path))
    path.write_text(json.dumps({**job, "command": "train"}))
    with pytest.raises(InputError, match="a job runs one of: register, track, segment"):
        read_job(str(path))


def test_options_are_declared_once():
    """Each option has one name, one flag, one label; the preset table names only declared options."""
    assert len({option.flag for option in RUN_OPTIONS}) == len(RUN_OPTIONS) == len(OPTIONS)
    assert len({option.label for option in RUN_OPTIONS}) == len(RUN_OPTIONS)
    for preset in PRESETS.values():
        for kind, values in preset.values.items():
            assert kind in KINDS and set(values) <= {option.name for option in options_for(kind)}
