"""Other tools' option names, translated to vlmtune's before parsing (one table, data only).

Users arrive with commands and config files written for the five systems in the seed documents: a Gaudi
`run_lora_vlm.py` script, fms-hf-tuning's JSON config, an Axolotl/mixtrain workflow, VizSage's YAML and the
TRL/PEFT Qwen2-VL recipe. Each foreign name here maps to ours, with a value conversion where the meaning
differs; names that need no setting in vlmtune are accepted and explained. Config files are turned into
`--key value` tokens first, so one translation serves flags and files alike. Each foreign name is warned
about once per run, so the user learns our name; `ALIAS_NAMES` lets the argument checker offer them in
did-you-mean hints, and `help_epilog()` lists them in `--help`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import UsageError

logger = logging.getLogger(__name__)

Tokens = list[str]
# A rule turns the foreign flag's values into our tokens; `known` is the set of flags the command takes.
Rule = Callable[[list[str], set[str]], Tokens]

TRUE = ("true", "1", "yes", "y", "on")


def _truthy(values: list[str]) -> bool:
    """A boolean flag's value: bare (`--use_habana`) means true, as argparse's own boolean flags do."""
    return not values or values[0].strip().lower() in TRUE


def use_habana(values: list[str], known: set[str]) -> Tokens:
    """Gaudi is used when accelerate finds it; otherwise say which device runs instead."""
    from ..compat import accelerator

    device = accelerator()
    if _truthy(values) and device != "hpu":
        print(f"vlmtune: --use_habana: no Gaudi HPU here (habana_frameworks not found): running on {device or 'cpu'}.")
    return []


def rename(ours: str) -> Rule:
    return lambda values, known: [f"--{ours}", *values]


def ignore(values: list[str], known: set[str]) -> Tokens:
    return []


def flag_if_true(*tokens_if_true: str, otherwise: tuple[str, ...] = ()) -> Rule:
    return lambda values, known: list(tokens_if_true if _truthy(values) else otherwise)


def first_known(*candidates: tuple[str, ...], fallback: Tokens | None = None) -> Rule:
    """The first candidate whose flag this command has (train and eval name some options differently)."""

    def rule(values: list[str], known: set[str]) -> Tokens:
        for tokens in candidates:
            if tokens[0].lstrip("-") in known:
                return list(tokens)
        return list(fallback or [])

    return rule


def choice(mapping: dict[str, Tokens], what: str) -> Rule:
    """Map the value through `mapping`; a value it lacks is a usage error that lists the accepted ones."""

    def rule(values: list[str], known: set[str]) -> Tokens:
        value = (values[0] if values else "").strip().lower()
        if value not in mapping:
            raise UsageError(f"--{what} {value!r} has no vlmtune equivalent; accepted: {', '.join(mapping)}")
        return list(mapping[value])

    return rule


def torch_dtype(values: list[str], known: set[str]) -> Tokens:
    return choice(
        {"bfloat16": ["--bf16", "true"], "float16": ["--fp16", "true"], "float32": [], "auto": []}, "torch_dtype"
    )([v.removeprefix("torch.") for v in values], known)


def use_text_normalization(values: list[str], known: set[str]) -> Tokens:
    metric = "exact_match" if _truthy(values) else "exact_match_raw"
    if "metrics" in known:  # vlmtune eval
        return ["--metrics", metric]
    return [] if metric == "exact_match" else ["--eval_metrics", metric]


def report_to_wandb(values: list[str], known: set[str]) -> Tokens:
    return ["--report_to", "wandb"] if _truthy(values) else ["--report_to", "none"]


def wandb_project(values: list[str], known: set[str]) -> Tokens:
    """W&B reads its project from the environment; an empty project (the seed's default) means no W&B."""
    if not values or not values[0].strip():
        return []
    os.environ.setdefault("WANDB_PROJECT", values[0])
    return ["--report_to", "wandb"]


def gradient_checkpointing(values: list[str], known: set[str]) -> Tokens:
    """Unsloth's `"unsloth"` (its offloading variant) becomes plain checkpointing, non-reentrant."""
    on = not values or values[0] == "unsloth" or _truthy(values)
    return ["--gradient_checkpointing", "true" if on else "false"]


def accelerate_launch_args(values: list[str], known: set[str]) -> Tokens:
    """fms-hf-tuning's FSDP layer class becomes `--fsdp_config`; launcher options belong to the launcher."""
    try:
        options = json.loads(" ".join(values)) if values else {}
    except json.JSONDecodeError as err:
        raise UsageError(f"--accelerate_launch_args: not a JSON mapping ({err})") from err
    layer = options.pop("fsdp_transformer_layer_cls_to_wrap", None)
    if options:
        logger.warning(
            "accelerate_launch_args %s are options of the launcher: pass them to `accelerate launch` "
            "(or torchrun) in front of `vlmtune train`.",
            ", ".join(options),
        )
    if not layer:
        return []
    classes = [c.strip() for c in layer.split(",")] if isinstance(layer, str) else list(layer)
    return ["--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": classes})]


def warmup_ratio(values: list[str], known: set[str]) -> Tokens:
    """transformers 5 dropped `warmup_ratio`; its `warmup_steps` below 1 is the same fraction of the run."""
    try:
        ratio = float(values[0]) if values else -1.0
    except ValueError:
        ratio = -1.0
    if not 0 <= ratio < 1:
        raise UsageError(f"--warmup_ratio {' '.join(values)!r}: give a fraction of the run from 0 to below 1")
    return ["--warmup_steps", values[0]]


def lora_bias(values: list[str], known: set[str]) -> Tokens:
    return choice({"none": []}, "bias (vlmtune trains no bias terms)")(values, known)


def peft_method(values: list[str], known: set[str]) -> Tokens:
    full = ["--finetuning_type", "full"]
    return choice({"lora": ["--finetuning_type", "lora"], "none": full, "": full}, "peft_method")(values, known)


@dataclass(frozen=True)
class Alias:
    """`--foreign` from `systems`; `rule` gives our tokens; `note` says what vlmtune does instead."""

    foreign: str
    systems: str
    rule: Rule
    note: str


# fmt: off
ALIASES: tuple[Alias, ...] = (
    # Gaudi run_lora_vlm.py (seed 000)
    Alias("lora_rank", "run_lora_vlm.py", rename("lora_r"), "`--lora_r`"),
    Alias("use_habana", "run_lora_vlm.py", use_habana,
          "not needed: vlmtune runs on the accelerator accelerate finds (Gaudi through habana_frameworks when "
          "installed)"),
    Alias("use_lazy_mode", "run_lora_vlm.py", ignore,
          "not needed: Gaudi's execution mode comes from PT_HPU_LAZY_MODE; vlmtune runs eagerly"),
    Alias("gaudi_config_name", "run_lora_vlm.py", ignore,
          "not needed: mixed precision comes from `--bf16`; the Gaudi config is ignored"),
    # fms-hf-tuning (seed 001)
    Alias("training_data_path", "fms-hf-tuning", rename("dataset_name"), "`--dataset_name`"),
    Alias("torch_dtype", "fms-hf-tuning, TRL", torch_dtype, "`--bf16 true` / `--fp16 true` (float32: nothing)"),
    Alias("use_flash_attn", "fms-hf-tuning", flag_if_true("--attn_implementation", "flash_attention_2"),
          "`--attn_implementation flash_attention_2` (false: the default, sdpa)"),
    Alias("dataset_kwargs", "fms-hf-tuning, TRL", ignore,
          "not needed: vlmtune always prepares image+text samples itself (what skip_prepare_dataset asks for)"),
    Alias("accelerate_launch_args", "fms-hf-tuning", accelerate_launch_args,
          "`fsdp_transformer_layer_cls_to_wrap` becomes `--fsdp_config` (vlmtune picks the decoder layer "
          "class itself when unset); launcher options go to `accelerate launch`"),
    Alias("peft_method", "fms-hf-tuning", peft_method, "`--finetuning_type lora` (none: `full`)"),
    Alias("target_modules", "fms-hf-tuning, PEFT", rename("lora_target_modules"), "`--lora_target_modules`"),
    # Axolotl / mixtrain (seed 002)
    Alias("base_model", "Axolotl", rename("model_name_or_path"), "`--model_name_or_path`"),
    Alias("output_model_name", "mixtrain", ignore,
          "the folder name under `--output_dir` (or the output folder itself when no `--output_dir`)"),
    Alias("num_epochs", "Axolotl", rename("num_train_epochs"), "`--num_train_epochs`"),
    Alias("batch_size", "Axolotl, VizSage", rename("per_device_train_batch_size"),
          "`--per_device_train_batch_size`"),
    Alias("micro_batch_size", "Axolotl", rename("per_device_train_batch_size"),
          "`--per_device_train_batch_size`"),
    Alias("deepspeed_config", "mixtrain", rename("deepspeed"), "`--deepspeed zero2|zero3` (or a JSON file)"),
    Alias("use_flash_attention", "mixtrain", flag_if_true("--attn_implementation", "flash_attention_2"),
          "`--attn_implementation flash_attention_2` (false: the default, sdpa)"),
    Alias("wandb_project", "mixtrain, VizSage", wandb_project,
          "`--report_to wandb` with WANDB_PROJECT set from the value"),
    Alias("sample_packing", "Axolotl",
          lambda values, known: ["--packing", "true" if _truthy(values) else "false"], "`--packing`"),
    Alias("eval_sample_packing", "Axolotl", ignore,
          "not needed: vlmtune never packs evaluation rows (each sample is scored in its own row)"),
    # VizSage (seed 003)
    Alias("model_name", "VizSage", rename("model_name_or_path"), "`--model_name_or_path`"),
    Alias("use_gradient_checkpointing", "VizSage", gradient_checkpointing,
          "`--gradient_checkpointing` (\"unsloth\": plain, non-reentrant checkpointing)"),
    Alias("grad_accum", "VizSage", rename("gradient_accumulation_steps"), "`--gradient_accumulation_steps`"),
    Alias("epochs", "VizSage", rename("num_train_epochs"), "`--num_train_epochs`"),
    Alias("lr", "VizSage", rename("learning_rate"), "`--learning_rate`"),
    Alias("use_bf16", "VizSage", lambda values, known: ["--bf16", "true" if _truthy(values) else "false"],
          "`--bf16`"),
    Alias("use_text_normalization", "VizSage", use_text_normalization,
          "SQuAD-style normalised `exact_match` (our default; false: `exact_match_raw`)"),
    Alias("debug_exact_match", "VizSage",
          lambda values, known: (["--debug_samples", "5"] if "debug_samples" in known else []) if _truthy(values)
          else [], "`vlmtune eval --debug_samples 5`"),
    Alias("use_early_stopping", "VizSage", ignore,
          "early stopping is on when `--early_stopping_patience_ratio` (or `_patience`) is set; true alone "
          "means ratio 0.1, evaluating every `--eval_steps`"),
    Alias("dataset", "VizSage", ignore,
          "`--dataset_name <base_path>/<dataset>` (train/val/test.json) with `--image_root <base_path>/Images`"),
    Alias("base_path", "VizSage", ignore, "the folder holding `<dataset>/` and `Images/` (default: data)"),
    Alias("use_streaming", "VizSage", lambda values, known: ["--streaming", "true" if _truthy(values) else "false"],
          "`--streaming`"),
    Alias("external_knowledge", "VizSage", ignore,
          "`--context_file <external_knowledge_path> --context_join_on image=IMAGE_FILE`"),
    Alias("external_knowledge_path", "VizSage", ignore, "`--context_file` (with `external_knowledge: true`)"),
    Alias("use_wandb", "VizSage", report_to_wandb, "`--report_to wandb` (false: `none`)"),
    Alias("wandb_run_name", "VizSage", rename("run_name"), "`--run_name`"),
    Alias("wandb_tags", "VizSage", ignore, "set WANDB_TAGS in the environment"),
    Alias("name_trained_model", "VizSage", ignore, "the folder name under `--output_dir`"),
    Alias("bias", "VizSage, PEFT", lora_bias, "only `none`: vlmtune trains no bias terms"),
    # TRL / PEFT / BitsAndBytesConfig recipe (seed 004)
    Alias("r", "PEFT", rename("lora_r"), "`--lora_r`"),
    Alias("task_type", "PEFT", ignore, "not needed: vlmtune sets it for the model"),
    Alias("warmup_ratio", "TRL, transformers 4", warmup_ratio,
          "`--warmup_steps` with a value below 1, the fraction of the total steps (transformers 5)"),
    Alias("bnb_4bit_use_double_quant", "BitsAndBytesConfig", ignore,
          "not needed: `--load_in_4bit` always double-quantises"),
    Alias("bnb_4bit_quant_type", "BitsAndBytesConfig", choice({"nf4": []}, "bnb_4bit_quant_type"),
          "not needed: `--load_in_4bit` is NF4"),
    Alias("bnb_4bit_compute_dtype", "BitsAndBytesConfig", ignore, "follows `--bf16` / `--fp16`"),
    Alias("device_map", "transformers", ignore, "not needed: accelerate places the model"),
    # LLaMA-Factory (users of the peers the packing issue names)
    Alias("neat_packing", "LLaMA-Factory",
          lambda values, known: ["--packing", "true"] if _truthy(values) else [],
          "what `--packing` always does: packed samples never attend to each other (LLaMA-Factory's `packing` "
          "without `neat_packing` lets them)"),
)
# fmt: on

BY_NAME: dict[str, Alias] = {a.foreign: a for a in ALIASES}
ALIAS_NAMES: tuple[str, ...] = tuple(BY_NAME)


def _split(argv: Tokens) -> list[tuple[str, list[str]]]:
    """`--name v1 v2` groups, in order; `--name=v` is split; leading positional tokens stay as they are."""
    groups: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            groups.append((name, [value] if eq else []))
        elif groups:
            groups[-1][1].append(token)
        else:
            groups.append(("", [token]))
    return groups


def _last(groups: list[tuple[str, list[str]]], name: str) -> list[str] | None:
    found = [values for n, values in groups if n == name]
    return found[-1] if found else None


def _joined_output_dir(groups, foreign: dict[str, list[str]]) -> Tokens:
    """mixtrain's `output_model_name` / VizSage's `name_trained_model`: a folder under `--output_dir`."""
    name = next((foreign[k][0] for k in ("name_trained_model", "output_model_name") if foreign.get(k)), None)
    if not name:
        return []
    base = _last(groups, "output_dir")
    return ["--output_dir", os.path.join(base[0], name) if base else name]


def _vizsage_data(groups, foreign: dict[str, list[str]], known: set[str]) -> Tokens:
    """VizSage's `<base_path>/<dataset>/{train,val,test}.json` with images in `<base_path>/Images`."""
    tokens: Tokens = []
    if "dataset" in foreign and _last(groups, "dataset_name") is None:
        base = (foreign.get("base_path") or ["data"])[0]
        tokens += ["--dataset_name", os.path.join(base, foreign["dataset"][0])]
        if _last(groups, "image_root") is None:
            tokens += ["--image_root", os.path.join(base, "Images")]
    if "dataset" in foreign and "group_by" in known and _last(groups, "group_by") is None:
        tokens += ["--group_by", "need_external_knowledge"]  # VizSage's test step reports these two groups
    if "external_knowledge" in foreign and _truthy(foreign["external_knowledge"]):
        default = os.path.join(foreign.get("base_path", ["data"])[0], "semart.csv")
        path = (foreign.get("external_knowledge_path") or [default])[0]
        tokens += ["--context_file", path]
        if _last(groups, "context_join_on") is None:
            tokens += ["--context_join_on", "image=IMAGE_FILE"]
    return tokens


def _early_stopping(groups, foreign: dict[str, list[str]], known: set[str]) -> Tokens:
    """VizSage's switch: on needs evaluations (every `--eval_steps`) and a patience; off drops the patience."""
    if "use_early_stopping" not in foreign or "early_stopping_patience_ratio" not in known:
        return []
    if not _truthy(foreign["use_early_stopping"]):
        return []
    tokens: Tokens = []
    if _last(groups, "early_stopping_patience_ratio") is None and _last(groups, "early_stopping_patience") is None:
        tokens += ["--early_stopping_patience_ratio", "0.1"]
    if _last(groups, "eval_strategy") is None:
        tokens += ["--eval_strategy", "steps"]
    return tokens


_DROPPED_WHEN_OFF = ("early_stopping_patience_ratio", "early_stopping_patience", "early_stopping_threshold")


def _warn(alias: Alias, warned: set[str]) -> None:
    if alias.foreign not in warned:
        warned.add(alias.foreign)
        logger.warning(warning(alias))


def warning(alias: Alias) -> str:
    """ "`--lora_rank` (run_lora_vlm.py) is `--lora_r` in vlmtune", or the note when no one flag replaces it."""
    if alias.note.startswith("`--") and "`" not in alias.note[1:].split("`", 1)[1][:1]:
        return f"`--{alias.foreign}` ({alias.systems}) is {alias.note} in vlmtune"
    return f"`--{alias.foreign}` ({alias.systems}) in vlmtune: {alias.note}"


def _ours(name: str, values: list[str]) -> Tokens:
    """One of our own options as given; a single value starting with `-` keeps the `--name=value` form
    argparse needs for it (`--learning_rate=-1` would otherwise lose its value)."""
    if len(values) == 1 and values[0].startswith("-"):
        return [f"--{name}={values[0]}"]
    return [f"--{name}", *values]


@dataclass(frozen=True)
class Given:
    """One of our options as one source gave it: our `name` and `values`, and what the user wrote for it
    (`written`, `raw`: a foreign name and its value, or ours), so a disagreement can quote both.

    `derived` values are built from several keys (VizSage's data folders, mixtrain's output folder under
    `--output_dir`): they replace the value they were built from instead of disagreeing with it.
    """

    name: str
    values: tuple[str, ...]
    written: str
    raw: tuple[str, ...]
    derived: bool = False

    def tokens(self) -> Tokens:
        return _ours(self.name, list(self.values)) if self.name else list(self.values)


def _given(tokens: Tokens, written: str | None = None, raw: list[str] | None = None, derived: bool = False):
    """Our `tokens` as `Given`s, each written as `written` (default: its own name)."""
    return [
        Given(name, tuple(values), written or name, tuple(values if raw is None else raw), derived)
        for name, values in _split(tokens)
    ]


def translate_given(argv: Iterable[str], known: Iterable[str], warned: set[str] | None = None) -> list[Given]:
    """`argv` as our options, each with what the user wrote for it; `known` are the flags the command
    accepts. `warned` collects the foreign names already explained in this run (one warning per name).
    A foreign name that the command itself defines (e.g. `batch_size` of `vlmtune predict`) is left alone.
    """
    known = set(known)
    groups = _split(list(argv))
    foreign = {name: values for name, values in groups if name in BY_NAME and name not in known}
    early_off = "use_early_stopping" in foreign and not _truthy(foreign["use_early_stopping"])
    out: list[Given] = []
    for name, values in groups:
        if not name:
            out.append(Given("", tuple(values), "", tuple(values)))
        elif name in foreign:
            alias = BY_NAME[name]
            if not (name == "batch_size" and "micro_batch_size" in foreign):  # Axolotl's total: `merge` explains
                _warn(alias, warned if warned is not None else set())
            out += _given(alias.rule(values, known), name, values)
        elif not (early_off and name in _DROPPED_WHEN_OFF):
            out.append(Given(name, tuple(values), name, tuple(values)))
    derived = (
        _vizsage_data(groups, foreign, known)
        + _joined_output_dir(groups, foreign)
        + _early_stopping(groups, foreign, known)
    )
    return out + _given(derived, derived=True)


def translate(argv: Iterable[str], known: Iterable[str], warned: set[str] | None = None) -> Tokens:
    """`argv` with every foreign option replaced by ours (`translate_given`, as tokens)."""
    return [token for given in translate_given(argv, known, warned) for token in given.tokens()]


def shared_config(given: list[Given], known: set[str], train_known: set[str], file: str) -> list[Given]:
    """A config file written for `vlmtune train` also serves `vlmtune eval`/`data inspect` (VizSage runs its
    test step on its training YAML): training-only options in the file are left out, saying which."""
    dropped = [g.name for g in given if g.name and g.name not in known and g.name in train_known]
    if dropped:
        logger.info("%s: training options not used by this command: %s", file, ", ".join(dropped))
    return [g for g in given if g.name not in dropped]


def suggestion_names() -> dict[str, str]:
    """Foreign name -> the name to suggest for a misspelling of it (ours when one flag replaces it)."""
    return {alias.foreign: _our_name(alias) for alias in ALIASES}


def _our_name(alias: Alias) -> str:
    ours = re.fullmatch(r"`--(\w+)`", alias.note)
    return ours.group(1) if ours else alias.foreign


def help_epilog() -> str:
    """The alias table for `--help`: foreign name, where it comes from, what vlmtune uses."""
    lines = ["options of other tools, accepted and translated (a warning names ours):"]
    for alias in ALIASES:
        lines.append(f"  --{alias.foreign} ({alias.systems}): {alias.note.replace('`', '')}")
    return "\n".join(lines)
