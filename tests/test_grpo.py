"""`vlmtune grpo`: TRL's GRPOTrainer on the SFT rows, rewarded by vlmtune's metrics or the user's function.

The tiny Qwen2-VL is trained by `vlmtune train` first, then by `vlmtune grpo` continuing its adapter with
the exact-match reward, both through the command line as a user runs them, on the bundled shapes data.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText
from trl.trainer.grpo_trainer import shuffle_sequence_dict, split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from tests.helpers import cli_error, short_run
from vlmtune.cli import main
from vlmtune.config import DataArguments, FinetuneArguments, GrpoArguments, ModelArguments, VlmTrainingArguments
from vlmtune.data.prompts import prompt_rows
from vlmtune.data.splits import build_splits
from vlmtune.data.synthetic import QUESTIONS, SENTENCE, write_shapes_dataset
from vlmtune.eval.evaluate import evaluate_generation
from vlmtune.eval.rewards import build_rewards
from vlmtune.models.generation import end_of_turn_ids
from vlmtune.models.loading import apply_finetuning, load_model, load_processing
from vlmtune.models.tiny import RECIPES
from vlmtune.train.grpo import grpo_config, grpo_trainer

RUN = ["--use_cpu", "--seed", "0", "--report_to", "none", "--save_strategy", "no", "--max_new_tokens", "4"]
# 16 completions per step: 2 prompts x 8 generations; completions of at most 4 tokens (a colour word + <|im_end|>).
GRPO = ["--per_device_train_batch_size", "16", "--num_generations", "8", "--max_completion_length", "4"]


def _data(shapes_data) -> list[str]:
    return ["--dataset_name", str(shapes_data["train"]), "--eval_dataset_name", str(shapes_data["validation"])]


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, shapes_data, tmp_path_factory):
    """A short SFT (about a third of the held-out answers right), then GRPO continuing its adapter with the
    exact-match reward, 8 prompts x 4 sampled answers per step; both evaluated on the same held-out rows."""
    root, model = tmp_path_factory.mktemp("grpo_runs"), tiny_model_dir("qwen2_vl")
    common = ["--model_name_or_path", model, *_data(shapes_data), *RUN]
    sft = ["--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--max_steps", "35"]
    main(["train", *common, *sft, "--output_dir", str(root / "sft")])
    batch = ["--per_device_train_batch_size", "32", "--num_generations", "4", "--max_completion_length", "4"]
    grpo = [*batch, "--learning_rate", "2e-3", "--max_steps", "16", "--logging_steps", "2"]
    main(["grpo", *common, *grpo, "--adapter_name_or_path", str(root / "sft"), "--output_dir", str(root / "grpo")])
    return {name: root / name for name in ("sft", "grpo")}


def _results(folder) -> dict:
    return json.loads((folder / "all_results.json").read_text())


def test_grpo_after_sft_raises_the_mean_reward_and_reports_held_out_accuracy(runs):
    """The sampled answers' mean exact-match reward rises across training (first and last three logging
    steps), and they end their turn. Held-out greedy exact match is measured before and after (on this tiny
    model it does not reliably rise within a test's budget: docs/preference.md); the "before" is the SFT model's
    own score."""
    log = json.loads((runs["grpo"] / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in log if "reward" in e]
    assert [e["step"] for e in steps] == list(range(2, 17, 2))
    assert all("rewards/exact_match/mean" in e and "completions/mean_length" in e for e in steps)
    # Sampling stops at the end of the turn: most answers are a colour and <|im_end|>, not cut at 4 tokens.
    assert sum(e["completions/clipped_ratio"] for e in steps[-3:]) / 3 < 0.5
    assert all(0 < e["completions/mean_terminated_length"] < 4 for e in steps)
    first, last = (sum(e["reward"] for e in part) / 3 for part in (steps[:3], steps[-3:]))
    assert last >= first + 0.03
    assert (runs["grpo"] / "reward_curves.png").is_file()
    sft, grpo = _results(runs["sft"]), _results(runs["grpo"])
    assert grpo["eval_exact_match_before"] == pytest.approx(sft["eval_exact_match"])
    assert 0 <= grpo["eval_exact_match"] <= 1 and grpo["eval_samples"] == sft["eval_samples"]


def _sentence_answers(folder) -> float:
    """Share of the held-out predictions (`predictions.jsonl`) that are a sentence, not the bare answer."""
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    opening = SENTENCE.split("{}")[0].split()[0]
    return sum(json.loads(line)["prediction"].startswith(opening) for line in lines) / len(lines)


def test_grpo_exact_match_reward_teaches_bare_answers_that_sft_data_mixed_with_sentences(tiny_model_dir, tmp_path):
    """Issue 19's proof, as a user meets it: half of the SFT answers are sentences ("The answer is red.")
    though the question asks for one word, and the held-out references are bare. The SFT model answers
    most held-out rows with a sentence, so its exact match is low; GRPO with the exact-match reward rewards
    the bare right answers it samples, and held-out greedy exact match rises (data, SFT and GRPO seed 0
    here; seeds 1 and 2 rose as much: docs/preference.md), with fewer sentences among the answers."""
    files = write_shapes_dataset(tmp_path / "data", n_train=300, n_eval=100, seed=0, sentence_share=0.5)
    data = ["--dataset_name", str(files["train"]), "--eval_dataset_name", str(files["validation"])]
    common = ["--model_name_or_path", tiny_model_dir("qwen2_vl"), *data, *RUN]
    sft = ["--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--max_steps", "150"]
    main(["train", *common, *sft, "--output_dir", str(tmp_path / "sft")])
    batch = ["--per_device_train_batch_size", "32", "--num_generations", "8", "--max_completion_length", "4"]
    grpo = [*batch, "--temperature", "0.7", "--learning_rate", "3e-4", "--max_steps", "30"]
    main(["grpo", *common, *grpo, "--adapter_name_or_path", str(tmp_path / "sft"), "--output_dir", str(tmp_path / "g")])
    results = _results(tmp_path / "g")
    assert results["eval_samples"] == 100
    assert results["eval_exact_match"] > results["eval_exact_match_before"] + 0.1
    assert _sentence_answers(tmp_path / "g") < _sentence_answers(tmp_path / "sft") - 0.25


def test_sentence_share_writes_sentences_in_training_answers_only(tmp_path):
    """The data of the test above: the same images, questions and colours as the plain shapes data, about
    half of the training answers (and no held-out one) written as a sentence."""
    plain = write_shapes_dataset(tmp_path / "plain", n_train=200, n_eval=40, seed=0)
    mixed = write_shapes_dataset(tmp_path / "mixed", n_train=200, n_eval=40, seed=0, sentence_share=0.5)
    train, plain_train = _rows(mixed["train"]), _rows(plain["train"])
    sentences = [r for r, p in zip(train, plain_train) if r["response"] == SENTENCE.format(p["response"])]
    assert 0.4 < len(sentences) / len(train) < 0.6
    assert all(r["response"] in (p["response"], SENTENCE.format(p["response"])) for r, p in zip(train, plain_train))
    assert [r["image_path"] for r in train] == [r["image_path"] for r in plain_train]
    assert _rows(mixed["validation"]) == _rows(plain["validation"])
    assert (tmp_path / "mixed" / train[-1]["image_path"]).read_bytes() == (
        tmp_path / "plain" / train[-1]["image_path"]
    ).read_bytes()


def test_adapter_reloads_in_plain_peft_and_answers_as_reported(runs, tiny_model_dir, shapes_data):
    out = runs["grpo"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()  # one adapter
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_vl"))
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"), str(out))
    data = DataArguments(dataset_name=str(shapes_data["validation"]), val_split_ratio=0.0)
    splits = build_splits(data, spec.encoding)
    result = evaluate_generation(plain, processor, splits.preparer, splits.train, max_new_tokens=4)
    assert result.metrics["exact_match"] == pytest.approx(_results(out)["eval_exact_match"])


USER_REWARD = """
import json

def score(completions, answers, prompts, **kwargs):
    with open(__file__ + ".calls.jsonl", "a") as f:
        f.write(json.dumps({"completions": completions, "answers": answers, "prompts": prompts,
                            "rows": kwargs["row"], "ids": kwargs["completion_ids"],
                            "images": [len(images) for images in kwargs["images"]]}) + "\\n")
    return [float(c == a) for c, a in zip(completions, answers)]
"""


def test_user_reward_gets_row_aligned_completions_and_answers(tiny_model_dir, shapes_data, tmp_path):
    reward = tmp_path / "my_rewards.py"
    reward.write_text(USER_REWARD)
    model = tiny_model_dir("qwen2_vl")
    args = ["--model_name_or_path", model, *_data(shapes_data), *RUN, *GRPO, "--max_steps", "2"]
    main(["grpo", *args, "--reward", f"{reward}:score", "exact_match", "--output_dir", str(tmp_path / "out")])
    calls = [json.loads(line) for line in (tmp_path / "my_rewards.py.calls.jsonl").read_text().splitlines()]
    rows = _rows(shapes_data["train"])
    processor, _ = load_processing(model)
    assert len(calls) == 2 and all(len(call["completions"]) == 16 for call in calls)
    for call in calls:
        assert [rows[i]["response"] for i in call["rows"]] == call["answers"]
        assert [rows[i]["prompt"] for i in call["rows"]] == call["prompts"]
        assert call["images"] == [1] * 16  # every completion's row brought its image
        decoded = [processor.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in call["ids"]]
        assert decoded == call["completions"] and not any("<|im_end|>" in c for c in call["completions"])
        assert len(set(call["rows"])) == 2  # 8 completions of each of 2 prompts
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/score/mean" in e and "rewards/exact_match/mean" in e for e in state)


RAISING_REWARD = """
def score(completions, answers, prompts, **kwargs):
    if "blue" in answers:
        raise ValueError("no blue please")
    return [0.0] * len(completions)
"""


def test_raising_reward_names_the_function_and_row(tiny_model_dir, tmp_path, capsys):
    shapes = write_shapes_dataset(tmp_path / "data", n_train=16, n_eval=0, seed=1)
    reward = tmp_path / "bad.py"
    reward.write_text(RAISING_REWARD)
    args = ["--model_name_or_path", tiny_model_dir("qwen2_vl"), "--dataset_name", str(shapes["train"]), *RUN, *GRPO]
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *args, "--max_steps", "8", "--reward", f"{reward}:score", "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--reward {reward}:score raised ValueError: no blue please for {shapes['train']}, row " in err
    row = int(err.split(", row ")[1].split(" ")[0])
    assert _rows(shapes["train"])[row]["response"] == "blue"
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "completions", "reference", "scores"),
    [
        ("exact_match", [" Red.", "blue"], "red", [1.0, 0.0]),  # normalised: case, punctuation, spaces
        ("relaxed_accuracy", ["10.3", "12"], "10", [1.0, 0.0]),  # ChartQA: a number within 5%
        ("anls", ["rex", "blue"], "red", [pytest.approx(2 / 3), 0.0]),  # 1 - edit distance / length, 0 below 0.5
        ("f1", ["red circle", "blue"], "red square", [0.5, 0.0]),  # SQuAD token F1
    ],
)
def test_built_in_rewards_score_completions_as_vlmtune_eval_does(name, completions, reference, scores):
    (reward,) = build_rewards([name], end_of_turn_ids=[])
    messages = [[{"role": "assistant", "content": text}] for text in completions]
    assert reward(prompts=["q", "q"], completions=messages, references=[[reference], [reference]]) == scores


def test_sampling_loss_and_reward_options_reach_trls_config(tmp_path):
    """What `vlmtune grpo` passes to TRL's GRPOConfig under TRL's names: GSPO is `--loss_type grpo
    --importance_sampling_level sequence`, Dr. GRPO `--loss_type dr_grpo --scale_rewards none`."""
    options = dict(num_generations=4, max_completion_length=12, temperature=0.7, top_p=0.9, beta=0.04)
    options |= dict(loss_type="grpo", importance_sampling_level="sequence", scale_rewards="none", epsilon=0.3)
    options |= dict(reward=["exact_match", "format"], reward_weights=[1.0, 0.2], num_iterations=2)
    training = VlmTrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8)
    config = grpo_config(training, GrpoArguments(**options))
    assert {name: getattr(config, name) for name in options if name != "reward"} == {
        name: value for name, value in options.items() if name != "reward"
    }


def test_format_reward_is_1_only_for_a_completion_that_ends_its_turn(tiny_model_dir):
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    stop = end_of_turn_ids(processor, spec.encoding)
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop
    (reward,) = build_rewards(["format"], stop)
    red = processor.tokenizer.encode("red")
    assert reward(prompts=[], completions=["red", "red"], completion_ids=[[*red, stop[0]], red]) == [1.0, 0.0]


def test_prompt_holds_system_text_and_image_and_ends_with_the_generation_prompt(tiny_model_dir, shapes_data):
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    data = DataArguments(
        dataset_name=str(shapes_data["validation"]), val_split_ratio=0.0, system_prompt="Look closely."
    )
    splits = build_splits(data, spec.encoding, processor=processor)
    row = prompt_rows(splits.train, splits.preparer, processor)[0]
    assert row["answer"] == _rows(shapes_data["validation"])[0]["response"] and len(row["images"]) == 1
    text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert "Look closely." in text and "<|vision_start|>" in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_generations", "3"], "must be divisible by num_generations (3)"),
        (["--reward", "exact_match", "f1", "--reward_weights", "1"], "1 weight(s) for 2 --reward reward(s)"),
        (["--reward", "exact_mach"], "--reward exact_mach: not a reward; choose from exact_match"),
        (["--reward", "missing.py:score"], "--reward missing.py:score: no such file missing.py"),
        (["--loss_type", "sigmoid"], "--loss_type must be one of grpo, dr_grpo, dapo"),
    ],
)
def test_option_mistakes_are_messages(tiny_model_dir, shapes_data, tmp_path, capsys, flags, message):
    args = ["--model_name_or_path", tiny_model_dir("qwen2_vl"), *_data(shapes_data), *RUN, *GRPO]
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *args, *flags, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_evaluation_without_rows_is_a_message_before_the_weights_load(tiny_model_dir, shapes_data, tmp_path, capsys):
    model, train = tiny_model_dir("qwen2_vl"), str(shapes_data["train"])
    args = ["--model_name_or_path", model, "--dataset_name", train, *RUN, *GRPO]
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *args, "--val_split_ratio", "0", "--eval_strategy", "steps", "--output_dir", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "--eval_strategy needs evaluation rows" in err
    assert "trainable" not in out.lower()  # (the parameter table is printed once the model is loaded)


def test_image_token_marks_line_up_with_left_padded_prompts_of_different_lengths(tiny_model_dir, tmp_path):
    """TRL left-pads the prompts; the processor's per-token image marks (Qwen's mm_token_type_ids, which its
    3-D positions are computed from) must be padded the same way, or a shorter prompt's image is misplaced."""
    files = write_shapes_dataset(tmp_path, n_train=8, n_eval=0, seed=0, questions=("colour", "shape"))
    loaded = load_model(tiny_model_dir("qwen2_vl"))
    model = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments())
    data = DataArguments(dataset_name=str(files["train"]), val_split_ratio=0.0)
    splits = build_splits(data, loaded.spec.encoding, processor=loaded.processor)
    training = VlmTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    config = grpo_config(training, GrpoArguments(num_generations=2, max_completion_length=3))
    rewards = build_rewards(["exact_match"], [])
    trainer = grpo_trainer(model, rewards, config, splits, loaded.processor, ModelArguments(), [])
    questions = [row["prompt"] for row in _rows(files["train"])]
    colour, shape = questions.index(QUESTIONS["colour"]), questions.index(QUESTIONS["shape"])
    rows = trainer.train_dataset
    batch = trainer._generate_and_score_completions([rows[colour], rows[colour], rows[shape], rows[shape]])
    ids, lengths = batch["prompt_ids"], batch["prompt_mask"].sum(1)
    assert lengths[0] != lengths[2]  # one prompt is left-padded
    image_id = loaded.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    marks = batch["mm_token_type_ids"][:, : ids.shape[1]]
    assert (ids == image_id).any() and torch.equal(marks == 1, ids == image_id)
    assert loaded.processor.tokenizer.padding_side == "right"  # the processor saved with the adapter is unchanged
    # What TRL trains on: each completion's log-probabilities, batched (padded, shuffled as TRL shuffles) equal
    # those of its sequence alone, unpadded, with only its own image.
    with torch.no_grad():
        shuffled = unsplit_pixel_values_by_grid(shuffle_sequence_dict(split_pixel_values_by_grid(batch)))
        batched = _completion_log_probs(trainer, shuffled)
        for i in range(4):
            alone = _completion_log_probs(trainer, _alone(batch, i))
            j = next(j for j in range(4) if torch.equal(shuffled["completion_ids"][j], batch["completion_ids"][i]))
            assert torch.allclose(batched[j], alone[0], atol=1e-5)


# The image inputs of TRL's batches (trl 1.16, `GRPOTrainer._generate_and_score_completions`' output).
IMAGE_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "num_tiles",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _completion_log_probs(trainer, batch) -> torch.Tensor:
    """TRL's per-token log-probabilities of a batch's completions (its own training forward)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    images = {k: batch[k] for k in IMAGE_INPUTS if k in batch}
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, mask, batch["completion_ids"].size(1), batch_size=len(ids), **images
    )
    return logps


def _alone(batch, i: int) -> dict:
    """Row `i` of a TRL batch as a batch of its own: its prompt without padding, its image's pixels only."""
    keep = batch["prompt_mask"][i].bool()
    patches = batch["image_grid_thw"].prod(-1)
    start = int(patches[:i].sum())
    marks = batch["mm_token_type_ids"][i]
    return {
        "prompt_ids": batch["prompt_ids"][i][keep][None],
        "prompt_mask": batch["prompt_mask"][i][keep][None],
        "completion_ids": batch["completion_ids"][i : i + 1],
        "completion_mask": batch["completion_mask"][i : i + 1],
        "pixel_values": batch["pixel_values"][start : start + int(patches[i])],
        "image_grid_thw": batch["image_grid_thw"][i : i + 1],
        "num_images": [1],
        "mm_token_type_ids": torch.cat([marks[: len(keep)][keep], marks[len(keep) :]])[None],
    }


LENGTH_REWARD = """
def longer(completions, answers, prompts, **kwargs):
    return [float(len(c)) for c in completions]
"""


def test_a_training_step_makes_answers_above_their_group_mean_more_likely(tiny_model_dir, tmp_path):
    """What GRPO is for, through vlmtune's rows, rewards and processor: after one step on a batch, the answers
    that scored above their group's mean (a user reward: the answer's length) gained log-probability against
    those below it. A reward paired with the wrong completions, or an advantage of the wrong sign, fails this."""
    files = write_shapes_dataset(tmp_path, n_train=4, n_eval=0, seed=0)
    (tmp_path / "lengths.py").write_text(LENGTH_REWARD)
    loaded = load_model(tiny_model_dir("qwen2_vl"))
    model = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments())
    data = DataArguments(dataset_name=str(files["train"]), val_split_ratio=0.0)
    splits = build_splits(data, loaded.spec.encoding, processor=loaded.processor)
    out = str(tmp_path / "o")
    training = VlmTrainingArguments(output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=16)
    config = grpo_config(training, GrpoArguments(num_generations=4, max_completion_length=6))
    rewards = build_rewards([f"{tmp_path / 'lengths.py'}:longer"], [])
    trainer = grpo_trainer(model, rewards, config, splits, loaded.processor, ModelArguments(), [])
    rows = trainer.train_dataset
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([rows[i] for i in range(4) for _ in range(4)])
    advantages = batch["advantages"]
    assert (advantages > 0).any() and (advantages < 0).any()
    with torch.no_grad():
        before = _completion_log_probs(trainer, batch).mul(batch["completion_mask"]).sum(1)
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this step stands in for
    trainer.compute_loss(model.train(), batch).backward()
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.grad is not None and p.grad.norm() > 0):  # a new LoRA: B only
            p -= 0.05 * p.grad / p.grad.norm()
        gained = _completion_log_probs(trainer, batch).mul(batch["completion_mask"]).sum(1) - before
    assert gained[advantages > 0].mean() > gained[advantages < 0].mean()


@pytest.mark.parametrize("family", list(RECIPES))
def test_every_family_samples_answers_and_trains_on_them_with_the_images(family, tiny_model_dir, tmp_path, capsys):
    """For each family: TRL samples answers to prompts with images, and its training forward scores them with
    those images (other pixels change the answers' log-probabilities) to a finite loss. A family whose processor
    returns inputs TRL's GRPO drops before that forward (Mllama's aspect ratios and cross-attention mask) is
    refused with the reason before its weights load, not failed after the first generation."""
    files = write_shapes_dataset(tmp_path, n_train=4, n_eval=0, seed=0)
    if family == "mllama":
        argv = ["grpo", "--model_name_or_path", tiny_model_dir(family), "--dataset_name", str(files["train"]), *RUN]
        code, err = cli_error([*argv, *GRPO, "--output_dir", str(tmp_path / "o")], capsys)
        assert code == 2 and "returns aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask" in err
        assert "vlmtune dpo and vlmtune kto can" in err and not (tmp_path / "o" / "adapter_model.safetensors").exists()
        return
    loaded = load_model(tiny_model_dir(family))
    model = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments(lora_dropout=0.0))
    data = DataArguments(dataset_name=str(files["train"]), val_split_ratio=0.0)
    splits = build_splits(data, loaded.spec.encoding, processor=loaded.processor)
    training = VlmTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    config = grpo_config(training, GrpoArguments(num_generations=2, max_completion_length=3))
    trainer = grpo_trainer(
        model, build_rewards(["exact_match"], []), config, splits, loaded.processor, ModelArguments(), []
    )
    rows = trainer.train_dataset
    batch = trainer._generate_and_score_completions([rows[0], rows[0], rows[1], rows[1]])
    assert batch["completion_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] > 0
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this stands in for
    with torch.no_grad():
        assert torch.isfinite(trainer.compute_loss(model.train(), batch))
        model.eval()
        scored = _completion_log_probs(trainer, batch) * batch["completion_mask"]
        # Other pictures: every pixel shifted (zeros would read as padding images to Idefics3 and SmolVLM).
        other = _completion_log_probs(trainer, dict(batch, pixel_values=batch["pixel_values"] + 1))
    assert not torch.allclose(scored, other * batch["completion_mask"], atol=1e-4)


def test_continuing_an_adapter_reads_the_base_model_it_records(tiny_model_dir, shapes_data, tmp_path):
    """`vlmtune grpo --adapter_name_or_path SFT` without `--model_name_or_path`, as `vlmtune dpo`, `kto` and
    `predict` take it: the base model is the one the adapter was trained on."""
    sft = short_run(tiny_model_dir("qwen2_vl"), shapes_data, tmp_path / "sft", max_steps=1).output_dir
    args = ["--dataset_name", str(shapes_data["train"]), *RUN, *GRPO, "--max_steps", "1", "--max_train_samples", "4"]
    main(["grpo", "--adapter_name_or_path", str(sft), *args, "--output_dir", str(tmp_path / "g")])
    resolved = json.loads((tmp_path / "g" / "vlmtune_config.json").read_text())
    assert resolved["model_name_or_path"] == tiny_model_dir("qwen2_vl")
    assert (tmp_path / "g" / "adapter_model.safetensors").is_file()
