"""Packing (`--packing`, `--padding_free`), the data side: the plan, the packed batches, the refusals, and a
packed run that learns. (That a packed batch's loss, gradients and logits equal the padded ones, per
family, is tests/test_packing_parity.py.)"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from tests.helpers import train_args
from vlmtune.cli import main
from vlmtune.config import DataArguments, VlmTrainingArguments
from vlmtune.data.collate import VlmCollator
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.data.pack import PADDING_FREE, Pack, PackedRows, packed_train_rows, padding_free_rows, plan_packs
from vlmtune.data.prepare import LENGTH
from vlmtune.data.splits import build_splits
from vlmtune.models.loading import load_processing
from vlmtune.train.run import run_training, training_rows

USAGE = 2


def mixed_bounds(n: int, seed: int = 0) -> list[int]:
    """Token bounds of a chart/document QA mix: many short samples, some long."""
    rng = random.Random(seed)
    return [rng.choice([rng.randint(40, 200), rng.randint(300, 1500)]) for _ in range(n)]


@pytest.mark.parametrize("strategy", ["best_fit", "greedy"])
def test_every_sample_is_in_exactly_one_pack_within_the_capacity(strategy):
    bounds = mixed_bounds(2000)
    packs = plan_packs(bounds, 2048, strategy, seed=1)
    assert sorted(i for pack in packs for i in pack) == list(range(len(bounds)))
    assert max(sum(bounds[i] for i in pack) for pack in packs) <= 2048
    assert all(pack == sorted(pack) for pack in packs)  # data order inside a pack


def test_greedy_keeps_the_data_order():
    packs = plan_packs(mixed_bounds(500), 2048, "greedy")
    assert [i for pack in packs for i in pack] == list(range(500))


def test_best_fit_fills_rows_better_than_greedy_on_mixed_lengths():
    bounds = mixed_bounds(2000)
    best, greedy = plan_packs(bounds, 2048, "best_fit"), plan_packs(bounds, 2048, "greedy")
    assert len(best) < 0.9 * len(greedy)
    assert sum(bounds) / (len(best) * 2048) > 0.95


def test_the_plan_depends_only_on_the_data_and_the_seed():
    """A resumed run rebuilds the same packs; another seed shuffles the same packs differently."""
    bounds = mixed_bounds(1000)
    first, again, other = (plan_packs(bounds, 2048, "best_fit", seed=s) for s in (3, 3, 4))
    assert first == again
    assert first != other and sorted(first) == sorted(other)


def test_a_sample_longer_than_a_row_is_refused_not_split():
    with pytest.raises(ValueError, match="row 1 can take 3000 tokens, more than the 2048"):
        plan_packs([100, 3000], 2048)


@pytest.fixture(scope="module")
def mixed_data(shapes_data, tmp_path_factory) -> dict[str, Path]:
    """The shapes data with prompts of 0 to 12 filler sentences: samples of mixed lengths."""
    folder, rng, files = tmp_path_factory.mktemp("mixed"), random.Random(0), {}
    for split, path in shapes_data.items():
        with open(path) as f:
            rows = list(csv.DictReader(f))
        files[split] = folder / f"{split}.csv"
        with open(files[split], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                row["image_path"] = str(Path(path).parent / row["image_path"])
                row["prompt"] = "Look at the picture carefully. " * rng.randint(0, 12) + row["prompt"]
                writer.writerow(row)
    return files


def checked_rows(model_dir: str, data: Path, capacity: int, n: int = 24):
    processor, spec = load_processing(model_dir)
    args = DataArguments(dataset_name=str(data), max_seq_length=capacity, val_split_ratio=0, max_train_samples=n)
    splits = build_splits(args, spec.encoding, processor=processor)
    return splits.train, VlmCollator(processor, splits.preparer, pack_capacity=capacity), spec


@pytest.mark.parametrize("family", ["llava_siglip", "idefics3"])
def test_a_packed_row_holds_whole_samples_with_their_own_labels_and_images(family, tiny_model_dir, mixed_data):
    rows, collate, spec = checked_rows(tiny_model_dir(family), mixed_data["train"], capacity=512)
    packed, plan = packed_train_rows(rows, 512, "best_fit", seed=0)
    assert len(packed) < len(rows) and isinstance(packed[0], Pack)
    items = [packed[i] for i in range(2)]
    batch = collate(items)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    image_id = collate.processor.tokenizer.convert_tokens_to_ids(spec.image_token)
    images = 0
    for r, pack in enumerate(items):
        start = 0
        for raw in pack.rows:
            alone = collate.encode(raw)  # the sample in its own row, as without packing
            assert alone.length <= raw[LENGTH]  # the bound the plan used (SigLIP LLaVA's was once 3 short)
            end = start + alone.length
            assert batch["input_ids"][r, start:end].tolist() == alone.input_ids  # whole, nothing cut
            assert batch["position_ids"][r, start:end].tolist() == list(range(alone.length))
            labels = batch["labels"][r, start:end].tolist()
            assert labels[0] == IGNORE_INDEX  # never predicted from the previous sample
            assert labels[1:] == alone.labels[1:]
            assert alone.input_ids.count(image_id) > 0
            images += alone.inputs["pixel_values"].shape[0]
            start = end
        assert start <= 512
        assert (batch["labels"][r, start:] == IGNORE_INDEX).all()  # the padding tail trains nothing
    assert batch["pixel_values"].shape[0] == images  # every sample's image inputs, none dropped


def test_a_padding_free_batch_is_one_row_and_evaluation_rows_stay_padded(tiny_model_dir, mixed_data):
    rows, collate, _ = checked_rows(tiny_model_dir("llava_siglip"), mixed_data["train"], capacity=512, n=4)
    marked = padding_free_rows(rows)
    batch = collate([marked[i] for i in range(4)])
    lengths = [collate.encode(rows[i]).length for i in range(4)]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert (batch["position_ids"][0] == 0).sum() == 4  # four samples, no padding
    padded = collate([rows[i] for i in range(4)])  # unmarked rows: evaluation
    assert padded["input_ids"].shape == (4, max(lengths)) and "attention_mask" in padded


def test_a_pack_longer_than_planned_stops_rather_than_cutting(tiny_model_dir, mixed_data):
    """The bounds never undercount (tests/test_data_checks.py); if they did, nothing is silently cut."""
    rows, collate, _ = checked_rows(tiny_model_dir("llava_siglip"), mixed_data["train"], capacity=512, n=2)
    collate.pack_capacity = 60
    with pytest.raises(RuntimeError, match=r"encodes to \d+ tokens, more than the 60 .*vlmtune bug"):
        collate([Pack((rows[0], rows[1]))])


def test_length_grouped_sampling_gives_way_to_packing(tiny_model_dir, mixed_data, tmp_path, caplog):
    rows, _, _ = checked_rows(tiny_model_dir("llava_siglip"), mixed_data["train"], capacity=512, n=8)
    data = DataArguments(dataset_name="x", packing=True, max_seq_length=512)
    training = VlmTrainingArguments(output_dir=str(tmp_path), train_sampling_strategy="group_by_length", seed=5)
    packed, plan = training_rows(rows, data, training)
    assert isinstance(packed, PackedRows) and plan.packs == plan_packs(rows[LENGTH], 512, "best_fit", 5)
    assert training.train_sampling_strategy == "random"
    assert "--train_sampling_strategy group_by_length is ignored with --packing" in caplog.text


def test_packing_with_padding_free_is_packing(tiny_model_dir, mixed_data, tmp_path):
    """--packing's rows are already padding-free: both flags give packed rows (TRL's packing implies it)."""
    rows, _, _ = checked_rows(tiny_model_dir("llava_siglip"), mixed_data["train"], capacity=512, n=8)
    data = DataArguments(dataset_name="x", packing=True, padding_free=True, max_seq_length=512)
    packed, plan = training_rows(rows, data, VlmTrainingArguments(output_dir=str(tmp_path)))
    assert isinstance(packed, PackedRows) and plan is not None


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == USAGE, err
    assert "Traceback" not in err
    return err


def test_packing_without_a_row_capacity_is_refused(shapes_data, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", "m", "--dataset_name", str(shapes_data["train"])]
    err = refused([*argv, "--output_dir", str(tmp_path / "o"), "--packing", "true"], capsys)
    assert "--packing needs --max_seq_length" in err and "most tokens a packed row holds" in err


def test_packing_a_stream_is_refused_and_padding_free_suggested(shapes_data, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", "m", "--dataset_name", str(shapes_data["train"]), "--max_steps", "2"]
    argv += ["--output_dir", str(tmp_path / "o"), "--packing", "--max_seq_length", "512", "--streaming"]
    err = refused(argv, capsys)
    assert "--packing cannot plan rows over a stream" in err and "--padding_free" in err


def test_packing_keeps_the_raw_columns(shapes_data, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", "m", "--dataset_name", str(shapes_data["train"]), "--padding_free"]
    err = refused([*argv, "--output_dir", str(tmp_path), "--remove_unused_columns", "true"], capsys)
    assert "--remove_unused_columns must stay false" in err


def test_an_unknown_packing_strategy_is_refused(shapes_data, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", "m", "--dataset_name", str(shapes_data["train"])]
    argv += ["--output_dir", str(tmp_path), "--packing", "--max_seq_length", "512", "--packing_strategy", "bfd"]
    assert "--packing_strategy must be one of best_fit, greedy, got 'bfd'" in refused(argv, capsys)


def test_a_family_that_cannot_be_packed_is_refused_before_loading(tiny_model_dir, shapes_data, tmp_path, capsys):
    model = tiny_model_dir("mllama")
    argv = ["train", "--model_name_or_path", model, "--dataset_name", str(shapes_data["train"])]
    err = refused([*argv, "--output_dir", str(tmp_path / "o"), "--padding_free", "true"], capsys)
    assert "--padding_free: mllama models cannot be trained on packed samples" in err and "cross-attention" in err
    assert "Train without --padding_free." in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_packed_run_learns_from_mixed_length_samples(tiny_model_dir, mixed_data, tmp_path, capsys):
    """LLaVA (SigLIP tower), positions restarting per sample: several samples per row, each learns its
    own answer from its own image."""
    args = train_args(
        tiny_model_dir("llava_siglip"),
        str(mixed_data["train"]),
        str(tmp_path / "packed"),
        str(mixed_data["validation"]),
        packing=True,
        max_seq_length=512,
        max_steps=200,
        per_device_train_batch_size=2,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        max_new_tokens=8,
    )
    result = run_training(*args)
    out = capsys.readouterr().out
    assert "Packing: 300 samples -> " in out and "counts packed rows" in out
    assert len(result.trainer.train_dataset) < 100  # about 3.4 samples per packed row
    # 6 colours: chance is 17%, and a model that ignores the image (or another sample's) cannot beat it.
    assert result.metrics["eval_exact_match"] >= 0.6, result.metrics


def test_padding_free_reads_a_stream_and_joins_each_batch(tiny_model_dir, shapes_data, tmp_path):
    args = train_args(
        tiny_model_dir("llava_siglip"),
        str(shapes_data["train"]),
        str(tmp_path / "stream"),
        streaming=True,
        padding_free=True,
        max_steps=2,
        val_split_ratio=0.0,
        eval_accuracy=False,
    )
    trainer = run_training(*args).trainer
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) == 4  # 4 samples, 1 row
    assert PADDING_FREE not in batch


def test_foreign_packing_names_become_packing():
    from vlmtune.config import parse_args

    for foreign in ("--sample_packing", "--neat_packing"):
        _, data, _, _ = parse_args(["--output_dir", "o", foreign, "true", "--max_seq_length", "1024"])
        assert data.packing


def test_the_documented_family_support_is_the_registrys():
    from tests.helpers import family_spec
    from vlmtune.models.registry import OVERRIDES

    page = (Path(__file__).parents[1] / "docs" / "packing.md").read_text()
    for name in OVERRIDES:
        spec = family_spec(name)
        row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.startswith(f"| `{name}` | {'no' if spec.packing_refusal else 'yes'} |"), row
        if spec.packing_positions == "mrope":
            assert "multimodal rotary positions" in row, row


def test_a_resumed_packed_run_trains_on_the_same_packs(tiny_model_dir, mixed_data, tmp_path):
    """The plan is rebuilt from the data and the seed: resuming halfway ends on the uninterrupted weights."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    settings = dict(
        packing=True, max_seq_length=512, max_steps=6, per_device_train_batch_size=1, max_train_samples=24, seed=7,
        val_split_ratio=0.0, eval_accuracy=False, save_strategy="steps", save_steps=3,
    )  # fmt: skip
    run_training(*train_args(tiny_model_dir("llava_siglip"), str(mixed_data["train"]), str(out), **settings))
    straight = load_file(out / "adapter_model.safetensors")
    resume = str(out / "checkpoint-3")
    model, data = tiny_model_dir("llava_siglip"), str(mixed_data["train"])
    run_training(*train_args(model, data, str(out), resume_from_checkpoint=resume, **settings))
    resumed = load_file(out / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
