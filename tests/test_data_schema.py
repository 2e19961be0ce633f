"""Every schema users bring becomes the same conversation; detection explains itself; bad rows are named."""

from __future__ import annotations

import json

import pytest

from tests.data_files import data_args, data_uri, png, write_rows
from tests.helpers import family_spec
from vlmtune.data.context import load_context
from vlmtune.data.schema import DataError, cut_prompt, detect_schema
from vlmtune.data.splits import build_splits


def user_parts(conv) -> list:
    return [p.get("text", "<img>") for m in conv.messages if m["role"] == "user" for p in m["content"]]


def test_prompt_response_columns_detected_or_named():
    schema = detect_schema(["image_path", "prompt", "response"], source="d.csv")
    assert schema.describe() == "Detected schema: prompt/response (prompt/response); image column: image_path"
    conv = schema.to_conversation({"image_path": "a.png", "prompt": "Q?", "response": 42, "__index__": 3}, 3)
    assert conv.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "42"}]},
    ]
    assert conv.images == ["a.png"] and conv.meta == {"row": 3, "source": "d.csv"}
    named = detect_schema(["pic", "ask", "say"], image_column="pic", prompt_column="ask", response_column="say")
    assert (named.image_column, named.prompt_column, named.response_column) == ("pic", "ask", "say")
    with pytest.raises(DataError, match=r"d.csv: image column 'photo' not found; columns are: pic, ask, say"):
        detect_schema(["pic", "ask", "say"], source="d.csv", image_column="photo")


def test_image_question_answer_keeps_extra_columns_as_metadata():
    schema = detect_schema(["image", "question", "answer", "need_external_knowledge", "__index__"], source="aqua.json")
    assert schema.describe().endswith("image column: image; kept as metadata: need_external_knowledge")
    conv = schema.to_conversation(
        {"image": "p.jpg", "question": "Who?", "answer": "Monet", "need_external_knowledge": True}, 0
    )
    assert conv.meta["need_external_knowledge"] is True and conv.answer == "Monet"


def test_query_label_list_gives_several_references():
    schema = detect_schema(["image", "query", "label"])
    conv = schema.to_conversation({"image": "c.png", "query": "Max?", "label": ["42", "42.0"]}, 0)
    assert conv.answer == "42" and conv.references == ["42", "42.0"]


def test_detection_failure_lists_the_columns_it_saw():
    with pytest.raises(DataError) as err:
        detect_schema(["photo", "caption_a", "caption_b"], source="weird.parquet")
    assert "weird.parquet: cannot tell which columns hold the prompt and the answer" in str(err.value)
    assert "columns are: photo, caption_a, caption_b" in str(err.value) and "--prompt_column" in str(err.value)


MULTI_TURN = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    {"role": "assistant", "content": "blue"},
]


def test_messages_with_an_images_column_list_or_single():
    schema = detect_schema(["messages", "images"], system_prompt="ignored: the data has a system turn")
    conv = schema.to_conversation({"messages": MULTI_TURN, "images": ["a.png", "b.png"]}, 0)
    assert conv.images == ["a.png", "b.png"] and conv.messages[0]["content"][0]["text"] == "Be brief."
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.messages[-1]["content"] == [{"type": "text", "text": "blue"}]
    single = schema.to_conversation({"messages": MULTI_TURN[1:3], "images": "a.png"}, 0)
    assert (
        single.images == ["a.png"] and single.messages[0]["content"][0]["text"] == "ignored: the data has a system turn"
    )


def test_inline_image_and_image_url_parts():
    uri = data_uri()
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "file:///x.png"}, {"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "B?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
    ]
    conv = detect_schema(["messages"]).to_conversation({"messages": messages}, 0)
    assert conv.images == ["file:///x.png", uri]
    assert user_parts(conv) == ["<img>", "A?", "<img>", "B?"]


def test_sharegpt_roles_json_text_and_images_without_placeholders():
    raw = json.dumps([{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "a cat"}])
    conv = detect_schema(["conversations", "image"]).to_conversation({"conversations": raw, "image": "c.png"}, 0)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert user_parts(conv) == ["<img>", "What is it?"]  # images given beside the text go first


def test_llava_format_image_literals_become_placeholders():
    conversations = [
        {"from": "human", "value": "<image>\nWhat colour is it?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Compare with <image> please."},
        {"from": "gpt", "value": "the second is blue"},
    ]
    schema = detect_schema(["conversations", "images"])
    conv = schema.to_conversation({"conversations": conversations, "images": ["a.png", "b.png"]}, 0)
    assert user_parts(conv) == ["<img>", "What colour is it?", "Compare with ", "<img>", " please."]
    assert not any("<image>" in p.get("text", "") for m in conv.messages for p in m["content"])
    # A literal count that does not match the images is an error naming the row, not an image-token mismatch.
    with pytest.raises(DataError, match=r"row 3, field 'conversations': 2 image placeholder\(s\) but 1 image"):
        schema.to_conversation({"conversations": conversations, "images": ["a.png"]}, 3)


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"image_path": "a.png", "prompt": {"q": 1}, "response": "x"},
            "row 7, field 'prompt': expected text, got dict",
        ),
        ({"image_path": "a.png", "prompt": "q", "response": " "}, "row 7, field 'response': empty"),
        ({"image_path": "", "prompt": "q", "response": "x"}, "row 7, field 'image_path': empty"),
        (
            {"image_path": "a.png", "prompt": "q", "response": [{"a": 1}]},
            "row 7, field 'response': expected text, got dict",
        ),
    ],
)
def test_bad_prompt_response_rows_name_file_row_and_field(row, message):
    schema = detect_schema(list(row), source="d.csv")
    with pytest.raises(DataError, match="^d.csv, " + message.replace("(", r"\(")):
        schema.to_conversation(row, 7)


@pytest.mark.parametrize(
    "messages, images, message",
    [
        ("not json", None, ": must be a non-empty list of messages"),
        ([{"role": "bot", "content": "hi"}], None, ", message 0: role 'bot' is not system/user/assistant"),
        ([{"role": "user", "content": 5}], None, ", message 0: content must be text or a list of parts, got int"),
        ([{"role": "user", "content": [{"type": "audio"}]}], None, ", message 0: content part .* not a text or image"),
        (MULTI_TURN[:3], None, r": 1 image placeholder\(s\) but 0 image\(s\)"),
        (MULTI_TURN, ["a.png"], r": 2 image placeholder\(s\) but 1 image\(s\)"),
        (MULTI_TURN[:2], ["a.png"], ": the last message must be a non-empty assistant turn"),
    ],
)
def test_bad_messages_rows_name_file_row_and_field(messages, images, message):
    schema = detect_schema(["messages", "images"], source="chat.jsonl")
    with pytest.raises(DataError, match=r"^chat\.jsonl, row 2, field 'messages'" + message):
        schema.to_conversation({"messages": messages, "images": images}, 2)


def test_context_joined_from_a_tab_separated_latin1_csv(tmp_path):
    table = tmp_path / "semart.csv"
    table.write_bytes("IMAGE_FILE\tAUTHOR\tDESCRIPTION\n1-a.jpg\tX\tPainted in Arles by Van Gogh\n".encode("latin-1"))
    context = load_context(str(table), "image=IMAGE_FILE")
    assert context.data_column == "image" and context.lookup("Images/1-a.jpg") == "Painted in Arles by Van Gogh"
    schema = detect_schema(["image", "question", "answer"])
    schema.context = context
    conv = schema.to_conversation({"image": "Images/1-a.jpg", "question": "Where?", "answer": "Arles"}, 0)
    assert user_parts(conv) == ["<img>", "Context: Painted in Arles by Van Gogh\n", "Where?"]
    plain = schema.to_conversation({"image": "2.jpg", "question": "Where?", "answer": "Paris"}, 1)
    assert user_parts(plain) == ["<img>", "Where?"] and "context" not in plain.meta
    with pytest.raises(DataError, match="join column 'KEY' not found; columns are: IMAGE_FILE, AUTHOR, DESCRIPTION"):
        load_context(str(table), "image=KEY")


def test_context_file_through_build_splits_names_a_missing_data_column(tmp_path):
    png(tmp_path / "1.png")
    path = write_rows(tmp_path / "d.json", [{"image": "1.png", "question": "Who?", "answer": "Monet"}])
    (tmp_path / "k.csv").write_text("image,context\n1.png,Impressionist\n")
    facts = family_spec("qwen2_vl").encoding
    splits = build_splits(data_args(str(path), context_file=str(tmp_path / "k.csv"), context_join_on="image"), facts)
    assert "context from" in splits.schema.describe()
    assert "Context: Impressionist" in user_parts(splits.preparer.conversation(splits.train[0], 0))[1]
    with pytest.raises(DataError, match="--context_join_on column 'painting' not found; columns are: image"):
        args = data_args(str(path), context_file=str(tmp_path / "k.csv"), context_join_on="painting=image")
        build_splits(args, facts)


def test_cut_prompt_removes_user_text_from_the_start_only():
    conv = detect_schema(["messages", "images"]).to_conversation({"messages": MULTI_TURN, "images": ["a", "b"]}, 0)
    cut = cut_prompt(conv, 9)  # "Colour?" (7) and 2 characters of "And this?"
    assert user_parts(cut) == ["<img>", "", "d this?", "<img>"]
    assert cut.messages[0] == conv.messages[0] and cut.answer == "blue" and cut.images == conv.images
