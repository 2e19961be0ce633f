"""Text some families need beyond plain registry fields, named by their registry entries."""

from __future__ import annotations

# PaliGemma is not a chat model: it reads a prefix (the prompt) and continues with the answer. Its
# checkpoints ship no chat template; this one renders what generation starts from: an <image> per image,
# then the user text. (The processor expands each <image> and puts BOS after them and "\n" at the end.)
PALIGEMMA_TEMPLATE = (
    "{% for message in messages if message['role'] == 'user' and message['content'] is not string %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% endfor %}"
    "{% for message in messages if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{% endfor %}"
)
