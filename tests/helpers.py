"""Small builders the tests share."""

from __future__ import annotations

import functools

from vlmtune.config import DataArguments, FinetuneArguments, ModelArguments, VlmTrainingArguments


def train_args(model_dir: str, dataset: str, output_dir: str, eval_dataset: str | None = None, **overrides):
    """Arguments for a short CPU run; `overrides` go to whichever dataclass has the field."""
    model = ModelArguments(model_name_or_path=model_dir)
    data = DataArguments(dataset_name=dataset, eval_dataset_name=eval_dataset)
    finetune = FinetuneArguments(lora_dropout=0.0)
    training = dict(
        output_dir=output_dir,
        max_steps=20,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=5,
        use_cpu=True,
        seed=0,
        save_strategy="no",
    )
    for key, value in overrides.items():
        for obj in (model, data, finetune):
            if hasattr(obj, key):
                setattr(obj, key, value)
                break
        else:
            training[key] = value
    return model, data, finetune, VlmTrainingArguments(**training)


SHORT = dict(max_steps=3, per_device_train_batch_size=4, max_train_samples=12, val_split_ratio=0.0, eval_accuracy=False)


def short_run(model_dir: str, shapes_data, out, eval_data: bool = False, callbacks=None, **overrides):
    """A 3-step LoRA run on 12 shapes rows (no generation eval unless asked): for behaviour, not learning."""
    from vlmtune.train.run import run_training

    validation = str(shapes_data["validation"]) if eval_data else None
    args = train_args(model_dir, str(shapes_data["train"]), str(out), validation, **{**SHORT, **overrides})
    return run_training(*args, callbacks=callbacks)


# `vlmtune dpo|kto`'s references (tests' names for them) -> (a second model loaded, the adapters on the policy).
# `ref` is TRL's frozen copy of a continued adapter: adapter-sized, the SFT model the run starts from.
MODELS_IN_MEMORY = {
    "new LoRA disabled": (False, {"default"}),
    "--ref_model": (True, {"default"}),
    "SFT adapter copy": (False, {"default", "ref"}),
    "full: a second copy": (True, set()),
}


def models_in_memory(trainer) -> tuple[bool, set[str]]:
    """What a preference trainer holds besides the policy: whether a reference model, and which adapters."""
    return trainer.ref_model is not None, set(getattr(trainer.model, "peft_config", {}))


def cli_error(argv: list[str], capsys) -> tuple[int, str]:
    """Run the real command line on `argv`, expecting it to refuse: (exit code, the one error message).

    Fails the test on a traceback, on no error, or on a message of more than one paragraph."""
    import pytest

    from vlmtune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert "vlmtune: error: " in err, err
    message = err[err.index("vlmtune: error: ") :]  # after any progress bars
    assert message.count("\n") == 1, err
    return exit_info.value.code, message


@functools.cache
def family_spec(family: str):
    """The facts vlmtune uses for a tiny family (derived, with its registry entry on top), without weights."""
    from vlmtune.models.derive import family_for, meta_model
    from vlmtune.models.tiny import RECIPES

    config, processor = RECIPES[family].build()
    return family_for(config, processor, model=meta_model(config))
