"""--cache_vision_features: the frozen vision tower runs once per image, the training is the same."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from tests.helpers import short_run
from vlmtune import cli


class VisionCalls(TrainerCallback):
    """Counts the vision tower's forward calls per epoch."""

    def __init__(self, spec_key: str):
        self.key, self.per_epoch, self.epoch = spec_key, {}, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tower = model.get_base_model().get_submodule(self.key)
        tower.register_forward_hook(
            lambda *a: self.per_epoch.__setitem__(self.epoch, self.per_epoch.get(self.epoch, 0) + 1)
        )

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch += 1


def two_epochs(tiny_model_dir, shapes_data, out, family: str, **flags):
    key = {"qwen2_vl": "model.visual", "llava": "model.vision_tower"}[family]
    calls = VisionCalls(key)
    # 12 rows, batch 4: 3 steps an epoch; the loss of every step is logged.
    result = short_run(
        tiny_model_dir(family), shapes_data, out, callbacks=[calls], max_steps=6, logging_steps=1, **flags
    )
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    return losses, calls.per_epoch, result.trainer


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_cached_features_give_the_same_training_without_running_the_tower_again(
    family, tiny_model_dir, shapes_data, tmp_path
):
    plain, plain_calls, _ = two_epochs(tiny_model_dir, shapes_data, tmp_path / "plain", family)
    cached, cached_calls, trainer = two_epochs(
        tiny_model_dir, shapes_data, tmp_path / "cached", family, cache_vision_features=True
    )
    assert len(plain) == len(cached) == 6
    assert cached == pytest.approx(plain, abs=1e-6, rel=0)
    assert plain_calls == {1: 3, 2: 3}
    assert cached_calls.get(1) == 3 and cached_calls.get(2, 0) == 0  # epoch 2: every image from the cache
    assert trainer.vision_cache.hits == 12 and len(trainer.vision_cache.features) == 12


def test_cache_refused_when_the_vision_tower_trains(tiny_model_dir, shapes_data, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", tiny_model_dir("qwen2_vl"), "--dataset_name", str(shapes_data["train"])]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_cpu", "true", "--val_split_ratio", "0"]
    argv += ["--max_train_samples", "4", "--cache_vision_features", "true", "--train_vision_lora", "true"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--cache_vision_features" in err and "--train_vision_lora" in err and "vision_tower" in err
    assert "Traceback" not in err
