"""`python -m tcaq_kernels calibrate` runs the presets and passes method options through."""
from __future__ import annotations

import pytest

from tcaq_kernels.__main__ import _method_options, build_parser, main
from tcaq_kernels.quant.state import CalibState


def test_option_values_are_parsed_as_json_then_text():
    assert _method_options(["iters=500", "tcr=true", "tcr_clamp=null", "daq_alternative=lognormal", "tcr_strengths=[0, 1]"]) == {
        "iters": 500, "tcr": True, "tcr_clamp": None, "daq_alternative": "lognormal", "tcr_strengths": [0, 1],
    }
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        _method_options(["iters"])


def test_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--method", "nope", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_unet, tiny_scheduler):
    """The tiny UNet as a diffusers pipeline folder, for `--model`."""
    tiny_unet.save_pretrained(tmp_path / "model" / "unet")
    tiny_scheduler.save_pretrained(tmp_path / "model" / "scheduler")
    return tmp_path / "model"


def test_calibrate_writes_a_reconstruction_state(tmp_path, tiny_model_dir, tiny_unet):
    out = tmp_path / "q.tcaq"
    rc = main(["calibrate", "--model", str(tiny_model_dir), "--method", "tcaq", "--bits", "W6A6", "--samples", "2",
               "--steps", "4", "--groups", "2", "--batch-size", "4", "--device", "cpu", "--out", str(out),
               "--option", "iters=2", "--option", "num_points=4", "--option", "par_rounds=1",
               "--option", "tcr_strengths=[0, 1]", "--option", "progress=false"])
    assert rc == 0
    state = CalibState.load(out)
    state.validate(tiny_unet)
    assert state.method == "tcaq" and state.bits == "W6A6" and state.num_groups == 2
    s = state.settings
    assert s["iters"] == 2 and s["num_points_used"] == 4 and len(s["par"]) == 1 and s["tcr_strengths"] == [0, 1]
    assert s["split_skip"] is True and sum(l.input_split is not None for l in state.layers.values()) == 8


def test_split_skip_option_turns_splitting_off(tmp_path, tiny_model_dir, tiny_unet):
    out = tmp_path / "q.tcaq"
    main(["calibrate", "--model", str(tiny_model_dir), "--method", "qdiffusion", "--samples", "2", "--steps", "2",
          "--batch-size", "4", "--device", "cpu", "--out", str(out), "--option", "iters=1", "--option", "num_points=4",
          "--option", "split_skip=false", "--option", "progress=false"])
    state = CalibState.load(out)
    state.validate(tiny_unet)
    assert state.settings["split_skip"] is False and all(l.input_split is None for l in state.layers.values())


def test_unknown_option_names_the_known_ones(tmp_path, tiny_model_dir):
    with pytest.raises(TypeError, match="unknown calibration option.*'itters'.*known options"):
        main(["calibrate", "--model", str(tiny_model_dir), "--method", "tcaq", "--samples", "1", "--steps", "1",
              "--device", "cpu", "--out", str(tmp_path / "x"), "--option", "itters=5"])


def test_calibrate_with_prompts_encodes_them_with_the_pipeline(tmp_path, monkeypatch, tiny_cond_unet, tiny_scheduler):
    """`--prompts FILE`: the folder is loaded as a text-to-image pipeline, its encoder encodes the file's prompts
    (blank lines skipped) and the calibration guides with the negative prompt."""
    import tcaq_kernels.__main__ as cli

    calls = []

    class Pipe:
        unet, scheduler = tiny_cond_unet, tiny_scheduler

        def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                          negative_prompt=None):
            import torch

            calls.append((prompt, do_classifier_free_guidance, negative_prompt))
            text = torch.randn(len(prompt), 5, 24)
            return text, torch.zeros_like(text)

    monkeypatch.setattr(cli, "_load_text_pipeline", lambda model_dir, device: Pipe())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue sphere\n", encoding="utf-8")
    out = tmp_path / "sd.tcaq"
    rc = main(["calibrate", "--model", "sd-folder", "--prompts", str(prompts), "--negative-prompt", "blurry",
               "--samples", "2", "--steps", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out),
               "--option", "progress=false"])
    assert rc == 0 and calls == [(["a red cube", "a blue sphere"], True, "blurry")]
    assert CalibState.load(out).settings["text"] == {"prompts": 2, "tokens": 5, "guidance_scale": 7.5}
    with pytest.raises(SystemExit, match="--prompts needs --model"):
        main(["calibrate", "--prompts", str(prompts), "--out", str(out)])
    with pytest.raises(SystemExit, match="--negative-prompt goes with --prompts"):
        main(["calibrate", "--negative-prompt", "blurry", "--out", str(out)])
