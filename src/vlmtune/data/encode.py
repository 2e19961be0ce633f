"""One conversation → model inputs with labels on the assistant's tokens only: the one encoding path.

Training (the collator), the pre-training check, `vlmtune data inspect` and evaluation all call
`encode`, so what is checked and shown is what trains. The API:

- `EncodingFacts`: the few facts about a model family this needs (image tokens, what ends a turn,
  whether it encodes prompt/answer as prefix/suffix), built by `models/` from the registry entry and
  the checkpoint, so `data/` never imports the model registry.
- `encode(processor, conv, images, facts, train_on_prompt) -> Encoded`: one row, unpadded: `input_ids`,
  `labels` (-100 where not trained), `inputs` (everything else the processor returned for the row:
  pixel values, grids, masks; each with a leading dimension to concatenate along), `length` and the
  `rendered` text with its trained character spans. A collator pads rows (`collate.pad_rows`); a packer
  can concatenate them.
- `render(processor, messages, facts, train_on_prompt) -> Rendered`: the chat-template text and trained
  spans without the processor's image expansion (cheap: what the pre-training check uses).
- `prompt_text(processor, messages)`: the generation prompt, rendered the same way.

How labels are found. Where the assistant's turns lie is read off the model's own chat template, not
per-family strings: rendering the conversation up to turn k with the generation prompt, and again
through turn k, brackets turn k in the rendered text. Rendering turn k once more with a sentinel answer
tells which text the template puts after the answer (``<|im_end|>\\n``, ``<end_of_turn>\\n``, or just a
space in LLaVA-1.5's). The trained span runs from the end of the generation prompt through the answer
as the template rendered it and, when that text starts with one of `facts.turn_end`, through that
marker; otherwise the tokenizer's EOS is inserted right after the answer (before the template's own
trailing whitespace) and trained, so the model learns to stop. The processor then tokenises the text
with the images (expanding each placeholder to however many tokens that image needs), and an alignment
between the plain tokenisation (character offsets known) and the processor's ids carries the spans
over to token positions. Everything else (system text, prompts, image tokens, padding) gets -100.

Text-only messages reach the template in the form it renders correctly: for each role the template is
rendered once with a text-only message as a list of parts and once as a plain string; where they differ
and the string form renders the text, text-only messages of that role are sent as strings (Llama 3.2
Vision's template prints a list-valued system message as its Python repr).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field

import torch

from ..errors import DataError
from .conversation import Conversation

IGNORE_INDEX = -100
SENTINEL = "Vlmtune0Sentinel0Text"

logger = logging.getLogger(__name__)


class TemplateError(DataError):
    """The chat template renders a conversation in a way vlmtune cannot split into turns."""


@dataclass(frozen=True)
class EncodingFacts:
    """What encoding needs to know about a model family (built from its `FamilySpec` by `models/`).

    `image_token` is the token the processor repeats for each image's features; `image_placeholder` the
    one the chat template writes per image (Gemma 3 writes ``<start_of_image>``, which the processor
    expands); `image_tokens` every token that stands for image content (inputs, never targets).
    `turn_end` holds the texts that close an assistant turn (trained with the answer); a template whose
    turns end otherwise gets the tokenizer's EOS appended to each answer. `prefix_suffix` families
    (PaliGemma) are not chat models: the prompt is the processor's text and the answer its ``suffix=``.
    """

    name: str
    image_token: str
    image_placeholder: str
    image_tokens: tuple[str, ...]
    turn_end: tuple[str, ...] = ()
    multi_image: bool = True
    prefix_suffix: bool = False
    # Image inputs laid out one entry per row, not per image (Mllama's): zeros for a text-only row in a batch.
    row_inputs: tuple[str, ...] = ()


@dataclass
class Rendered:
    """A conversation as chat-template text, with the character spans that are trained."""

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool


@dataclass
class Encoded:
    """One row as the model sees it, unpadded (see the module docstring)."""

    input_ids: list[int]
    labels: list[int]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    rendered: Rendered | None = None

    @property
    def length(self) -> int:
        return len(self.input_ids)


# --- rendering -------------------------------------------------------------------------------------


def _apply(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text for `messages`; a template error is a `TemplateError` (the row's fault)."""
    try:
        return _apply(processor, messages, add_generation_prompt)
    except Exception as err:  # jinja raises its own types (raise_exception, undefined values)
        raise TemplateError(f"the chat template cannot render this conversation: {err}") from err


def _text_message(role: str, text: str, as_string: bool) -> dict:
    return {"role": role, "content": text if as_string else [{"type": "text", "text": text}]}


_PROBES = {  # a valid conversation around a text-only message of each role
    "system": lambda m: [m, _text_message("user", "Hi", False)],
    "user": lambda m: [m],
    "assistant": lambda m: [_text_message("user", "Hi", False), m],
}
_STRING_ROLES: dict[str, frozenset[str]] = {}


def string_roles(processor) -> frozenset[str]:
    """Roles whose text-only messages this template renders correctly only as plain strings.

    Decided by rendering, once per template: the list form must render exactly as the string form;
    where it does not and the string form shows the text, the string form is the right one.
    """
    template = processor.chat_template
    if template not in _STRING_ROLES:
        roles = set()
        for role, probe in _PROBES.items():
            try:
                as_string = _apply(processor, probe(_text_message(role, SENTINEL, True)))
            except Exception:  # noqa: BLE001 - a template that rejects strings takes lists
                continue
            try:
                as_list = _apply(processor, probe(_text_message(role, SENTINEL, False)))
            except Exception:  # noqa: BLE001
                as_list = None
            if as_list != as_string and SENTINEL in as_string:
                roles.add(role)
        _STRING_ROLES[template] = frozenset(roles)
    return _STRING_ROLES[template]


_SYSTEM_TURN: dict[str, bool] = {}
_warned_system: set[str] = set()


def renders_system(processor) -> bool:
    """Whether the chat template shows a system message's text (PaliGemma's renders user turns only; some
    templates raise on a system role). Decided by rendering a sentinel system message, once per template."""
    template = processor.chat_template
    if template not in _SYSTEM_TURN:
        probe = [_text_message("system", SENTINEL, False), _text_message("user", "Hi", False)]
        try:
            shown = SENTINEL in _apply(processor, template_messages(processor, probe, fold_system=False))
        except Exception:  # noqa: BLE001 - a template that refuses the system role has no system turn
            shown = False
        _SYSTEM_TURN[template] = shown
    return _SYSTEM_TURN[template]


def _fold_system(messages: list[dict]) -> list[dict]:
    """The system messages' text put at the start of the first user message (for templates without a
    system turn), so it still reaches the model."""
    system = "\n\n".join(_text_of(m["content"]) for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if not system or first_user is None:
        return rest if system == "" else messages
    user = rest[first_user]
    content = user["content"]
    if isinstance(content, str):
        content = f"{system}\n\n{content}"
    else:
        texts = [i for i, part in enumerate(content) if part["type"] == "text"]
        content = [dict(part) for part in content]
        if texts:
            content[texts[0]]["text"] = f"{system}\n\n{content[texts[0]]['text']}"
        else:
            content.append({"type": "text", "text": system})
    return rest[:first_user] + [{**user, "content": content}] + rest[first_user + 1 :]


def _text_of(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def template_messages(processor, messages: list[dict], fold_system: bool = True) -> list[dict]:
    """`messages` in the form the template renders correctly: text-only content as strings where needed,
    and, where the template has no system turn, the system text folded into the first user message
    (with one warning per template) rather than dropped."""
    if fold_system and any(m["role"] == "system" for m in messages) and not renders_system(processor):
        if processor.chat_template not in _warned_system:
            _warned_system.add(processor.chat_template)
            logger.warning(
                "This model's chat template has no system turn: the system message (--system_prompt or the "
                "data's) is put at the start of the first user message instead."
            )
        messages = _fold_system(messages)
    roles = string_roles(processor)
    out = []
    for message in messages:
        content = message["content"]
        if message["role"] in roles and isinstance(content, list) and all(p["type"] == "text" for p in content):
            message = {**message, "content": "".join(p["text"] for p in content)}
        out.append(message)
    return out


def prompt_text(processor, messages: list[dict]) -> str:
    """The generation prompt for `messages` (what `generate` starts from), rendered as training renders.

    Where the template writes more before every answer than its generation prompt holds (Qwen3.5's empty
    think block after ``<think>\\n``), that text is part of the prompt: training took it as input, so
    generation starts after it too and the model produces what it was trained to produce.
    """
    messages = template_messages(processor, messages)
    prompt = _render(processor, messages, add_generation_prompt=True)
    answer = _text_message("assistant", SENTINEL, "assistant" in string_roles(processor))
    try:
        probe = _apply(processor, [*messages, answer])
    except Exception:  # noqa: BLE001 - a template that cannot end on an answer: its own prompt
        return prompt
    head = probe[: probe.find(SENTINEL)] if SENTINEL in probe else ""
    return head if head.startswith(prompt) and head[len(prompt) :].strip() else prompt


def _answer_end(processor, messages: list[dict], k: int, before: str, through: str) -> tuple[int, str]:
    """Where turn k's answer ends in `through`, and the template's text after it (its turn closing).

    The turn rendered with a sentinel answer shows the text the template puts after the answer (also
    where the answer changed the text before it: an answer holding its own reasoning block); a template
    that rewrites answers beyond recognition falls back to trailing whitespace.
    """
    sentinel = {**messages[k], "content": _with_text(messages[k]["content"], SENTINEL)}
    probe = _render(processor, messages[:k] + [sentinel])
    at = probe.find(SENTINEL, len(before))
    if probe.startswith(before) and at >= 0:
        tail = probe[at + len(SENTINEL) :]
        if through.endswith(tail) and len(through) - len(tail) >= len(before):
            return len(through) - len(tail), tail
    end = len(through.rstrip())
    return end, through[end:]


def _with_text(content, text: str):
    """`content` with its text replaced by `text` (one text part, images kept)."""
    if isinstance(content, str):
        return text
    images = [p for p in content if p["type"] != "text"]
    return images + [{"type": "text", "text": text}]


def _turn_in_place(processor, messages: list[dict], k: int, full: str) -> tuple[int, int, str, str] | None:
    """Turn k's answer located in the whole conversation: rendered once more with a sentinel answer, the
    text around the sentinel must be the text around the answer. Templates that render a turn differently
    once later turns follow (Qwen3.5 drops earlier turns' think blocks) are read correctly this way, and
    what the template writes before every answer (an empty ``<think>\n\n</think>\n\n``) stays input.
    The fourth value is what the generation prompt writes beyond the rendered turn's opening (Gemma 4's
    empty ``<|channel>thought\n<channel|>``, which its rendered history leaves out): inserted before the
    answer as input, so each answer is trained after the very text the model answers after at inference.
    None where the answer changes the text before it (an answer holding its own reasoning block)."""
    sentinel = {**messages[k], "content": _with_text(messages[k]["content"], SENTINEL)}
    probe = _render(processor, [*messages[:k], sentinel, *messages[k + 1 :]])
    at = probe.find(SENTINEL)
    head, tail = probe[:at], probe[at + len(SENTINEL) :]
    if at < 0 or not (full.startswith(head) and full.endswith(tail) and len(full) >= len(head) + len(tail)):
        return None
    before = _render(processor, messages[:k], add_generation_prompt=True)
    start = len(before) if head.startswith(before) and not head[len(before) :].strip() else len(head)
    return start, len(full) - len(tail), tail, _prompt_lead(processor, messages[:k], sentinel, before, head)


def _prompt_lead(processor, history: list[dict], sentinel: dict, before: str, head: str) -> str:
    """What the generation prompt `before` writes beyond `head` (the text before the answer in place) that
    the template leaves out even where the turn is the last one (Gemma 4's empty thought channel); not
    what the template itself writes there and drops once later turns follow (Qwen3.5's think blocks)."""
    if not before.startswith(head) or len(before) == len(head):
        return ""
    last = _render(processor, [*history, sentinel])
    return "" if last[: last.find(SENTINEL)].startswith(before) else before[len(head) :]


def _assistant_turns(processor, messages: list[dict], full: str) -> list[tuple[int, int, str, str]]:
    """Per assistant turn: (start of its answer, end of the answer, the template's text after the answer,
    the generation prompt's text to insert before the answer: see `_turn_in_place`).

    The answer starts where the template's generation prompt ends (or, where the template writes more
    before every answer, after that), found in the whole conversation by `_turn_in_place`; failing that,
    by rendering the conversation up to the turn with and without it."""
    turns = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:
            raise TemplateError("a conversation cannot start with an assistant turn")
        found = _turn_in_place(processor, messages, k, full)
        if found is not None:
            turns.append(found)
            continue
        before = _render(processor, messages[:k], add_generation_prompt=True)
        through = _render(processor, messages[: k + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                f"the chat template does not render turn {k} as a prefix of the whole conversation; "
                "cannot locate the assistant's answer (see docs/data.md, 'How labels are found')"
            )
        end, tail = _answer_end(processor, messages, k, before, through)
        turns.append((len(before), end, tail, ""))
    return turns


def render(processor, messages: list[dict], facts: EncodingFacts, train_on_prompt: bool = False) -> Rendered:
    """Render `messages` with the chat template and find the character spans to train on."""
    messages = template_messages(processor, messages)
    full = _render(processor, messages)
    eos = processor.tokenizer.eos_token or ""
    markers = (*facts.turn_end, eos)
    pieces, spans, cursor, shift = [], [], 0, 0
    for start, end, tail, lead in _assistant_turns(processor, messages, full):
        marker = next((m for m in markers if m and tail.startswith(m)), None)
        added = "" if marker else eos
        close = len(marker) if marker else 0
        pieces += [full[cursor:start], lead, full[start:end], added]
        shift += len(lead)
        spans.append((start + shift, end + shift + len(added) + close))
        shift, cursor = shift + len(added), end
    text = "".join(pieces) + full[cursor:]
    if train_on_prompt:
        spans = [(0, len(text.rstrip()))]
    bos = processor.tokenizer.bos_token
    return Rendered(text=text, spans=spans, add_special_tokens=not (bos and text.startswith(bos)))


# --- tokens and labels -----------------------------------------------------------------------------


def token_ids(processor, tokens) -> set[int]:
    """Ids of `tokens` in the processor's vocabulary (unknown ones left out)."""
    tokenizer = processor.tokenizer
    ids = {tokenizer.convert_tokens_to_ids(t) for t in tokens if t}
    return ids - {tokenizer.unk_token_id, None}


def _compress(ids: list[int], runs_of: set[int]) -> tuple[list[int], list[int]]:
    """`ids` with each run of one repeated image token kept once, and each kept token's position."""
    kept, where = [], []
    for i, tok in enumerate(ids):
        if tok in runs_of and i and ids[i - 1] == tok:
            continue
        kept.append(tok)
        where.append(i)
    return kept, where


def align(plain: list[int], expanded: list[int], image_ids: set[int]) -> dict[int, int]:
    """Map positions of `plain` (the text tokenised alone) to positions in `expanded` (the processor's ids).

    The two differ only where image placeholders were expanded. Runs of a repeated image token collapse
    to one token first and the common prefix and suffix are matched directly, so the cost does not
    grow with the number of image tokens (10k+ for a large image); the rest, about as long as the text
    around the images, is matched by `difflib`.
    """
    a, a_at = _compress(plain, image_ids)
    b, b_at = _compress(expanded, image_ids)
    position: dict[int, int] = {}
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    blocks = [(0, 0, head)]
    if len(a) - tail > head or len(b) - tail > head:
        matcher = difflib.SequenceMatcher(None, a[head : len(a) - tail], b[head : len(b) - tail], autojunk=False)
        blocks += [(head + i, head + j, n) for i, j, n in matcher.get_matching_blocks()]
    blocks.append((len(a) - tail, len(b) - tail, tail))
    for i, j, n in blocks:
        for d in range(n):
            position[a_at[i + d]] = b_at[j + d]
    return position


def label_ids(processor, rendered: Rendered, input_ids: list[int], facts: EncodingFacts) -> list[int]:
    """Labels for the processor's `input_ids` of `rendered.text`: ids inside the spans, -100 elsewhere.

    A trained token the alignment cannot place is an error, never a silent mislabel.
    """
    plain = processor.tokenizer(
        rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True
    )
    plain_ids, offsets = plain["input_ids"], plain["offset_mapping"]
    never = token_ids(processor, facts.image_tokens)
    position = align(plain_ids, input_ids, never)
    labels = [IGNORE_INDEX] * len(input_ids)
    spans = rendered.spans
    for i, (start, end) in enumerate(offsets):
        if end <= start or not any(s <= start < e for s, e in spans):
            continue
        if i not in position:
            raise TemplateError(
                f"token {processor.tokenizer.convert_ids_to_tokens(plain_ids[i])!r} of an assistant turn "
                "could not be found in the processor's output"
            )
        if input_ids[position[i]] not in never:
            labels[position[i]] = input_ids[position[i]]
    return labels


# --- the processor ---------------------------------------------------------------------------------


def processor_inputs(processor, texts: list[str], images: list[list], add_special_tokens: bool = True, **kwargs):
    """Call the processor on a batch; images nested per sample, omitted when the batch has none. A
    processor that lists `mm_token_type_ids` among the model's inputs is asked for them: some (Cosmos 3
    Edge's) name them but do not return them by default, and the model's 3-D positions need them."""
    if any(images):
        kwargs["images"] = images
    if "mm_token_type_ids" in getattr(processor, "model_input_names", ()):
        kwargs.setdefault("return_mm_token_type_ids", True)
    return processor(text=texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens, **kwargs)


def _call(processor, conv: Conversation, **kwargs) -> dict:
    """The processor's output for one row; its complaints about the row (image/placeholder counts)
    become a `DataError` naming the row."""
    try:
        return dict(processor_inputs(processor, **kwargs))
    except ValueError as err:
        raise DataError(f"{conv.where}: the processor rejected this sample: {err}") from err


def render_row(processor, conv: Conversation, facts: EncodingFacts, train_on_prompt: bool = False) -> Rendered:
    """`render` for one row; a template error names the row."""
    try:
        if facts.prefix_suffix:
            prefix = prompt_text(processor, conv.prompt_messages())
            return Rendered(prefix + conv.answer, [(len(prefix), len(prefix) + len(conv.answer))], True)
        return render(processor, conv.messages, facts, train_on_prompt)
    except TemplateError as err:
        raise TemplateError(f"{conv.where}: {err}") from err


def encode(
    processor, conv: Conversation, images: list, facts: EncodingFacts, train_on_prompt: bool = False
) -> Encoded:
    """Encode one row exactly as training does (see the module docstring)."""
    if facts.prefix_suffix:
        return _encode_prefix_suffix(processor, conv, images, facts, train_on_prompt)
    rendered = render_row(processor, conv, facts, train_on_prompt)
    inputs = _call(
        processor, conv, texts=[rendered.text], images=[images], add_special_tokens=rendered.add_special_tokens
    )
    ids = inputs.pop("input_ids")[0].tolist()
    try:
        labels = label_ids(processor, rendered, ids, facts)
    except TemplateError as err:
        raise TemplateError(f"{conv.where}: {err}") from err
    return Encoded(ids, labels, inputs, rendered)


_warned_multi_turn = False


def _encode_prefix_suffix(
    processor, conv: Conversation, images: list, facts: EncodingFacts, train_on_prompt: bool
) -> Encoded:
    """PaliGemma's way: the prompt (rendered by its template) as prefix text, the last answer as ``suffix=``.

    The processor marks the suffix (answer + EOS) with ``token_type_ids`` 1; those are the trained
    tokens (the prefix attends bidirectionally, the suffix causally). With `train_on_prompt` the prefix
    text is trained too, never the image tokens.
    """
    global _warned_multi_turn
    prompt = conv.prompt_messages()
    if not _warned_multi_turn and any(m["role"] == "assistant" for m in prompt):
        logger.warning("%s trains on the last answer of each conversation; earlier answers are ignored.", facts.name)
        _warned_multi_turn = True
    prompt_only = render_row(processor, conv, facts)
    prefix = prompt_only.text[: prompt_only.spans[0][0]]
    inputs = _call(processor, conv, texts=[prefix], images=[images], suffix=[conv.answer])
    ids = inputs.pop("input_ids")[0]
    inputs.pop("labels", None)  # the processor's own (prompt masked, images not): ours follow the rules above
    trained = inputs["attention_mask"][0].bool()
    if not train_on_prompt:
        trained &= inputs["token_type_ids"][0] == 1
    trained &= ~torch.isin(ids, torch.tensor(sorted(token_ids(processor, facts.image_tokens)), dtype=ids.dtype))
    labels = torch.where(trained, ids, torch.full_like(ids, IGNORE_INDEX))
    suffix_at = int((inputs["token_type_ids"][0] == 0).sum())
    text = processor.tokenizer.decode(ids)
    answer_at = len(processor.tokenizer.decode(ids[:suffix_at]))
    rendered = Rendered(text=text, spans=[(0 if train_on_prompt else answer_at, len(text))], add_special_tokens=True)
    return Encoded(ids.tolist(), labels.tolist(), inputs, rendered)
