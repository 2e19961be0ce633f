"""`vlmtune kto`: TRL's KTOTrainer on vlmtune's encoding, after a short SFT.

Rows are unpaired (an image, a prompt, one completion and a desirable/undesirable label) or preference pairs
split into a desirable and an undesirable row. The shapes pairs (`write_preference_dataset`: the right colour
chosen, a wrong one rejected) train the tiny Qwen2-VL with `vlmtune train` first, then `vlmtune kto`
continuing its adapter, through the command line as a user runs them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from tests.helpers import MODELS_IN_MEMORY, cli_error, models_in_memory, train_args
from vlmtune.cli import main
from vlmtune.config import DataArguments, FinetuneArguments, KtoArguments, VlmTrainingArguments
from vlmtune.data.collate import SEQUENCE_KEYS
from vlmtune.data.encode import IGNORE_INDEX, token_ids
from vlmtune.data.kto import KtoCollator, build_kto_splits
from vlmtune.data.preference import PreferenceCollator, build_preference_splits
from vlmtune.data.synthetic import write_preference_dataset
from vlmtune.eval.plots import REWARD_PLOT, TRAINING_PLOT
from vlmtune.models.loading import apply_finetuning, load_model, load_processing
from vlmtune.models.loss import labelled_nll_per_row
from vlmtune.models.tiny import RECIPES
from vlmtune.train.kto import VlmKtoTrainer, kto_config, run_kto
from vlmtune.train.preference import preference_accuracy

RUN = ["--use_cpu", "--seed", "0", "--report_to", "none", "--save_strategy", "no", "--max_new_tokens", "4"]
BATCH = ["--per_device_train_batch_size", "8", "--logging_steps", "5", "--logging_first_step"]
# KTO's loss where the reference is the policy (every log-ratio and the KL estimate 0): 1 - sigmoid(0).
HALF = 0.5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_preference_dataset(tmp_path_factory.mktemp("kto_pairs"), n_train=200, n_eval=40, seed=0)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, pairs, tmp_path_factory):
    """A 30-step SFT on the chosen answers, then 60 KTO steps continuing its adapter on the pairs split into
    desirable and undesirable rows (8 rows a step, lr 1e-3, beta 0.1)."""
    root, model = tmp_path_factory.mktemp("kto_runs"), tiny_model_dir("qwen2_vl")
    data = ["--dataset_name", str(pairs["train"]), "--eval_dataset_name", str(pairs["validation"])]
    common = ["--model_name_or_path", model, *data, *RUN, *BATCH]
    sft = ["--response_column", "chosen", "--learning_rate", "3e-3", "--max_steps", "30"]
    main(["train", *common, *sft, "--output_dir", str(root / "sft")])
    kto = ["--adapter_name_or_path", str(root / "sft"), "--learning_rate", "1e-3", "--max_steps", "60"]
    main(["kto", *common, *kto, "--output_dir", str(root / "kto")])
    return {name: root / name for name in ("sft", "kto")}


def _results(folder) -> dict:
    return json.loads((folder / "all_results.json").read_text())


def test_kto_after_sft_moves_held_out_preferences_the_right_way(runs):
    """On the held-out pairs the model prefers the right colour more often than the SFT model did, and TRL's
    held-out rewards put the desirable completions above the undesirable ones; at step 1 the reference (the
    SFT adapter as the run found it) equals the policy: loss 1/2, rewards and KL 0."""
    results = _results(runs["kto"])
    assert results["eval_preference_accuracy"] >= results["eval_preference_accuracy_before"] + 0.1
    assert results["eval_rewards/margins"] > 0
    assert results["eval_rewards/chosen"] > results["eval_rewards/rejected"]
    assert 0 <= results["eval_exact_match"] <= 1 and (runs["kto"] / "predictions.jsonl").is_file()
    log = json.loads((runs["kto"] / "trainer_state.json").read_text())["log_history"]
    first = log[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(HALF, abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["kl"] == 0.0
    assert (runs["kto"] / "adapter_model.safetensors").is_file() and not (runs["kto"] / "ref").exists()
    assert all((runs["kto"] / name).is_file() for name in (TRAINING_PLOT, REWARD_PLOT))  # as train plots its runs


def test_adapter_reloads_in_plain_peft_with_the_reported_preferences(runs, tiny_model_dir, pairs):
    out = runs["kto"]
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_vl"))
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"), str(out))
    data = DataArguments(dataset_name=str(pairs["validation"]), val_split_ratio=0.0)
    splits = build_preference_splits(data, spec.encoding, processor)
    accuracy = preference_accuracy(plain, PreferenceCollator(processor, splits.preparers), splits.train)
    assert accuracy == pytest.approx(_results(out)["eval_preference_accuracy"])


@pytest.mark.parametrize(
    ("reference", "loss_type"),
    [
        ("new LoRA disabled", "kto"),
        ("new LoRA disabled", "apo_zero_unpaired"),
        ("--ref_model", "kto"),
        ("SFT adapter copy", "kto"),
        ("full: a second copy", "kto"),
    ],
)
def test_step_zero_loss_is_one_half(tiny_model_dir, pairs, tmp_path, request, reference, loss_type):
    """Where the reference equals the policy, TRL's KTO loss is 1 - sigmoid(0) = 1/2 on every row (and
    APO-zero's sigmoid(0) = 1/2 on the undesirable ones), whatever holds the reference."""
    model = tiny_model_dir("qwen2_vl")
    adapter = str(request.getfixturevalue("runs")["sft"]) if reference == "SFT adapter copy" else None
    args = train_args(
        None if adapter else model,
        str(pairs["train"]),
        str(tmp_path),
        adapter_name_or_path=adapter,
        finetuning_type="full" if reference.startswith("full") else "lora",
        max_steps=1,
        max_train_samples=4,
        per_device_train_batch_size=8,
        val_split_ratio=0.0,
        logging_steps=1,
        report_to="none",
    )
    ref_model = model if reference == "--ref_model" else None
    result = run_kto(*args, KtoArguments(ref_model=ref_model, loss_type=loss_type))
    first = result.trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(HALF, abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert not (tmp_path / "ref").exists()
    assert models_in_memory(result.trainer) == MODELS_IN_MEMORY[reference]
    if reference.startswith("full"):  # the whole model saved, loading in plain transformers
        assert not (tmp_path / "adapter_model.safetensors").exists()
        assert AutoModelForImageTextToText.from_pretrained(tmp_path).config.model_type == "qwen2_vl"


# --- what is scored --------------------------------------------------------------------------------


def _unpaired_table(folder: Path, pairs_file: Path, n: int, labels=("true", "false"), wordy: bool = False) -> Path:
    """The first `n` shapes pairs as unpaired rows: the chosen answer labelled desirable, the rejected one not
    (`wordy`: said in a long sentence, so a row and its KL sequence differ in length by several tokens)."""
    with open(pairs_file, newline="") as f:
        pairs = list(csv.DictReader(f))[:n]
    path = folder / "unpaired.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "prompt", "completion", "label"])
        for i, pair in enumerate(pairs):
            image = str((pairs_file.parent / pair["image_path"]).resolve())
            wrong = f"I would say that the shape is {pair['rejected']}." if wordy else pair["rejected"]
            writer.writerow([image, pair["prompt"], pair["chosen"] if i % 2 == 0 else wrong, labels[i % 2]])
    return path


@pytest.fixture(scope="module")
def unpaired(tiny_model_dir, pairs, tmp_path_factory):
    """Four unpaired rows with a system prompt: processor, spec, splits and the collated batch."""
    path = _unpaired_table(tmp_path_factory.mktemp("unpaired"), Path(pairs["train"]), 4)
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    data = DataArguments(dataset_name=str(path), val_split_ratio=0.0, system_prompt="Look closely.")
    splits = build_kto_splits(data, spec.encoding, processor, KtoArguments(), seed=0)
    rows = list(splits.train)
    return processor, spec, splits, rows, KtoCollator(processor, splits.preparer)(rows)


def test_only_the_completion_and_end_of_turn_are_scored_and_kl_rows_take_the_previous_completion(unpaired):
    processor, spec, splits, rows, batch = unpaired
    decode = processor.tokenizer.decode
    ids, mask = batch["input_ids"], batch["completion_mask"].bool()
    kl_ids, kl_mask = batch["KL_input_ids"], batch["KL_completion_mask"].bool()
    image_id = processor.tokenizer.convert_tokens_to_ids(spec.encoding.image_token)
    for i, row in enumerate(rows):
        assert decode(ids[i][mask[i]]) == f"{row['completion']}<|im_end|>"
        assert decode(kl_ids[i][kl_mask[i]]) == f"{rows[i - 1]['completion']}<|im_end|>"  # cycled by one, as TRL
        start = int(mask[i].nonzero()[0])
        assert int(kl_mask[i].nonzero()[0]) == start and torch.equal(ids[i, :start], kl_ids[i, :start])
        assert "Look closely." in decode(ids[i, :start]) and (ids[i, :start] == image_id).any()
    assert not ((ids == image_id) & mask).any()
    assert batch["label"].tolist() == [row["label"] == "true" for row in rows]
    assert batch["image_grid_thw"].shape[0] == len(rows) and batch["pixel_values"].shape[0] > 0


def _log_probs(model, batch: dict, prefix: str = "") -> torch.Tensor:
    """Per row: the summed log-probability of the `{prefix}completion_mask` tokens of the `{prefix}` sequences,
    with the batch's image inputs (vlmtune's own computation, independent of TRL's fused head)."""
    inputs = {k: v for k, v in batch.items() if not k.startswith("KL_") and k != "label"}
    inputs.update({k[len(prefix) :]: batch[k] for k in batch if prefix and k.startswith(prefix)})
    mask = inputs.pop("completion_mask")
    inputs["labels"] = inputs["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    nll, _ = labelled_nll_per_row(model, inputs)
    return -nll


def _trainer(model, processor, splits, tmp_path, **kto) -> VlmKtoTrainer:
    config = kto_config(
        VlmTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"), KtoArguments(**kto)
    )
    return VlmKtoTrainer(
        model=model,
        args=config,
        train_dataset=splits.train,
        data_collator=KtoCollator(processor, splits.preparer),
        processing_class=processor,
        new_adapter=True,
    )


def _scored(trainer, policy, batch) -> tuple[float, dict, torch.Tensor]:
    """TRL's loss on `batch`, its logged metrics, and its KL sequences' log-probabilities."""
    with torch.no_grad():
        loss = trainer.compute_loss(policy, dict(batch))
        trainer.log({})
        held_back = {f"KL_{k}" for k in trainer._kl_inputs}  # as `_compute_loss` holds them back
        kl = trainer._compute_kl_logps(policy, {k: v for k, v in batch.items() if k not in held_back})
    return float(loss), trainer.state.log_history[-1], kl


def test_trl_scores_exactly_the_completions_with_their_images(unpaired, tiny_model_dir, tmp_path):
    """The desirable/undesirable log-probabilities TRL's KTOTrainer logs are the sums over the completion
    tokens alone, computed with the rows' images: blanking the pixels changes them."""
    processor, spec, splits, rows, batch = unpaired
    loaded = load_model(tiny_model_dir("qwen2_vl"))
    policy = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments(lora_dropout=0.0)).eval()
    trainer = _trainer(policy, processor, splits, tmp_path)
    loss, logged, kl = _scored(trainer, policy, batch)
    with torch.no_grad():
        ours, ours_kl = _log_probs(policy, batch), _log_probs(policy, batch, "KL_")
        blank = _log_probs(policy, dict(batch, pixel_values=torch.zeros_like(batch["pixel_values"])))
    desirable = batch["label"]
    assert loss == pytest.approx(HALF, abs=1e-6)  # a new LoRA: policy == reference
    assert logged["eval_logps/chosen"] == pytest.approx(float(ours[desirable].mean()), rel=1e-5)
    assert logged["eval_logps/rejected"] == pytest.approx(float(ours[~desirable].mean()), rel=1e-5)
    assert torch.allclose(kl, ours_kl, rtol=1e-5) and not torch.allclose(ours_kl, ours, rtol=1e-3)
    assert not torch.allclose(blank, ours, rtol=1e-3)


def test_a_text_only_row_beside_image_rows_is_scored_without_an_image(unpaired, tiny_model_dir, tmp_path):
    """A batch mixing rows with and without an image: each image goes to its own row's two sequences only, and
    TRL's scores are still vlmtune's own."""
    processor, spec, splits, rows, _ = unpaired
    messages = []
    for i, row in enumerate(sorted(rows, key=lambda row: row["__index__"])):
        image = [] if i == 1 else [{"type": "image"}]
        messages.append(
            {
                "images": [] if i == 1 else [row["image_path"]],
                "prompt": [{"role": "user", "content": [*image, {"type": "text", "text": row["prompt"]}]}],
                "completion": row["completion"],
                "label": row["label"] == "true",
            }
        )
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in messages))
    data = DataArguments(dataset_name=str(path), val_split_ratio=0.0)
    mixed = build_kto_splits(data, spec.encoding, processor, KtoArguments(), seed=0)
    batch = KtoCollator(processor, mixed.preparer)(list(mixed.train))
    image_id = processor.tokenizer.convert_tokens_to_ids(spec.encoding.image_token)
    with_image = [bool((ids == image_id).any()) for ids in batch["input_ids"]]
    assert with_image.count(False) == 1 and batch["image_grid_thw"].shape[0] == 3
    assert [bool((ids == image_id).any()) for ids in batch["KL_input_ids"]] == with_image
    loaded = load_model(tiny_model_dir("qwen2_vl"))
    policy = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments(lora_dropout=0.0)).eval()
    loss, logged, kl = _scored(_trainer(policy, processor, mixed, tmp_path), policy, batch)
    with torch.no_grad():
        ours, ours_kl = _log_probs(policy, batch), _log_probs(policy, batch, "KL_")
    assert loss == pytest.approx(HALF, abs=1e-6)
    assert logged["eval_logps/chosen"] == pytest.approx(float(ours[batch["label"]].mean()), rel=1e-5)
    assert torch.allclose(kl, ours_kl, rtol=1e-5)


@pytest.mark.parametrize("family", list(RECIPES))
def test_every_family_scores_only_the_completions_on_their_images(family, tiny_model_dir, pairs, tmp_path):
    """For each family: the trained tokens of both sequences are a completion and its end of turn, never an
    image token; TRL's KTOTrainer, fed these batches, starts at 1/2 with the log-probabilities vlmtune computes,
    its KL sequences scored with their own per-token inputs (Mllama's cross-attention mask too)."""
    loaded = load_model(tiny_model_dir(family))
    path = _unpaired_table(tmp_path, Path(pairs["validation"]), 4, wordy=True)
    data = DataArguments(dataset_name=str(path), val_split_ratio=0.0)
    splits = build_kto_splits(data, loaded.spec.encoding, loaded.processor, KtoArguments(), seed=0)
    rows = list(splits.train)
    batch = KtoCollator(loaded.processor, splits.preparer)(rows)
    tokenizer, facts = loaded.processor.tokenizer, loaded.spec.encoding
    ends = (*facts.turn_end, tokenizer.eos_token)
    image_ids = torch.tensor(sorted(token_ids(loaded.processor, facts.image_tokens)))
    for prefix, shift in (("", 0), ("KL_", 1)):
        mask = batch[f"{prefix}completion_mask"].bool()
        for i in range(len(rows)):
            text = tokenizer.decode(batch[f"{prefix}input_ids"][i][mask[i]]).strip()
            completion = rows[i - shift]["completion"]
            assert any(text == f"{completion}{end}" for end in ends), (prefix, text, completion)
        assert not torch.isin(batch[f"{prefix}input_ids"][mask], image_ids).any()
    assert all(f"KL_{key}" in batch for key in SEQUENCE_KEYS if key in batch)
    policy = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments(lora_dropout=0.0)).eval()
    trainer = _trainer(policy, loaded.processor, splits, tmp_path)
    loss, logged, kl = _scored(trainer, policy, batch)
    with torch.no_grad():
        ours, ours_kl = _log_probs(policy, batch), _log_probs(policy, batch, "KL_")
    expected = HALF
    if "moe" in family:  # TRL adds the router's load-balancing loss with the architecture's coefficient
        expected += trainer.router_aux_loss_coef * logged["eval_aux_loss"]
    assert loss == pytest.approx(expected, abs=1e-6)
    assert logged["eval_logps/chosen"] == pytest.approx(float(ours[batch["label"]].mean()), rel=1e-5)
    assert torch.allclose(kl, ours_kl, rtol=1e-5)


# --- the data shapes, and mistakes ------------------------------------------------------------------


def test_pairs_become_a_desirable_and_an_undesirable_row_in_one_shuffled_order(tiny_model_dir, pairs):
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    data = DataArguments(dataset_name=str(pairs["validation"]), val_split_ratio=0.0)
    splits = build_kto_splits(data, spec.encoding, processor, KtoArguments(), seed=0)
    with open(pairs["validation"], newline="") as f:
        table = list(csv.DictReader(f))
    rows = list(splits.train)
    assert len(rows) == 2 * len(table) and splits.pairs is not None
    by_pair = {}
    for row in rows:
        by_pair.setdefault(row["__index__"], {})[row["label"]] = row["completion"]
    assert all(by_pair[i] == {True: pair["chosen"], False: pair["rejected"]} for i, pair in enumerate(table))
    neighbours = sum(a["__index__"] == b["__index__"] for a, b in zip(rows, rows[1:]))
    assert neighbours < len(table) / 4  # a pair's two rows are rarely side by side (the KL estimate's neighbours)
    assert "preference pairs split into desirable and undesirable rows" in splits.describe()


@pytest.mark.parametrize("labels", [("1", "0"), ("desirable", "undesirable")])
def test_labels_may_be_1_0_or_desirable_undesirable(tiny_model_dir, pairs, tmp_path, labels):
    path = _unpaired_table(tmp_path, Path(pairs["train"]), 4, labels)
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    splits = build_kto_splits(
        DataArguments(dataset_name=str(path), val_split_ratio=0.0), spec.encoding, processor, KtoArguments()
    )
    rows = list(splits.train)
    batch = KtoCollator(processor, splits.preparer)(rows)
    assert batch["label"].tolist() == [row["label"] == labels[0] for row in rows]
    assert "unpaired rows" in splits.describe()


def test_trl_conversational_unpaired_rows_encode_as_the_table_does(unpaired, tmp_path):
    processor, spec, splits, rows, batch = unpaired
    conversational = [
        {
            "images": [row["image_path"]],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"]}]}],
            "completion": [{"role": "assistant", "content": row["completion"]}],
            "label": row["label"] == "true",
        }
        for row in sorted(rows, key=lambda row: row["__index__"])  # the table's order: the same row numbers
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in conversational))
    data = DataArguments(dataset_name=str(path), val_split_ratio=0.0, system_prompt="Look closely.")
    again = build_kto_splits(data, spec.encoding, processor, KtoArguments(), seed=0)
    assert again.preparer.schema.kind == "messages"
    order = [row["__index__"] for row in rows]
    by_index = {row["__index__"]: row for row in again.train}
    encoded = KtoCollator(processor, again.preparer)([by_index[i] for i in order])
    for key in ("input_ids", "completion_mask", "KL_input_ids", "pixel_values", "image_grid_thw", "label"):
        assert torch.equal(encoded[key], batch[key]), key


KTO = ["kto", "--model_name_or_path", "{model}", "--output_dir", "{tmp}/out", "--use_cpu", "--max_steps", "1"]


def _kto(tiny_model_dir, tmp_path, *flags: str) -> list[str]:
    values = {"model": tiny_model_dir("qwen2_vl"), "tmp": str(tmp_path)}
    return [a.format(**values) for a in KTO] + list(flags)


def test_a_bad_label_names_file_row_and_field(tiny_model_dir, pairs, tmp_path, capsys):
    path = _unpaired_table(tmp_path, Path(pairs["train"]), 4, ("true", "maybe"))
    with pytest.raises(SystemExit) as stopped:
        main(_kto(tiny_model_dir, tmp_path, "--dataset_name", str(path), "--val_split_ratio", "0"))
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in err
    assert f"vlmtune: error: {path}, row 1, field 'label': 'maybe' is not a label; use true" in err


def test_rows_without_kto_columns_are_named_with_the_flags(tiny_model_dir, shapes_data, tmp_path, capsys):
    code, err = cli_error(_kto(tiny_model_dir, tmp_path, "--dataset_name", str(shapes_data["train"])), capsys)
    assert code == 1 and "KTO needs unpaired rows (columns 'completion' and 'label'" in err
    assert "--completion_column" in err and "--chosen_column" in err


def test_on_bad_sample_skip_drops_the_row(tiny_model_dir, pairs, tmp_path):
    path = _unpaired_table(tmp_path, Path(pairs["train"]), 4, ("true", "maybe"))
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    data = DataArguments(dataset_name=str(path), val_split_ratio=0.0, on_bad_sample="skip")
    splits = build_kto_splits(data, spec.encoding, processor, KtoArguments())
    assert sorted(row["__index__"] for row in splits.train) == [0, 2]
    assert "field 'label'" in splits.summary()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--loss_type", "sigmoid"), "--loss_type must be one of kto, apo_zero_unpaired"),
        (("--desirable_weight", "0"), "--desirable_weight must be greater than 0"),
        (("--beta", "0"), "--beta must be greater than 0"),
        (
            ("--per_device_train_batch_size", "1"),
            "--per_device_train_batch_size must be at least 2 with --loss_type kto",
        ),
        (("--packing", "--max_seq_length", "128"), "vlmtune kto: --packing is not supported yet"),
        (("--train_sampling_strategy", "group_by_length"), "group_by_length is not supported: KTO's KL estimate"),
    ],
)
def test_bad_kto_options_are_usage_errors(tiny_model_dir, pairs, tmp_path, capsys, flags, says):
    code, err = cli_error(_kto(tiny_model_dir, tmp_path, "--dataset_name", str(pairs["train"]), *flags), capsys)
    assert code == 2 and says in err


def test_dpo_loss_type_kto_points_to_vlmtune_kto(tiny_model_dir, pairs, tmp_path, capsys):
    argv = ["dpo", "--model_name_or_path", tiny_model_dir("qwen2_vl"), "--dataset_name", str(pairs["train"])]
    code, err = cli_error([*argv, "--output_dir", str(tmp_path), "--loss_type", "kto"], capsys)
    assert code == 2 and "--loss_type kto is not supported" in err and "run `vlmtune kto` with the same data" in err


# Checkpoint/resume, QLoRA and a config file in other tools' names: tests/test_dpo.py, parametrized over dpo and kto.
