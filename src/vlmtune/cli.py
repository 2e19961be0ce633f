"""The `vlmtune` command: parse arguments into dataclasses, call one function per command."""

from __future__ import annotations

import difflib
import errno
import logging
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

# Noise users cannot act on, silenced before the libraries load: bitsandbytes warns at import on every CPU
# without its optional `kernels` package, PEFT calls a transformers method that v5 renamed, and the hub's
# HTTP client logs each request.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
for _client in ("httpx", "httpx2"):  # huggingface_hub's HTTP client logs every request at INFO
    logging.getLogger(_client).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)

from .config import arg, parse_args  # noqa: E402
from .config.arguments import FAMILY_FILE_HELP  # noqa: E402
from .config.family import read_family_file  # noqa: E402
from .errors import DataError, UsageError, VlmtuneError  # noqa: E402
from .models.tiny import RECIPES as TINY_FAMILIES  # noqa: E402
from .outputs import check_output_file, check_output_folder  # noqa: E402

USAGE = """usage: vlmtune <command> [options]

Fine-tune vision-language models on your own image+text data.

commands:
  train        fine-tune a model (LoRA by default) on a dataset; `vlmtune train --help`
  dpo          align a model (after train) with preference pairs: image, prompt, chosen, rejected; `vlmtune dpo --help`
  kto          align a model (after train) with completions labelled desirable or not (or pairs); `vlmtune kto --help`
  grpo         reinforce a model (after train) with rewards on its sampled answers; `vlmtune grpo --help`
  eval         generate answers for a dataset and score them: metrics.json, predictions.jsonl, report.html
  predict      answer a prompt about one or more images (or a JSONL of requests) with a model and optional adapter
  merge        merge a LoRA adapter into its base model and save a standalone checkpoint
  push         upload a trained or merged folder to the Hugging Face hub (e.g. after an upload failed)
  models       every architecture transformers knows and what vlmtune makes of it (checked, derived, refused)
  tiny-model   write a tiny random model of a real architecture (offline, for trying things out)
  demo         fine-tune a tiny Qwen2-VL on bundled synthetic data, offline, in about a minute
  data inspect show the first samples as the model sees them (trained text marked) and check all of them

Config files: `vlmtune train config.yaml [--flag value ...]` (flags override the file).
`--debug` (or VLMTUNE_DEBUG=1) shows the Python traceback behind an error message.
"""


@dataclass
class TinyModelArguments:
    """`vlmtune tiny-model`'s flags."""

    family: str = arg("qwen2_vl", f"Architecture to build: {', '.join(TINY_FAMILIES)}.")
    output_dir: str = arg(None, "Folder to write the model and processor to.")
    seed: int = arg(0, "Seed for the random weights.")


@dataclass
class ModelsArguments:
    """`vlmtune models`' flags."""

    status: str | None = arg(None, "Only architectures with this status: checked, derived, untested here, refused.")
    model_type: str | None = arg(None, "Only this `model_type` (as in a checkpoint's config.json).")
    format: str = arg("text", "text (a table for the terminal) or markdown (as docs/models.md carries it).")


@dataclass
class PredictArguments:
    model_name_or_path: str | None = arg(None, "Base model (read from the adapter if omitted).")
    adapter: str | None = arg(None, "A vlmtune/PEFT adapter folder.")
    family_file: str | None = arg(None, FAMILY_FILE_HELP)
    image: list[str] = arg(None, "Image path(s) or URL(s), in prompt order.", default_factory=list)
    prompt: str = arg(None, "The question or instruction.")
    system_prompt: str | None = arg(None, "Optional system message.")
    max_new_tokens: int = arg(128, "Longest answer to generate.")
    do_sample: bool = arg(False, "Sample instead of greedy decoding.")
    temperature: float = arg(1.0, "Sampling temperature (with --do_sample).")
    top_p: float = arg(1.0, "Nucleus sampling mass (with --do_sample).")
    requests: str | None = arg(
        None, 'A JSONL file of requests ({"image": ..., "prompt": ...} per line) instead of --image/--prompt.'
    )
    output_file: str | None = arg(None, "Where --requests answers go as JSONL (default: printed).")
    batch_size: int = arg(8, "Requests answered per batch (with --requests).")


def _parse(classes, argv: list[str], prog: str):
    return parse_args(argv, (classes,), prog=prog)


def cmd_train(argv: list[str]) -> None:
    from .config import make_parser
    from .train.run import run_training

    if any(a in ("-h", "--help") for a in argv):
        make_parser(prog="vlmtune train").print_help()
        return
    model_args, data_args, finetune_args, training_args = parse_args(argv, prog="vlmtune train")
    result = run_training(model_args, data_args, finetune_args, training_args)
    if not result.trainer.is_world_process_zero():  # under torchrun / accelerate, one process reports
        return
    print(f"Saved to {result.output_dir}")
    for key in sorted(result.metrics):
        print(f"  {key}: {result.metrics[key]}")


def _run_aligning(argv: list[str], command: str, own_arguments, run) -> None:
    """`vlmtune dpo|kto|grpo`: the training arguments plus the command's own, run, and the result printed."""
    from .config import TRAINING_ARGUMENTS, make_parser

    classes = (*TRAINING_ARGUMENTS, own_arguments)
    if any(a in ("-h", "--help") for a in argv):
        make_parser(classes, prog=f"vlmtune {command}").print_help()
        return
    result = run(*parse_args(argv, classes, prog=f"vlmtune {command}"))
    if not result.trainer.is_world_process_zero():  # under torchrun / accelerate, one process reports
        return
    print(f"Saved to {result.output_dir}")
    for key in sorted(result.metrics):
        print(f"  {key}: {result.metrics[key]}")


def cmd_dpo(argv: list[str]) -> None:
    from .config import DpoArguments
    from .train.preference import run_dpo

    _run_aligning(argv, "dpo", DpoArguments, run_dpo)


def cmd_kto(argv: list[str]) -> None:
    from .config import KtoArguments
    from .train.kto import run_kto

    _run_aligning(argv, "kto", KtoArguments, run_kto)


def cmd_grpo(argv: list[str]) -> None:
    from .config import GrpoArguments
    from .train.grpo import run_grpo

    _run_aligning(argv, "grpo", GrpoArguments, run_grpo)


def cmd_tiny_model(argv: list[str]) -> None:
    from .models.tiny import build_tiny_model

    (args,) = _parse(TinyModelArguments, argv, "vlmtune tiny-model")
    if not args.output_dir:
        raise UsageError("vlmtune tiny-model: --output_dir is required")
    check_output_folder(args.output_dir)
    print(f"Wrote a tiny {args.family} model to {build_tiny_model(args.family, args.output_dir, args.seed)}")


def _no_architecture(args: ModelsArguments, known: list[str]) -> str:
    if args.model_type is None:
        return f"no architecture has --status {args.status!r} in this transformers"
    close = difflib.get_close_matches(args.model_type, known)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `vlmtune models` lists them all"
    return f"--model_type {args.model_type!r}: transformers knows no such image-text-to-text architecture{hint}"


def cmd_models(argv: list[str]) -> None:
    from .models import catalog

    (args,) = _parse(ModelsArguments, argv, "vlmtune models")
    if args.status is not None and args.status not in catalog.STATUSES:
        raise UsageError(f"--status {args.status!r}: choose one of: {', '.join(catalog.STATUSES)}")
    if args.format not in ("text", "markdown"):
        raise UsageError(f"--format {args.format!r}: choose text or markdown")
    rows = tuple(
        a
        for a in catalog.architectures()
        if (args.status is None or a.status == args.status) and args.model_type in (None, a.model_type)
    )
    if not rows:
        raise UsageError(_no_architecture(args, [a.model_type for a in catalog.architectures()]))
    print(catalog.as_markdown(rows) if args.format == "markdown" else catalog.as_text(rows))


def cmd_predict(argv: list[str]) -> None:
    from .eval.predict import answer_one, answer_requests
    from .models.loading import load_for_inference

    (args,) = _parse(PredictArguments, argv, "vlmtune predict")
    if not (args.prompt or args.requests):
        raise UsageError("vlmtune predict: --prompt (or --requests FILE.jsonl) is required")
    if not (args.model_name_or_path or args.adapter):
        raise UsageError("vlmtune predict: --model_name_or_path or --adapter (it records its base model) is required")
    if args.requests and not Path(args.requests).is_file():
        raise DataError(f"--requests {args.requests}: no such file (a JSONL file of {{image, prompt}} lines)")
    if args.output_file:
        check_output_file(args.output_file, "--output_file")
    loaded = load_for_inference(args.model_name_or_path, args.adapter, family=read_family_file(args.family_file))
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {}
    if args.requests:
        answer_requests(
            loaded,
            args.requests,
            args.output_file,
            args.batch_size,
            system_prompt=args.system_prompt,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            **sampling,
        )
        return
    answer = answer_one(
        loaded,
        args.image,
        args.prompt,
        system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        **sampling,
    )
    print(answer)


def cmd_demo(argv: list[str]) -> None:
    from .demo import DemoArguments, run_demo

    (args,) = _parse(DemoArguments, argv, "vlmtune demo")
    run_demo(args)


def cmd_data(argv: list[str]) -> None:
    from .config import TRAINING_ARGUMENTS, InspectArguments, make_parser
    from .data.preview import inspect_data
    from .models.loading import load_processing

    if not argv or argv[0] != "inspect":
        raise UsageError("usage: vlmtune data inspect --model_name_or_path MODEL --dataset_name DATA [options]")
    classes = (*TRAINING_ARGUMENTS, InspectArguments)  # the train command's flags and config files work too
    if any(a in ("-h", "--help") for a in argv):
        make_parser(classes, prog="vlmtune data inspect").print_help()
        return
    model_args, data_args, _, _, inspect_args = parse_args(argv[1:], classes, prog="vlmtune data inspect")
    if not model_args.model_name_or_path:
        raise UsageError("vlmtune data inspect: --model_name_or_path is required (its processor and chat template)")
    processor, spec = load_processing(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, family=model_args.family()
    )
    inspect_data(processor, spec.encoding, data_args, inspect_args)


def cmd_eval(argv: list[str]) -> None:
    from .config import make_parser
    from .eval.run import ARGUMENT_CLASSES, run_eval

    if any(a in ("-h", "--help") for a in argv):
        make_parser(ARGUMENT_CLASSES, prog="vlmtune eval").print_help()
        return
    run_eval(*parse_args(argv, ARGUMENT_CLASSES, prog="vlmtune eval"))


def cmd_merge(argv: list[str]) -> None:
    from .export import MergeArguments, merge_adapter

    (args,) = _parse(MergeArguments, argv, "vlmtune merge")
    print(f"Merged model written to {merge_adapter(args)}")


def cmd_push(argv: list[str]) -> None:
    from .hub import PushArguments, run_push

    if argv and not argv[0].startswith("-"):  # `vlmtune push FOLDER ...`
        argv = ["--folder", *argv]
    (args,) = _parse(PushArguments, argv, "vlmtune push")
    run_push(args)


COMMANDS = {
    "train": cmd_train,
    "dpo": cmd_dpo,
    "kto": cmd_kto,
    "grpo": cmd_grpo,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "merge": cmd_merge,
    "push": cmd_push,
    "data": cmd_data,
    "tiny-model": cmd_tiny_model,
    "models": cmd_models,
    "demo": cmd_demo,
}


DEBUG_ENV = "VLMTUNE_DEBUG"
BUG_LINE = (
    "This is a bug in vlmtune, not in what you gave it. Please report it with the command you ran and the "
    "traceback above."
)


def _debug_requested(argv: list[str]) -> bool:
    """`--debug` anywhere on the command line (removed from `argv`) or VLMTUNE_DEBUG=1."""
    flag = "--debug" in argv
    while "--debug" in argv:
        argv.remove("--debug")
    return flag or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = argv.pop(0)
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; the commands are: {', '.join(COMMANDS)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    COMMANDS[command](argv)


def _end_progress_bars() -> None:
    """Close the progress bars still on screen (a run that fails mid-step leaves the Trainer's open), so the
    message that follows starts on a line of its own instead of after the bar."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _out_of_space(err: BaseException) -> str | None:
    """The message for a write that found the disk (or quota) full, outside the saves that say more."""
    if not (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)):
        return None
    where = f" while writing {err.filename}" if err.filename else ""
    return f"no space left on device{where}; free some space, or write to another disk, and run the command again"


def main(argv: list[str] | None = None) -> None:
    """Run one command. The one error boundary: a `VlmtuneError` (a mistake the user can fix) becomes
    its message on stderr and its exit code, without a traceback unless `--debug`; anything else keeps
    its traceback and is called a bug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        _dispatch(argv)
    except VlmtuneError as err:
        if debug:
            traceback.print_exc()
        if not getattr(err, "silent", False):  # (the other processes of a job, when the first one says it)
            _end_progress_bars()
            print(f"vlmtune: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        _end_progress_bars()
        print("vlmtune: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        _end_progress_bars()
        if (message := _out_of_space(err)) is not None:
            print(f"vlmtune: error: {message}", file=sys.stderr)
            raise SystemExit(1) from None
        traceback.print_exc()
        print(f"vlmtune: {BUG_LINE}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
