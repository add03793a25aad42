"""The worker's protocol: every event is a class of common/protocol.py; what the engine, the workflows and the
command line really emit parses back into those classes, and a malformed event is named clearly."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SSMSRRegistrationLib.common.protocol import (EVENT_TYPES, REQUIRED_FIELDS, Atlas, Finished, Progress, Started,
                                                  batch_text, parse_event, started_event, steps_text)
from SSMSRRegistrationLib.interfaces.cli import main
from realimages import brain_slice


def test_each_event_round_trips_through_its_dict_and_keeps_extra_fields():
    events = [Started(device="cpu", scales=["1/2", "1"], steps_per_scale=3, image_size=[4, 5], extra={"plan": "p"}),
              Progress(scale="1", scale_index=1, num_scales=2, step=3, steps=3, loss=-0.5, fraction=1.0, eta_s=0.0),
              Atlas(rank=1, index=0, count=2, atlas="a.nii.gz", nlcc=0.4),
              Finished(outputs={"field": "f.nii.gz"}, metrics={"ncc_after": 0.3})]
    for event in events:
        data = json.loads(json.dumps(event.to_dict()))
        assert parse_event(data) == event
    assert set(EVENT_TYPES) == set(REQUIRED_FIELDS)


def test_a_malformed_event_is_named():
    with pytest.raises(ValueError, match="unknown protocol event 'progres'"):
        parse_event({"event": "progres"})
    with pytest.raises(ValueError, match="the 'progress' event lacks step, steps"):
        parse_event({"event": "progress", "scale_index": 0, "num_scales": 1, "fraction": 0.5})


def test_what_the_command_line_writes_parses_into_the_protocol_s_classes(tmp_path, capsys):
    image = sitk.GetImageFromArray(brain_slice())
    sitk.WriteImage(image, str(tmp_path / "f.nii.gz"))
    moving = sitk.GetImageFromArray(np.roll(brain_slice(), 2, axis=1))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    assert main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(tmp_path / "u.nii.gz"),
                 "--scales", "1/2,1", "--steps", "3", "--device", "cpu", "--progress", "jsonl"]) == 0
    events = [parse_event(json.loads(line)) for line in capsys.readouterr().out.splitlines()]
    assert isinstance(events[0], Started) and "plan" in events[0].extra
    assert all(isinstance(event, Progress) for event in events[1:-1]) and len(events) > 2
    assert isinstance(events[-1], Finished) and events[-1].outputs["field"] == str(tmp_path / "u.nii.gz")


def test_the_steps_are_described_per_scale_only_where_they_differ():
    started = started_event("cpu", ["1/4", "1/2", "1"], 300, [32, 40, 32], 1, 1, scale_steps=[300, 300, 300])
    assert steps_text(started) == "300 steps per scale"
    assert steps_text({**started, "scale_steps": [300, 300, 100]}) == "steps 300/300/100 by scale"
    assert steps_text(started_event("cpu", ["1/2", "1"], 3500, [32, 40], 20, 4)) == "3500 steps per scale"


def test_the_pairs_a_step_are_described_per_scale_only_where_they_differ():
    cine = started_event("cpu", ["1/4", "1/2", "1"], 150, [96, 96, 96], 7, 1, scale_batches=[7, 7, 1])
    assert batch_text(cine) == "pairs per step 7/7/1 by scale"
    assert batch_text({**cine, "scale_batches": [2, 2, 2]}) == "2 pairs per step"
    assert batch_text(started_event("cpu", ["1/2", "1"], 3500, [32, 40], 20, 1)) == "1 pair per step"
