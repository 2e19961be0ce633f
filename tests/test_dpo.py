"""`vlmtune dpo`: preference pairs on TRL's DPOTrainer, scored only on the answers, after a short SFT.

The pairs are the shapes data with the right colour chosen and a wrong one rejected
(`write_preference_dataset`); the tiny Qwen2-VL is trained by `vlmtune train` first, then by `vlmtune dpo`
continuing its adapter, both through the command line as a user runs them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, TrainerCallback

from tests.data_files import png, png_bytes, write_rows
from tests.helpers import MODELS_IN_MEMORY, cli_error, models_in_memory, short_run, train_args
from vlmtune.cli import main
from vlmtune.config import (
    TRAINING_ARGUMENTS,
    DataArguments,
    DpoArguments,
    FinetuneArguments,
    GrpoArguments,
    KtoArguments,
    VlmTrainingArguments,
    aliases,
    parse_args,
)
from vlmtune.data.collate import SEQUENCE_KEYS
from vlmtune.data.encode import token_ids
from vlmtune.data.kto import KtoCollator, build_kto_splits
from vlmtune.data.preference import PreferenceCollator, build_preference_splits
from vlmtune.data.synthetic import write_preference_dataset
from vlmtune.errors import DataError
from vlmtune.eval.plots import REWARD_PLOT, TRAINING_PLOT
from vlmtune.models.loading import apply_finetuning, load_model, load_processing
from vlmtune.models.tiny import RECIPES
from vlmtune.train.grpo import run_grpo
from vlmtune.train.kto import run_kto
from vlmtune.train.preference import VlmDpoTrainer, dpo_config, pair_log_probs, preference_accuracy, run_dpo

LN2 = math.log(2)
RUN = ["--use_cpu", "--seed", "0", "--report_to", "none", "--save_strategy", "no", "--max_new_tokens", "4"]
BATCH = [
    "--per_device_train_batch_size",
    "8",
    "--learning_rate",
    "1e-3",
    "--logging_steps",
    "5",
    "--logging_first_step",
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_preference_dataset(tmp_path_factory.mktemp("pairs"), n_train=200, n_eval=40, seed=0)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, pairs, tmp_path_factory):
    """A 30-step SFT on the chosen answers, then 30 DPO steps continuing its adapter (DPO + the SFT term on
    the chosen answers, `--loss_type sigmoid sft`); both evaluated on the same held-out pairs."""
    root, model = tmp_path_factory.mktemp("runs"), tiny_model_dir("qwen2_vl")
    data = ["--dataset_name", str(pairs["train"]), "--eval_dataset_name", str(pairs["validation"])]
    common = ["--model_name_or_path", model, *data, *RUN, *BATCH, "--max_steps", "30"]
    main(
        ["train", *common, "--response_column", "chosen", "--learning_rate", "3e-3", "--output_dir", str(root / "sft")]
    )
    dpo = ["--adapter_name_or_path", str(root / "sft"), "--loss_type", "sigmoid", "sft", "--learning_rate", "1e-3"]
    main(["dpo", *common, *dpo, "--output_dir", str(root / "dpo")])
    return {name: root / name for name in ("sft", "dpo")}


def _results(folder) -> dict:
    return json.loads((folder / "all_results.json").read_text())


def test_dpo_after_sft_raises_held_out_accuracy(runs):
    sft, dpo = _results(runs["sft"]), _results(runs["dpo"])
    # The model prefers the right colour over the wrong one on more held-out pairs than before DPO ...
    assert dpo["eval_preference_accuracy"] >= dpo["eval_preference_accuracy_before"] + 0.1
    # ... and answers more held-out images right (generated, exact match against the chosen answer).
    assert dpo["eval_exact_match"] >= sft["eval_exact_match"] + 0.1


def test_reference_is_the_sft_adapter_and_metrics_are_logged(runs):
    """Continuing an SFT adapter, the reference is that adapter as the run found it: at step 1 policy and
    reference agree exactly (rewards 0; against the base model they would not). Rewards and margins are logged
    and plotted."""
    log = json.loads((runs["dpo"] / "trainer_state.json").read_text())["log_history"]
    first, trained = log[0], [e for e in log[1:] if "rewards/accuracies" in e]
    assert first["step"] == 1 and first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert trained and all("rewards/margins" in e and "logps/rejected" in e for e in trained)
    assert trained[-1]["rewards/margins"] > 0 and trained[-1]["rewards/accuracies"] > 0.5
    # Plotted as `vlmtune train` plots its runs: loss and learning rate, and the rewards TRL logged.
    assert all((runs["dpo"] / name).is_file() for name in (TRAINING_PLOT, REWARD_PLOT))


@pytest.mark.parametrize("reference", ["new LoRA disabled", "--ref_model", "SFT adapter copy", "full: a second copy"])
def test_step_zero_loss_is_ln2(tiny_model_dir, pairs, tmp_path, request, reference):
    model = tiny_model_dir("qwen2_vl")
    adapter = str(request.getfixturevalue("runs")["sft"]) if reference == "SFT adapter copy" else None
    args = train_args(
        None if adapter else model,  # continuing an adapter, the base model is the one it records
        str(pairs["train"]),
        str(tmp_path),
        adapter_name_or_path=adapter,
        finetuning_type="full" if reference.startswith("full") else "lora",
        max_steps=1,
        max_train_samples=8,
        per_device_train_batch_size=8,
        val_split_ratio=0.0,
        logging_steps=1,
        report_to="none",
    )
    result = run_dpo(*args, DpoArguments(ref_model=model if reference == "--ref_model" else None))
    first = result.trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert not (tmp_path / "ref").exists()  # one adapter in the output, no reference copy
    assert models_in_memory(result.trainer) == MODELS_IN_MEMORY[reference]
    if reference.startswith("full"):  # the whole model saved, loading in plain transformers
        assert not (tmp_path / "adapter_model.safetensors").exists()
        assert AutoModelForImageTextToText.from_pretrained(tmp_path).config.model_type == "qwen2_vl"


@pytest.mark.parametrize(
    ("losses", "weights", "beta", "constant", "nll_weight"),
    [
        (["ipo"], None, 0.25, (1 / (2 * 0.25)) ** 2, 0),  # IPO's squared distance to 1/(2 beta), at zero margin
        (["hinge"], None, 0.1, 1.0, 0),  # relu(1 - beta * 0)
        (["sigmoid", "sft"], None, 0.1, LN2, 1),  # RPO: DPO's ln 2 plus the chosen answers' mean NLL
        (["sigmoid", "sft"], [0.5, 2.0], 0.1, 0.5 * LN2, 2),  # each loss times its --loss_weights weight
    ],
    ids=["ipo", "hinge", "sigmoid sft", "sigmoid sft weighted"],
)
def test_loss_type_and_weights_change_the_first_step_loss(
    tiny_model_dir, pairs, tmp_path, losses, weights, beta, constant, nll_weight
):
    """With a new LoRA the reference equals the policy at step 0 (zero margins), so the first logged loss is each
    loss's value at zero margin, plus, for `sft`, the chosen answers' mean NLL under the base model."""
    one_step = dict(max_steps=1, max_train_samples=8, per_device_train_batch_size=8, logging_steps=1, report_to="none")
    args = train_args(tiny_model_dir("qwen2_vl"), str(pairs["train"]), str(tmp_path), **one_step, val_split_ratio=0.0)
    result = run_dpo(*args, DpoArguments(loss_type=losses, loss_weights=weights, beta=beta))
    model, trainer = result.trainer.model.eval(), result.trainer
    batch = trainer.data_collator(list(trainer.train_dataset))  # the one step's batch: all 8 pairs
    with torch.no_grad(), model.disable_adapter():  # the base model: the new LoRA at step 0
        chosen, _ = pair_log_probs(model, batch)
    chosen_nll = float(-chosen.sum() / batch["completion_mask"].chunk(2)[0].sum())
    assert trainer.state.log_history[0]["loss"] == pytest.approx(constant + nll_weight * chosen_nll, abs=1e-5)


# `vlmtune kto` runs on the same policy, reference and outputs (`train/preference.py`): its step-0 loss where the
# reference equals the policy is 1 - sigmoid(0) = 1/2 (tests/test_kto.py).
COMMANDS = {"dpo": (run_dpo, DpoArguments, LN2), "kto": (run_kto, KtoArguments, 0.5)}
# `vlmtune grpo`, at its cheapest: 2 answers of at most 4 tokens to each of 2 prompts a step.
GRPO_CHEAPEST = dict(num_generations=2, max_completion_length=4)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_qlora_continues_the_sft_adapter_on_a_4bit_base(tiny_model_dir, shapes_data, pairs, tmp_path, command):
    """QLoRA SFT, then `vlmtune dpo|kto --load_in_4bit --adapter_name_or_path SFT`: the base loads in 4 bits, the
    SFT adapter trains further with its frozen copy as the reference (step-0 loss ln 2 for DPO, 1/2 for KTO), and
    the result is one adapter with the SFT adapter's weights moved, which loads onto the full-precision base."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    run, arguments, step_zero = COMMANDS[command]
    model_dir = tiny_model_dir("qwen2_vl")
    sft = short_run(model_dir, shapes_data, tmp_path / "sft", load_in_4bit=True, max_steps=1).output_dir
    steps = dict(max_steps=2, max_train_samples=4, per_device_train_batch_size=2, logging_steps=1, report_to="none")
    qlora = dict(adapter_name_or_path=str(sft), load_in_4bit=True, val_split_ratio=0.0)
    result = run(*train_args(None, str(pairs["train"]), str(tmp_path / command), **steps, **qlora), arguments())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.trainer.model.modules())
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    # Near the step-0 value, not to 1e-6 as on a full-precision base: on the 4-bit base the DPO step-0 loss came out
    # 3e-5 to 1.3e-4 off (policy and reference forwards differ slightly; cause not found). The base model as
    # reference is further.
    assert losses[0] == pytest.approx(step_zero, abs=1e-3) and math.isfinite(losses[-1]) and len(losses) == 2
    before = load_file(sft / "adapter_model.safetensors")
    after = load_file(result.output_dir / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    plain = PeftModel.from_pretrained(base, str(result.output_dir))
    assert sum("lora_B" in name for name, _ in plain.named_parameters()) == sum("lora_B" in k for k in after)


def test_adapter_reloads_in_plain_peft_with_the_reported_preferences(runs, tiny_model_dir, pairs):
    out = runs["dpo"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_vl"))
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"), str(out))
    data = DataArguments(dataset_name=str(pairs["validation"]), val_split_ratio=0.0)
    splits = build_preference_splits(data, spec.encoding, processor)
    collator = PreferenceCollator(processor, splits.preparers)
    accuracy = preference_accuracy(plain, collator, splits.train)
    assert accuracy == pytest.approx(_results(out)["eval_preference_accuracy"])


@pytest.fixture(scope="module")
def one_pair(tiny_model_dir, tmp_path_factory):
    """One pair with a system prompt: its processor, family spec, row, splits and collated [chosen, rejected]."""
    folder = tmp_path_factory.mktemp("one_pair")
    files = write_preference_dataset(folder, n_train=2, n_eval=1, seed=3)
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    data = DataArguments(dataset_name=str(files["train"]), val_split_ratio=0.0, system_prompt="Look closely.")
    splits = build_preference_splits(data, spec.encoding, processor)
    collator = PreferenceCollator(processor, splits.preparers)
    return processor, spec, splits, collator([splits.train[0]])


def test_only_the_answer_and_end_of_turn_are_scored_with_the_same_image_inputs(one_pair):
    processor, spec, splits, batch = one_pair
    row, ids, mask = splits.train[0], batch["input_ids"], batch["completion_mask"].bool()
    assert processor.tokenizer.decode(ids[0][mask[0]]) == f"{row['chosen']}<|im_end|>"
    assert processor.tokenizer.decode(ids[1][mask[1]]) == f"{row['rejected']}<|im_end|>"
    image_id = processor.tokenizer.convert_tokens_to_ids(spec.encoding.image_token)
    assert (ids == image_id).any() and not ((ids == image_id) & mask).any()
    # Everything before the answer is the same tokens on both sides: system text, image, prompt.
    start = int(mask[0].nonzero()[0])
    assert start == int(mask[1].nonzero()[0]) and torch.equal(ids[0, :start], ids[1, :start])
    assert "Look closely." in processor.tokenizer.decode(ids[0, :start])
    # The processor's image inputs are there for both sequences, identical.
    pixels, grids = batch["pixel_values"].chunk(2), batch["image_grid_thw"]
    assert torch.equal(pixels[0], pixels[1]) and grids.shape[0] == 2 and torch.equal(grids[0], grids[1])


def _log_probs_from_full_logits(model, batch) -> torch.Tensor:
    """Per sequence: the log-probability of its completion-mask tokens from the full logits (independent of
    models/loss.py and of TRL's fused head)."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs).logits.float().log_softmax(-1)
    picked = logits[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (picked * batch["completion_mask"][:, 1:]).sum(-1)


def test_trl_scores_exactly_the_answer_tokens(one_pair, tiny_model_dir, tmp_path):
    """The chosen/rejected log-probabilities TRL's DPOTrainer computes (and logs) are the sums over the
    answer tokens alone: equal to the full-logit sum over them, unlike the sum that also counts the prompt;
    changing one answer token changes them."""
    processor, spec, splits, batch = one_pair
    loaded = load_model(tiny_model_dir("qwen2_vl"))
    policy = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments(lora_dropout=0.0))
    config = dpo_config(VlmTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"), DpoArguments())
    trainer = VlmDpoTrainer(
        model=policy,
        args=config,
        train_dataset=splits.train,
        data_collator=PreferenceCollator(processor, splits.preparers),
        processing_class=processor,
        new_adapter=True,
    )
    policy.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(policy, dict(batch))
        trainer.log({})
        full = _log_probs_from_full_logits(policy, batch)
        ours = torch.cat(pair_log_probs(policy, batch))
        with_prompt = _log_probs_from_full_logits(policy, dict(batch, completion_mask=batch["attention_mask"]))
    logged = trainer.state.log_history[-1]
    assert float(loss) == pytest.approx(LN2, abs=1e-6)  # a new LoRA: policy == reference
    assert logged["eval_logps/chosen"] == pytest.approx(float(full[0]), rel=1e-5)
    assert logged["eval_logps/rejected"] == pytest.approx(float(full[1]), rel=1e-5)
    assert torch.allclose(ours, full, rtol=1e-5)
    assert not torch.allclose(with_prompt, full, rtol=1e-2)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    answer_at = int(batch["completion_mask"][0].nonzero()[0])
    changed["input_ids"][0, answer_at] = (batch["input_ids"][0, answer_at] + 1) % len(processor.tokenizer)
    with torch.no_grad():
        assert not torch.allclose(pair_log_probs(policy, changed)[0], ours[:1], rtol=1e-3)


# --- the two data shapes, and bad rows ---------------------------------------------------------------


def _conversational(table_row: dict) -> dict:
    """A table pair in TRL's conversational form (images beside message lists)."""
    return {
        "images": [table_row["image_path"]],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": table_row["prompt"]}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": table_row["chosen"]}]}],
        "rejected": [{"role": "assistant", "content": table_row["rejected"]}],
    }


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_trl_conversational_pairs_encode_as_the_table_does(one_pair, tiny_model_dir):
    processor, spec, splits, batch = one_pair
    table = splits.train.to_list()
    folder = Path(table[0]["__source__"]).parent
    path = _write_jsonl(folder / "pairs.jsonl", [_conversational(row) for row in table])
    data = DataArguments(dataset_name=path, val_split_ratio=0.0, system_prompt="Look closely.")
    conversational = build_preference_splits(data, spec.encoding, processor)
    assert conversational.preparers["chosen"].schema.kind == "messages"
    again = PreferenceCollator(processor, conversational.preparers)([conversational.train[0]])
    for key in ("input_ids", "completion_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(again[key], batch[key]), key


DPO = ["dpo", "--model_name_or_path", "{model}", "--output_dir", "{tmp}/out", "--use_cpu", "--max_steps", "1"]


def _fails(argv: list[str], capsys, code: int = 1) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == code
    return capsys.readouterr().err


def _dpo(tiny_model_dir, tmp_path, *flags: str) -> list[str]:
    values = {"model": tiny_model_dir("qwen2_vl"), "tmp": str(tmp_path)}
    return [a.format(**values) for a in DPO] + list(flags)


def test_a_bad_table_row_names_file_row_and_field(tiny_model_dir, one_pair, tmp_path, capsys):
    image = one_pair[2].train[0]["image_path"]
    folder = Path(one_pair[2].train[0]["__source__"]).parent
    path = folder / "bad.csv"
    path.write_text(f"image_path,question,chosen,rejected\n{image},What colour?,red,blue\n{image},What colour?,red,\n")
    err = _fails(_dpo(tiny_model_dir, tmp_path, "--dataset_name", str(path), "--val_split_ratio", "0"), capsys)
    assert f"{path}, row 1, field 'rejected': empty" in err and "Traceback" not in err


def test_on_bad_sample_skip_drops_the_pair(one_pair):
    processor, spec, splits, _ = one_pair
    image, folder = splits.train[0]["image_path"], Path(splits.train[0]["__source__"]).parent
    path = folder / "skip.csv"
    path.write_text(f"image_path,question,chosen,rejected\n{image},What colour?,,blue\n{image},What colour?,red,blue\n")
    data = DataArguments(dataset_name=str(path), val_split_ratio=0.0, on_bad_sample="skip")
    kept = build_preference_splits(data, spec.encoding, processor)
    assert [row["__index__"] for row in kept.train] == [1]
    assert "field 'chosen': empty" in kept.summary() and "1 bad samples skipped" in kept.summary()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"chosen": []}, "row 1, field 'chosen': must be a non-empty list of messages"),
        ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]}, "field 'prompt'"),
        ({"rejected": [{"role": "robot", "content": "x"}]}, "field 'rejected', message 0: role 'robot'"),
    ],
)
def test_a_bad_conversational_row_names_row_and_field(tiny_model_dir, one_pair, tmp_path, capsys, change, says):
    table = one_pair[2].train.to_list()[0]
    folder = Path(table["__source__"]).parent
    rows = [_conversational(table), {**_conversational(table), **change}]
    path = _write_jsonl(folder / f"bad_{len(str(change))}.jsonl", rows)
    err = _fails(_dpo(tiny_model_dir, tmp_path, "--dataset_name", path, "--val_split_ratio", "0"), capsys)
    assert f"{path}, {says}" in err or (path in err and says in err)


def test_a_missing_answer_column_is_named_with_the_flag(tiny_model_dir, pairs, tmp_path, capsys):
    flags = ("--dataset_name", str(pairs["train"]), "--rejected_column", "worse")
    err = _fails(_dpo(tiny_model_dir, tmp_path, *flags), capsys)
    assert "no rejected column 'worse'" in err and "--rejected_column" in err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--loss_type", "sigmoidd"), "--loss_type must be one of sigmoid"),
        (("--beta", "0"), "--beta must be greater than 0"),
        (("--packing", "--max_seq_length", "128"), "vlmtune dpo: --packing is not supported yet"),
        (
            ("--loss_type", "sigmoid", "sft", "--loss_weights", "1"),
            "--loss_weights has 1 weight(s) for 2 --loss_type loss(es) (sigmoid sft); give one weight per loss",
        ),
        (("--loss_type", "ipo", "--label_smoothing", "0.1"), "--label_smoothing is read only by the robust, exo_pair"),
        (("--loss_type", "exo_pair"), "--loss_type exo_pair needs --label_smoothing above 0"),
        (("--loss_type", "orpo"), "--loss_type orpo is not supported: TRL's ORPO"),
        (("--loss_type", "orpo"), "use --loss_type sigmoid sft (RPO"),
        (("--loss_type", "sigmoid", "kto"), "--loss_type kto is not supported: KTO is TRL's KTOTrainer"),
    ],
)
def test_bad_dpo_options_are_usage_errors(tiny_model_dir, pairs, tmp_path, capsys, flags, says):
    code, err = cli_error(_dpo(tiny_model_dir, tmp_path, "--dataset_name", str(pairs["train"]), *flags), capsys)
    assert code == 2 and says in err


@pytest.mark.parametrize("family", list(RECIPES))
def test_every_family_scores_only_the_answers_on_the_same_image_inputs(family, tiny_model_dir, pairs, tmp_path):
    """For each family: the trained tokens are the answer and its end of turn, never an image token; every
    per-image input the processor returns is the same for both sides; and TRL's DPOTrainer, fed these
    batches, starts at ln 2 with the chosen log-probabilities vlmtune computes at the labelled positions."""
    loaded = load_model(tiny_model_dir(family))
    data = DataArguments(dataset_name=str(pairs["validation"]), val_split_ratio=0.0, max_train_samples=2)
    splits = build_preference_splits(data, loaded.spec.encoding, loaded.processor)
    collator = PreferenceCollator(loaded.processor, splits.preparers)
    batch = collator(list(splits.train))
    tokenizer, facts = loaded.processor.tokenizer, loaded.spec.encoding
    ends = (*facts.turn_end, tokenizer.eos_token)
    mask = batch["completion_mask"].bool()
    for i, (row, side) in enumerate([(r, s) for s in ("chosen", "rejected") for r in splits.train]):
        text = tokenizer.decode(batch["input_ids"][i][mask[i]]).strip()
        assert any(text == f"{row[side]}{end}" for end in ends), (text, row[side])
    assert not torch.isin(
        batch["input_ids"][mask], torch.tensor(sorted(token_ids(loaded.processor, facts.image_tokens)))
    ).any()
    for key, value in batch.items():
        if key not in (*SEQUENCE_KEYS, "input_ids", "completion_mask"):
            assert torch.equal(*value.chunk(2)), key
    policy = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments(lora_dropout=0.0))
    config = dpo_config(VlmTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"), DpoArguments())
    trainer = VlmDpoTrainer(
        model=policy,
        args=config,
        train_dataset=splits.train,
        data_collator=collator,
        processing_class=loaded.processor,
        new_adapter=True,
    )
    policy.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(policy, dict(batch))
        trainer.log({})
        chosen, _ = pair_log_probs(policy, batch)
    logged = trainer.state.log_history[-1]
    expected = LN2
    if "moe" in family:  # TRL adds the router's load-balancing loss with the architecture's coefficient
        assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef > 0
        expected += trainer.router_aux_loss_coef * logged["eval_aux_loss"]
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert logged["eval_logps/chosen"] == pytest.approx(float(chosen.mean()), rel=1e-5)


def _pairs_file(tmp_path, name: str, rows: list[dict]) -> DataArguments:
    return DataArguments(dataset_name=str(write_rows(tmp_path / name, rows)), val_split_ratio=0.0)


def test_rlaif_v_rows_read_the_embedded_image_without_flags(tiny_model_dir, tmp_path):
    """RLAIF-V's own columns: the picture in `image` (datasets' {bytes, path} struct), beside an `image_path`
    that points into its authors' tree; the picture is read, and the rest stays row metadata."""
    image = {"bytes": png_bytes("red"), "path": None}
    rlaif = {"ds_name": "RLAIF-V", "image": image, "question": "What colour?", "chosen": "red", "rejected": "blue"}
    rlaif |= {"origin_dataset": "shapes", "origin_split": "train", "idx": "0", "image_path": "RLAIF-V/images/0.jpg"}
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    splits = build_preference_splits(_pairs_file(tmp_path, "rlaif.parquet", [rlaif]), spec.encoding, processor)
    assert "image column: image" in splits.describe()
    conversation = splits.preparers["chosen"].conversation(splits.train[0], 0)
    assert conversation.meta["ds_name"] == "RLAIF-V" and conversation.meta["image_path"] == "RLAIF-V/images/0.jpg"
    batch = PreferenceCollator(processor, splits.preparers)([splits.train[0]])
    assert batch["pixel_values"].shape[0] > 0 and batch["image_grid_thw"].shape[0] == 2  # the image, both sides


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_image_typed_in_a_text_prompt_is_where_the_image_goes(family, tiny_model_dir, tmp_path):
    """LLaVA-RLHF's pairs: `prompt` is text with `<image>` typed in it; it marks the image, as in ShareGPT rows
    (for LLaVA `<image>` is the image token itself: left in the text it would break the count)."""
    png(tmp_path / "a.png")
    rows = [{"image": "a.png", "prompt": "<image>\nWhat colour?", "chosen": "red", "rejected": "blue"}]
    processor, spec = load_processing(tiny_model_dir(family))
    splits = build_preference_splits(_pairs_file(tmp_path, "rlhf.jsonl", rows), spec.encoding, processor)
    for side in ("chosen", "rejected"):
        user = splits.preparers[side].conversation(splits.train[0], 0).messages[0]
        assert user["content"] == [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    rows[0]["prompt"] = "<image> and <image>: what colour?"
    with pytest.raises(DataError, match=r"rlhf2.jsonl, row 0, field 'prompt': 2 image placeholder\(s\) but 1 image"):
        build_preference_splits(_pairs_file(tmp_path, "rlhf2.jsonl", rows), spec.encoding, processor)


# --- the common behaviour of dpo, kto and grpo ----------------------------------------------------


@pytest.mark.parametrize("command", ["dpo", "kto", "grpo"])
def test_a_config_file_in_other_tools_names_runs_and_the_command_line_overrides_it(
    command, tiny_model_dir, pairs, shapes_data, tmp_path, caplog
):
    """`vlmtune dpo|kto|grpo run.yaml --beta 0.3`, the file written with Axolotl's and VizSage's names (as
    `vlmtune train` takes them): each foreign name is said once with ours, the command's own option in the file
    is overridden by the flag, and the resolved settings are saved with the result."""
    model = tiny_model_dir("qwen2_vl")
    data = str(shapes_data["train"] if command == "grpo" else pairs["train"])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"base_model: {model}\ntraining_data_path: {data}\nmicro_batch_size: 4\nlr: 0.001\nbeta: 0.2\n"
        "max_steps: 2\nmax_train_samples: 8\nval_split_ratio: 0\nuse_cpu: true\nreport_to: none\nsave_strategy: 'no'\n"
    )
    own = ["--num_generations", "2", "--max_completion_length", "4"] if command == "grpo" else []
    with caplog.at_level("WARNING"):
        main([command, str(config), "--beta", "0.3", *own, "--output_dir", str(tmp_path / "out")])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "`--lr` (VizSage) is `--learning_rate` in vlmtune" in warnings
    assert "`--base_model` (Axolotl) is `--model_name_or_path` in vlmtune" in warnings
    resolved = json.loads((tmp_path / "out" / "vlmtune_config.json").read_text())
    assert (resolved["model_name_or_path"], resolved["dataset_name"]) == (model, data)
    assert (resolved["per_device_train_batch_size"], resolved["learning_rate"], resolved["beta"]) == (4, 1e-3, 0.3)
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (tmp_path / "out" / "adapter_model.safetensors").is_file()


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("command", "arguments", "own"),
    [
        ("dpo", DpoArguments, {"loss_type": ["sigmoid", "sft"], "beta": 0.1}),
        ("kto", KtoArguments, {"loss_type": "kto", "desirable_weight": 1.0}),
        ("grpo", GrpoArguments, {"reward": ["exact_match", "format"], "reward_weights": [1.0, 0.2]}),
    ],
)
def test_the_shipped_example_config_parses_in_our_own_names(command, arguments, own, caplog):
    """`vlmtune dpo|kto|grpo examples/<command>.yaml` as the docs show it: every key is an option of the command
    (none translated from another tool), and the command's own options read as written."""
    with caplog.at_level("WARNING"):
        *_, training, parsed = parse_args([str(EXAMPLES / f"{command}.yaml")], (*TRAINING_ARGUMENTS, arguments))
    assert not [r for r in caplog.records if r.name == aliases.logger.name], "examples use vlmtune's own names"
    assert {name: getattr(parsed, name) for name in own} == own and training.output_dir


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("command", ["dpo", "kto", "grpo"])
def test_resumes_from_its_latest_checkpoint(command, tiny_model_dir, pairs, shapes_data, tmp_path):
    """Two steps with a checkpoint at each, then `--resume_from_checkpoint latest --max_steps 3`: one more step
    on top of the checkpoint's two, and no reference copy in the checkpoint (one adapter)."""
    if command == "grpo":
        run, own, data = run_grpo, GrpoArguments(**GRPO_CHEAPEST), str(shapes_data["train"])
    else:
        run, own, data = COMMANDS[command][0], COMMANDS[command][1](), str(pairs["train"])
    model = tiny_model_dir("qwen2_vl")
    args = dict(max_train_samples=8, per_device_train_batch_size=4, val_split_ratio=0.0, report_to="none")
    args.update(save_strategy="steps", save_steps=1, max_steps=2, logging_steps=1, eval_accuracy=False)
    run(*train_args(model, data, str(tmp_path), **args), own)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "checkpoint-2" / "ref").exists()
    counter = _CountSteps()
    again = train_args(model, data, str(tmp_path), **dict(args, max_steps=3, resume_from_checkpoint="latest"))
    result = run(*again, own, callbacks=[counter])
    steps = [entry["step"] for entry in result.trainer.state.log_history if "loss" in entry]
    assert counter.steps == 1 and steps == [1, 2, 3]


def _renamed_pairs(folder: Path, pairs_file: Path, n: int) -> Path:
    """The first `n` shapes pairs under other column names: picture, question_text, good, bad."""
    with open(pairs_file, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    renamed = [
        {"picture": str((pairs_file.parent / r["image_path"]).resolve()), "question_text": r["prompt"]}
        | {"good": r["chosen"], "bad": r["rejected"]}
        for r in rows
    ]
    return write_rows(folder / "renamed.csv", renamed)


@pytest.mark.parametrize("command", ["dpo", "kto"])
def test_renamed_columns_and_image_size_options_apply_as_for_train(command, tiny_model_dir, pairs, tmp_path):
    """`--image_column`, `--prompt_column`, `--chosen_column`, `--rejected_column` name the columns, and
    `--image_min_pixels` enlarges the images before the processor sees them (more image tokens), as in training."""
    path = _renamed_pairs(tmp_path, Path(pairs["train"]), 2)
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    image_id = processor.tokenizer.convert_tokens_to_ids(spec.encoding.image_token)

    def batch(**image_options):
        columns = dict(image_column="picture", prompt_column="question_text")
        data = DataArguments(dataset_name=str(path), val_split_ratio=0.0, **columns, **image_options)
        if command == "dpo":
            splits = build_preference_splits(data, spec.encoding, processor, "good", "bad")
            return splits.train[0], PreferenceCollator(processor, splits.preparers)([splits.train[0]])
        splits = build_kto_splits(
            data, spec.encoding, processor, KtoArguments(chosen_column="good", rejected_column="bad")
        )
        return splits.train[0], KtoCollator(processor, splits.preparer)([splits.train[0]])

    row, full = batch()
    answers = [
        processor.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(full["input_ids"], full["completion_mask"])
    ]
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))[row["__index__"]]
    expected = [table["good"], table["bad"]] if command == "dpo" else [table["good" if row["label"] else "bad"]]
    assert answers == [f"{answer}<|im_end|>" for answer in expected]
    assert "What" in processor.tokenizer.decode(full["input_ids"][0])  # the question_text column is the prompt
    _, large = batch(image_min_pixels=128 * 128)  # the 64x64 shapes enlarged: 4 times the image tokens
    assert (large["input_ids"][0] == image_id).sum() == 4 * (full["input_ids"][0] == image_id).sum()


def _saved_pairs(folder: Path) -> Path:
    """Pairs as a hub download saved with `save_to_disk`: an Image feature, named train and validation splits."""
    import datasets
    from PIL import Image

    text = datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "question": text, "chosen": text, "rejected": text})

    def split(colour: str, wrong: str, n: int) -> datasets.Dataset:
        rows = {"image": [Image.new("RGB", (64, 64), colour)] * n, "question": ["What colour?"] * n}
        return datasets.Dataset.from_dict(rows | {"chosen": [colour] * n, "rejected": [wrong] * n}, features=features)

    datasets.DatasetDict({"train": split("red", "blue", 3), "validation": split("blue", "red", 2)}).save_to_disk(
        str(folder)
    )
    return folder


@pytest.mark.parametrize("source", ["folder of split files", "save_to_disk folder"])
@pytest.mark.parametrize("command", ["dpo", "kto"])
def test_data_sources_other_than_one_file_load_as_for_train(command, source, tiny_model_dir, pairs, tmp_path):
    """A folder holding train/validation files (`write_preference_dataset`'s) and a `save_to_disk` folder with an
    Image feature: their train and validation splits are the training and held-out pairs, images read from them."""
    folder = Path(pairs["train"]).parent if source.startswith("folder") else _saved_pairs(tmp_path / "saved")
    sizes = (200, 40) if source.startswith("folder") else (3, 2)
    processor, spec = load_processing(tiny_model_dir("qwen2_vl"))
    data = DataArguments(dataset_name=str(folder))
    if command == "dpo":
        splits = build_preference_splits(data, spec.encoding, processor)
        batch = PreferenceCollator(processor, splits.preparers)([splits.eval[0]])
    else:  # each pair two rows
        splits = build_kto_splits(data, spec.encoding, processor, KtoArguments())
        batch, sizes = KtoCollator(processor, splits.preparer)([splits.eval[0]]), tuple(2 * n for n in sizes)
    assert (len(splits.train), len(splits.eval)) == sizes and batch["pixel_values"].shape[0] > 0
