"""`vlmtune predict --requests file.jsonl`: many questions in, one answer per line out.

Each request is one JSON object per line::

    {"id": "q1", "image": "images/a.png", "prompt": "What colour is the shape?"}
    {"images": ["p1.png", "p2.png"], "prompt": "What changed?", "system_prompt": "Be brief."}

`image` / `images` may be a path (relative to the requests file's folder, then the current folder), a
URL or base64; both may be omitted for a text-only question. `question` or `query` may stand for
`prompt`. The output line is the request with `answer` added.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.conversation import Conversation
from ..data.images import ImageOptions
from ..errors import DataError
from .generate import generate_answers

PROMPT_KEYS = ("prompt", "question", "query")


def request_conversation(request: dict, where: str, multi_image: bool, system_prompt: str | None = None):
    """One request → (Conversation, image references)."""
    prompt = next((request[k] for k in PROMPT_KEYS if request.get(k)), None)
    if not prompt:
        raise DataError(f"{where}: no prompt (give one of {', '.join(PROMPT_KEYS)})")
    images = request.get("images", request.get("image")) or []
    images = images if isinstance(images, list) else [images]
    images = images if multi_image else images[:1]
    messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]}]
    system = request.get("system_prompt") or system_prompt
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return Conversation(messages=messages, images=images), images


def answer_one(loaded, images: list[str], prompt: str, system_prompt: str | None = None, **generate_kwargs) -> str:
    """The answer to one prompt about `images` (paths relative to the current folder, URLs or base64)."""
    request = {"images": images, "prompt": prompt}
    conv, refs = request_conversation(request, "command line", loaded.spec.multi_image, system_prompt)
    pixels = ImageOptions(base_dirs=(Path.cwd(),)).load(refs, "--image")
    (answer,) = generate_answers(loaded.model, loaded.processor, [conv], [pixels], **generate_kwargs)
    return answer


def answer_requests(
    loaded,
    requests_path: str,
    output: str | None = None,
    batch_size: int = 8,
    system_prompt: str | None = None,
    **generate_kwargs,
) -> list[dict]:
    """Answer every request in `requests_path`; write JSONL to `output` (or stdout). Returns the records."""
    path = Path(requests_path)
    requests = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                requests.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {n}: not JSON ({err.msg})") from err
    options = ImageOptions(base_dirs=(path.parent, Path.cwd()))
    convs, pixels = [], []
    for n, request in requests:
        where = f"{path}, line {n}"
        conv, refs = request_conversation(request, where, loaded.spec.multi_image, system_prompt)
        convs.append(conv)
        pixels.append(options.load(refs, where))
    answers = generate_answers(
        loaded.model,
        loaded.processor,
        convs,
        pixels,
        batch_size=batch_size,
        progress=output is not None,
        **generate_kwargs,
    )
    records = [{**request, "answer": answer} for (_, request), answer in zip(requests, answers)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)
    return records
