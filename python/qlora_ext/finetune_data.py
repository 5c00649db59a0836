"""The training data of ``qlora-ext finetune``: JSON lines read, checked line by line, tokenized with
their loss masks, and batched. Formats (one a line):

    {"text": ...}                        loss on every token
    {"prompt": ..., "response": ...}     loss on the response's tokens only
    {"prompt": ..., "completion": ...}   the same (TRL's names)
    {"messages": [{"role": ..., "content": ...}, ...]}
                                         rendered by the tokenizer's chat template; loss on the
                                         assistant turns only
    {"prompt": [messages], "completion": [messages]}
                                         TRL's conversational form: loss on the completion's
                                         assistant turns only

A malformed line is a DataError that names its file and line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


class DataError(ValueError):
    pass


def read_examples(path: Path) -> list[dict]:
    """The JSON lines of `path`, each one of ``{"text"}``, ``{"prompt", "response"}``, ``{"prompt",
    "completion"}`` (TRL's name; read as a response) or ``{"messages": [{"role", "content"}, ...]}``;
    each example keeps ``where`` (file:line) for the errors found later."""
    examples = []
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'no such file'}")
    with open(path, encoding="utf-8", errors="strict") as f:
        number = 0
        while True:
            number += 1
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8") from None
            if not line:
                break
            if not line.strip():
                continue
            examples.append(_example(json_line=line, where=f"{path}:{number}"))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return examples


_FORMATS = "'text', 'prompt' and 'response', 'prompt' and 'completion', or 'messages'"


def _example(json_line: str, where: str) -> dict:
    try:
        item = json.loads(json_line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: a line must be a JSON object, got {type(item).__name__}")
    keys = set(item)
    named = keys & {"text", "prompt", "response", "completion", "messages"}
    if named == {"text"}:
        fields = ("text",)
    elif named == {"prompt", "completion"} and isinstance(item["prompt"], list):
        # TRL's conversational prompt-completion: the completion's assistant turns are learned
        if not isinstance(item["completion"], list):
            raise DataError(f"{where}: 'prompt' is a list of messages, so 'completion' must be one too")
        prompt = _messages(item["prompt"], where, "prompt", need_assistant=False)
        completion = _messages(item["completion"], where, "completion")
        return {"messages": prompt + completion, "learn_from": len(prompt), "where": where}
    elif named == {"prompt", "response"} or named == {"prompt", "completion"}:
        fields = ("prompt", "response" if "response" in named else "completion")
    elif named == {"messages"}:
        return {"messages": _messages(item["messages"], where), "where": where}
    else:
        raise DataError(f"{where}: needs {_FORMATS}; it has {sorted(keys)}")
    for k in fields:
        if not isinstance(item[k], str):
            raise DataError(f"{where}: {k!r} must be a string, got {type(item[k]).__name__}")
    if not item[fields[-1]].strip():
        raise DataError(f"{where}: {fields[-1]!r} is empty")
    if len(fields) == 1:
        return {"text": item["text"], "where": where}
    return {"prompt": item["prompt"], "response": item[fields[1]], "where": where}


def _messages(messages, where: str, key: str = "messages", need_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a list of {{'role', 'content'}} objects, not empty")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content' strings")
    if need_assistant and not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: {key!r} has no assistant turn with content: nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize(examples: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example; labels -100 where no loss is taken (the prompt; in a
    conversation, every turn but the assistant's)."""
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        if "messages" in ex:
            ids, labels = _tokenize_chat(ex, tokenizer)
        elif "text" in ex:
            ids = tokenizer(ex["text"], add_special_tokens=True)["input_ids"]
            ids = ids + ([eos] if eos is not None else [])
            labels = list(ids)
        else:
            prompt = tokenizer(ex["prompt"], add_special_tokens=True)["input_ids"]
            response = tokenizer(ex["response"], add_special_tokens=False)["input_ids"] + (
                [eos] if eos is not None else []
            )
            ids = prompt + response
            labels = [-100] * len(prompt) + response
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == -100 for t in labels):
            continue  # a prompt that fills max_length leaves no token to learn from (its loss would be NaN)
        out.append((ids, labels))
    return out


def _tokenize_chat(ex: dict, tokenizer) -> tuple[list[int], list[int]]:
    """A conversation rendered by the tokenizer's chat template, labels on the assistant turns only.

    An assistant turn is the text that rendering messages[: i + 1] adds to rendering messages[:i]
    with the generation prompt (the template's "assistant:" header stays unlearned, its end-of-turn
    marker is learned); a token is labelled when it starts inside such a span (the fast tokenizer's
    character offsets). The template must render a conversation's beginnings as prefixes of it."""
    where, messages = ex["where"], ex["messages"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: a 'messages' line needs a chat template, and the tokenizer of --model has none "
                        "(set \"chat_template\" in its tokenizer_config.json, or give 'text' lines)")  # fmt: skip
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: 'messages' lines need a fast tokenizer (tokenizer.json) for the turns' offsets")

    def render(upto, generation_prompt=False):
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    text = render(len(messages))
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < ex.get("learn_from", 0):
            continue
        start, end = len(render(i, True)) if i else 0, len(render(i + 1))
        if i and not text.startswith(render(i, True)) or not text.startswith(render(i + 1)):
            raise DataError(f"{where}: the chat template does not render the conversation's first turns as a prefix "
                            "of the whole, so the assistant's tokens cannot be told apart")  # fmt: skip
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(s <= a < e for s, e in spans) else -100 for t, (a, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def batches(data, batch_size: int, pad_id: int, epoch_seed: int):
    """The epoch's batches in an order fixed by `epoch_seed`, padded on the right."""
    order = list(range(len(data)))
    random.Random(epoch_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield pad_batch([data[j] for j in order[i : i + batch_size]], pad_id)


def pad_batch(chunk, pad_id: int):
    width = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, (x, y) in enumerate(chunk):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return ids, labels, mask
