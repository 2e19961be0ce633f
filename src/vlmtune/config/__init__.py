"""Arguments of vlmtune's commands: dataclasses (`arguments`), their value checks (`checks`), the parser
(`parser`: help, did-you-mean, one `UsageError` per mistake), config files (`files`), other tools' option
names (`aliases`) and what a launch settles before `TrainingArguments` (`launch`)."""

from .arguments import (
    TRAINING_ARGUMENTS,
    DataArguments,
    DpoArguments,
    FinetuneArguments,
    GrpoArguments,
    InspectArguments,
    KtoArguments,
    ModelArguments,
    VlmTrainingArguments,
    arg,
    to_dict,
)
from .parser import VlmArgumentParser, make_parser, parse_args
from .suggest import did_you_mean

__all__ = [
    "TRAINING_ARGUMENTS",
    "DataArguments",
    "DpoArguments",
    "FinetuneArguments",
    "GrpoArguments",
    "InspectArguments",
    "KtoArguments",
    "ModelArguments",
    "VlmArgumentParser",
    "VlmTrainingArguments",
    "arg",
    "did_you_mean",
    "make_parser",
    "parse_args",
    "to_dict",
]
