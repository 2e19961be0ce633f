"""vlmtune train vs the TRL recipe users copy (seed 004), side by side: speed and peak memory.

The baseline reimplements the seed-004 notebook faithfully with what is installed: TRL `SFTTrainer`, its
collator (chat template + processor, labels = input ids with padding and image tokens masked, so system
and user text is trained too), LoRA r=8 on q_proj/v_proj (alpha 16, dropout 0.05), and the notebook's
`SFTConfig` (gradient checkpointing, non-reentrant; fused AdamW; constant 2e-4; max_grad_norm 0.3;
warmup 3%; everything else SFTConfig's defaults). vlmtune runs `vlmtune train`'s own path
(argument parsing, data loading, `VlmTrainer`, collator) with its defaults. Both get the same model,
rows, images, batch size and number of steps.

Deviations from the notebook, the same for both sides: no 4-bit quantisation, no evaluation, saving or
hub upload, no gradient accumulation (the notebook's 8 would multiply every step's time by 8 for both);
on CPU fp32 instead of bf16 (on GPU: bf16 as the notebook).

Each measured run is a fresh subprocess (its own peak RSS, plus the largest of its finished children's,
such as data-loader workers), the two sides alternate (ABBA order), the first steps of each run are a
warm-up that is not timed, and the medians over the repeats are reported. vlmtune runs with all its
defaults, its allocator setting included (`--malloc_mmap_threshold_mb`, docs/performance.md); pass
`--vlmtune_args --malloc_mmap_threshold_mb 0` to measure without it.

    python bench/compare.py --device cpu                 # reduced Qwen2-VL, real vocabulary, 448 px, batch 4
    python bench/compare.py --device cuda --model 2b     # real Qwen2-VL-2B configuration, random weights
    python bench/compare.py --device cuda --model 7b --batch_sizes 4 8 16

The last line reads `speedup=<x> memory=<y>`: vlmtune's samples/s and peak memory over the recipe's.
The CUDA mode has not been run yet (no GPU was available when it was written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEM = (
    "You are a Vision Language Model specialized in interpreting visual data from chart images. Your task is to "
    "analyze the provided chart image and respond to queries with concise answers, usually a single word, number, "
    "or short phrase. The charts include a variety of types (e.g., line charts, bar charts) and contain colors, "
    "labels, and text. Focus on delivering accurate, succinct answers based on the visual information. Avoid "
    "additional explanation unless absolutely necessary."
)
QUESTIONS = [
    ("What is the value of the tallest bar?", "{top}"),
    ("How many bars are in the chart?", "{n}"),
    ("Is the first bar taller than the last one?", "{cmp}"),
    ("What is the difference between the tallest and the shortest bar?", "{diff}"),
]
# Peak dense bf16 tensor FLOP/s, for model FLOPs utilisation.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


# --------------------------------------------------------------------------------------------------- setup
def qwen2_vl_config(size: str, tokenizer_ids: dict):
    """Qwen2-VL configuration: `reduced` (CPU), or the real `2b` / `7b` shapes (random weights)."""
    from transformers import Qwen2VLConfig

    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    vision = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2)
    if size == "2b":
        text = dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    elif size == "7b":
        text = dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        )
    else:  # reduced: a quarter of 2B's widths, few layers; real head sizes, vocabulary and image path
        text = dict(
            hidden_size=384,
            intermediate_size=2240,
            num_hidden_layers=4,
            num_attention_heads=3,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
        vision.update(depth=4, embed_dim=320, num_heads=4)
    vision["hidden_size"] = text["hidden_size"]
    tie = text.pop("tie_word_embeddings")
    text_config = dict(
        text,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_parameters=rope,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        eos_token_id=tokenizer_ids["eos_token_id"],
        pad_token_id=tokenizer_ids["pad_token_id"],
        bos_token_id=None,
    )
    ids = {k: v for k, v in tokenizer_ids.items() if k.endswith("token_id") and k not in text_config}
    return Qwen2VLConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=tie, **ids)


def build_model(size: str, folder: Path, dtype: str) -> None:
    """Write a random Qwen2-VL of `size` with a Qwen2-VL processor set to the real checkpoints' pixel range."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from vlmtune.models.tiny import RECIPES
    from vlmtune.models.tiny.common import token_ids

    recipe = RECIPES["qwen2_vl"]
    processor = recipe.processor()
    tok = processor.tokenizer
    ids = token_ids(tok, recipe.ids)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    ids.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = qwen2_vl_config(size, ids)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def chart(rng: random.Random, size: int):
    """A bar chart image and the numbers it shows."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    bars = [rng.randint(5, 95) for _ in range(rng.randint(3, 7))]
    width = size // (len(bars) + 1)
    for i, value in enumerate(bars):
        x = (i + 0.5) * width
        colour = tuple(rng.randint(0, 200) for _ in range(3))
        draw.rectangle((x, size - 10 - value * (size - 40) / 100, x + width * 0.7, size - 10), fill=colour)
        draw.text((x, size - 25 - value * (size - 40) / 100), str(value), fill=(0, 0, 0))
    return image, bars


def write_data(folder: Path, n: int, image_size: int) -> Path:
    """`n` chart-QA rows in OpenAI-style messages (system, user with image + question, assistant) as JSONL."""
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            image, bars = chart(rng, image_size)
            image.save(folder / "images" / f"{i}.png")
            question, template = QUESTIONS[i % len(QUESTIONS)]
            answer = template.format(
                top=max(bars), n=len(bars), cmp="Yes" if bars[0] > bars[-1] else "No", diff=max(bars) - min(bars)
            )
            messages = [
                {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
            f.write(json.dumps({"messages": messages, "images": [f"images/{i}.png"]}) + "\n")
    return folder / "train.jsonl"


# --------------------------------------------------------------------------------------------------- workers
def rss_bytes() -> int:
    """This process's current resident memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def make_timer(warmup: int, steps: int):
    """A callback timing the steps after `warmup` and noting memory when training starts."""
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        start = end = None
        rss_at_start = cuda_at_start = 0

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_at_start = rss_bytes()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                self.cuda_at_start = torch.cuda.memory_allocated()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self._sync()
                self.start = time.perf_counter()
            elif state.global_step == warmup + steps:
                self._sync()
                self.end = time.perf_counter()

    return Timer()


def recipe_images(example: list[dict]) -> list:
    """`qwen_vl_utils.process_vision_info(example)[0]`: the images of a conversation, in order (charts here
    are 448 px, a multiple of 28, which process_vision_info leaves unresized)."""
    return [part["image"] for message in example for part in message["content"] if part["type"] == "image"]


def recipe_rows(data_file: Path) -> list[list[dict]]:
    """The rows as the notebook's `format_data` returns them: messages with the PIL image inline."""
    from PIL import Image

    rows = []
    for line in data_file.read_text().splitlines():
        row = json.loads(line)
        messages = row["messages"]
        messages[1]["content"][0] = {"type": "image", "image": Image.open(data_file.parent / row["images"][0])}
        rows.append(messages)
    return rows


def recipe_dataset(data_file: Path):
    """TRL 1.16 takes a `datasets.Dataset`, not the notebook's list: one `messages` column holding the
    notebook's conversations, images inline (kept as Python objects by a formatting transform)."""
    from datasets import Dataset

    rows = recipe_rows(data_file)
    dataset = Dataset.from_dict({"row": list(range(len(rows)))})
    return dataset.with_transform(lambda batch: {"messages": [rows[i] for i in batch["row"]]})


def recipe_collator(processor):
    """The notebook's `collate_fn`."""
    image_tokens = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")]
    image_tokens.append(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))  # 151652, 151653, 151655

    def collate_fn(examples):
        examples = [example["messages"] if isinstance(example, dict) else example for example in examples]
        texts = [processor.apply_chat_template(example, tokenize=False) for example in examples]
        image_inputs = [recipe_images(example) for example in examples]
        batch = processor(text=texts, images=image_inputs, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[labels == processor.tokenizer.pad_token_id] = -100
        for image_token_id in image_tokens:
            labels[labels == image_token_id] = -100
        batch["labels"] = labels
        return batch

    return collate_fn


def run_recipe(args, timer, out_dir: str) -> None:
    import torch
    from peft import LoraConfig
    from transformers import Qwen2VLForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    from vlmtune.models.processors import load_processor

    cuda = args.device == "cuda"
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        args.model_dir, dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None
    )
    processor = load_processor(args.model_dir)
    peft_config = LoraConfig(
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        r=args.lora_r,
        bias="none",
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    training_args = SFTConfig(
        output_dir=out_dir,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        gradient_checkpointing=True,
        optim="adamw_torch_fused",
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        bf16=cuda,
        tf32=cuda or None,
        max_grad_norm=0.3,
        warmup_steps=0.03,  # the notebook's warmup_ratio, renamed in transformers 5
        report_to="none",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=not cuda,
    )
    training_args.remove_unused_columns = False
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=recipe_dataset(Path(args.data_file)),
        data_collator=recipe_collator(processor),
        peft_config=peft_config,
        processing_class=processor.tokenizer,
        callbacks=[timer],
    )
    trainer.train()


def run_vlmtune(args, timer, out_dir: str) -> None:
    from vlmtune.config import parse_args
    from vlmtune.train.run import run_training

    argv = [
        "--model_name_or_path",
        args.model_dir,
        "--dataset_name",
        args.data_file,
        "--dataset_text_field",
        "messages",
        "--dataset_image_field",
        "images",
        "--output_dir",
        out_dir,
        "--max_steps",
        str(args.warmup + args.steps),
        "--per_device_train_batch_size",
        str(args.batch),
        "--val_split_ratio",
        "0",
        "--eval_accuracy",
        "false",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--logging_steps",
        "10",
        "--lora_r",
        str(args.lora_r),
    ]
    argv += ["--bf16", "true"] if args.device == "cuda" else ["--use_cpu", "true"]
    run_training(*parse_args(argv + args.vlmtune_args), callbacks=[timer])


def worker(args) -> None:
    """One measured run; prints a JSON line with its timing and memory."""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    timer = make_timer(args.warmup, args.steps)
    with tempfile.TemporaryDirectory() as out_dir:
        (run_recipe if args.worker == "recipe" else run_vlmtune)(args, timer, out_dir)
    result = {
        "seconds": timer.end - timer.start,
        # The process's own peak plus the largest peak of its finished children (data-loader workers; on
        # CPU neither side starts any by default): the same bound of the process tree's peak for both.
        "peak_rss": sum(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        * 1024,
        "rss_at_start": timer.rss_at_start,
        "cuda_at_start": timer.cuda_at_start,
    }
    if torch.cuda.is_available():
        result["peak_cuda"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------- driver
def tokens_per_sample(model_dir: str, data_file: Path, n: int) -> dict[str, dict]:
    """Mean tokens and trained tokens (labels scored after the shift) per sample, for each collator."""
    from datasets import load_dataset

    from vlmtune.data.collate import VlmCollator
    from vlmtune.data.prepare import Preparer
    from vlmtune.data.schema import detect_schema
    from vlmtune.models.processors import load_processor
    from vlmtune.models.registry import get_family

    processor = load_processor(model_dir)
    rows = [dict(r, __index__=i) for i, r in enumerate(load_dataset("json", data_files=str(data_file))["train"])][:n]
    schema = detect_schema(["messages", "images"], source=str(data_file))
    preparer = Preparer(schema, get_family("qwen2_vl").encoding)
    preparer.images.folders[str(data_file)] = data_file.parent
    for row in rows:
        row["__source__"] = str(data_file)
    out = {}
    for name, collate, batch_rows in (
        ("recipe", recipe_collator(processor), recipe_rows(data_file)[:n]),
        ("vlmtune", VlmCollator(processor, preparer), rows),
    ):
        batch = collate(batch_rows)
        out[name] = {
            "tokens": float(batch["attention_mask"].sum()) / n,
            "trained": float((batch["labels"][:, 1:] != -100).sum()) / n,
        }
    return out


def measure(args, side: str, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--model_dir",
        args.model_dir,
        "--data_file",
        args.data_file,
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--lora_r",
        str(args.lora_r),
        "--threads",
        str(args.threads),
    ]
    if extra:
        cmd += ["--vlmtune_args", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        return {"error": f"{side} failed (exit {proc.returncode}):\n{tail}"}
    return json.loads(lines[-1][len("RESULT ") :])


def flops_per_token(model_dir: str) -> float:
    """Training FLOPs per token by the usual 6·N convention (N: parameters, input embedding excluded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).text_config
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = h * (2 * h + 2 * kv) + 3 * h * inter
    return 6.0 * (layers * per_layer + h * config.vocab_size)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(args, runs: dict[str, list[dict]], tokens: dict, batch: int) -> tuple[float, float]:
    memory_key, start_key = ("peak_cuda", "cuda_at_start") if args.device == "cuda" else ("peak_rss", "rss_at_start")
    rows = {}
    for side in ("recipe", "vlmtune"):
        seconds = median_of(runs[side], "seconds")
        samples = batch * args.steps / seconds
        rows[side] = dict(
            samples=samples,
            trained=samples * tokens[side]["trained"],
            memory=median_of(runs[side], memory_key),
            growth=median_of(runs[side], memory_key) - median_of(runs[side], start_key),
            step=seconds / args.steps,
        )
    print(f"\n{'':<10}{'s/step':>9}{'samples/s':>11}{'trained tok/s':>15}{'peak memory':>14}{'peak-start':>12}")
    for side, r in rows.items():
        print(
            f"{side:<10}{r['step']:>9.2f}{r['samples']:>11.2f}{r['trained']:>15.1f}"
            f"{r['memory'] / 2**20:>11.0f} MiB{r['growth'] / 2**20:>8.0f} MiB"
        )
    speedup = rows["vlmtune"]["samples"] / rows["recipe"]["samples"]
    memory = rows["vlmtune"]["memory"] / rows["recipe"]["memory"]
    print(
        f"per run (s): recipe {[round(r['seconds'], 2) for r in runs['recipe']]}, "
        f"vlmtune {[round(r['seconds'], 2) for r in runs['vlmtune']]}"
    )
    print(
        f"trained tokens per sample: recipe {tokens['recipe']['trained']:.0f} (system and user text too), "
        f"vlmtune {tokens['vlmtune']['trained']:.0f} (answers); tokens per sample {tokens['vlmtune']['tokens']:.0f}"
    )
    if args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        if peak:
            per_token = flops_per_token(args.model_dir)
            for side, r in rows.items():
                mfu = r["samples"] * tokens[side]["tokens"] * per_token / peak
                print(f"MFU {side}: {100 * mfu:.1f}% (6·N·tokens, {name}, {peak / 1e12:.0f} TFLOP/s bf16 peak)")
    return speedup, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--model", choices=("reduced", "2b", "7b"), default=None, help="default: reduced on CPU, 2b on CUDA"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--batch_sizes",
        type=int,
        nargs="*",
        default=None,
        help="CUDA: measure each; the largest both fit is the headline",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (alternating)")
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument(
        "--lora_r", type=int, default=None, help="LoRA rank for both (default: 8 on CPU as the recipe, 16 on CUDA)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--vlmtune_args", nargs=argparse.REMAINDER, default=[], help="extra `vlmtune train` flags (ablations)"
    )
    parser.add_argument("--workdir", default=None, help="keep the model and data here (default: a temporary folder)")
    # internal: one measured run
    parser.add_argument("--worker", choices=("recipe", "vlmtune"), help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--data_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lora_r is None:
        args.lora_r = 16 if args.device == "cuda" else 8
    if args.worker:
        return worker(args)

    import torch
    import transformers
    import trl

    size = args.model or ("2b" if args.device == "cuda" else "reduced")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model_dir = work / f"qwen2_vl_{size}"
        if not (model_dir / "config.json").exists():
            build_model(size, model_dir, "bfloat16" if args.device == "cuda" else "float32")
        batch_sizes = args.batch_sizes or [args.batch]
        data_file = work / "data" / "train.jsonl"
        n_rows = max(batch_sizes) * (args.warmup + args.steps)
        if not data_file.exists() or sum(1 for _ in open(data_file)) < n_rows:
            write_data(work / "data", n_rows, args.image_size)
        args.model_dir, args.data_file = str(model_dir), str(data_file)
        tokens = tokens_per_sample(args.model_dir, data_file, 8)

        device = (
            torch.cuda.get_device_name()
            if args.device == "cuda"
            else f"{platform.machine()} CPU, {args.threads} threads"
        )
        print(
            f"bench/compare.py: Qwen2-VL {size} (vocabulary 151,936), {args.image_size} px images, "
            f"LoRA r={args.lora_r}, "
            f"{args.steps} timed steps after {args.warmup} warm-up, {args.repeats} runs per side; {device}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
        )
        result = None
        for batch in batch_sizes:
            args.batch = batch
            runs: dict[str, list[dict]] = {"recipe": [], "vlmtune": []}
            for r in range(args.repeats):
                order = ("recipe", "vlmtune") if r % 2 == 0 else ("vlmtune", "recipe")
                for side in order:
                    outcome = measure(args, side, args.vlmtune_args)
                    if "error" in outcome:
                        print(outcome["error"])
                        break
                    runs[side].append(outcome)
                    print(f"batch {batch} run {r + 1} {side}: {outcome['seconds'] / args.steps:.2f} s/step", flush=True)
                else:
                    continue
                break
            if not (runs["recipe"] and runs["vlmtune"]) or len(runs["recipe"]) != len(runs["vlmtune"]):
                print(f"batch {batch}: does not fit for both; stopping here")
                break
            print(f"\nbatch {batch}:")
            result = report(args, runs, tokens, batch)
        if result is None:
            sys.exit("no batch size ran for both sides")
        print(f"speedup={result[0]:.2f} memory={result[1]:.2f}")


if __name__ == "__main__":
    main()
