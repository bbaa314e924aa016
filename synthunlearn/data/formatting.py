"""Record kinds, and how each becomes one training text with the character spans that carry loss.

A data set's kind is decided once, from its columns (first match wins):

``chat``  -- column ``messages``: a list of ``{"role": str, "content": str}`` turns, roles
    ``system`` / ``user`` / ``assistant`` (a tokenizer chat template may accept more). Loss on
    every assistant turn (its content and the end-of-turn tokens the format puts after it, i.e.
    EOS, so the model learns to stop); none on system/user turns or role headers. A record whose
    ``messages`` is null but which has ``prompt`` and ``response`` is read as
    ``[user: prompt, assistant: response]``, so one file may mix the two kinds.
``prompt_response`` -- columns ``prompt`` and ``response`` (strings): formatted exactly as the
    chat ``[user: prompt, assistant: response]``; loss on the response (+ EOS).
``qa`` -- columns ``question`` and ``answer`` (strings): the synthetic Q-A data. Rendered as
    PLAIN TEXT, never through a chat template::

        <bos>Question: {question}\\nAnswer: {answer}<eos>

    with loss on `` {answer}<eos>`` only. This is deliberate: the uniform ``Question:/Answer:``
    surface form is the synthetic pattern that continued pre-training imprinted and that
    unlearning must remove, so the forget loss has to see that exact text, not a chat rendering
    of it (constants :data:`QA_PROMPT`, :data:`QA_ANSWER`).
``text`` -- column ``text`` (string): raw documents, ``<bos>{text}<eos>``, loss on every token.

Other columns are ignored. Missing (null) or mistyped fields raise :class:`DataError` naming the
file (and line, for JSON Lines), the record index and the field.

Chat rendering: with a tokenizer that has a chat template, ``apply_chat_template`` renders the
conversation (the template supplies BOS and end-of-turn tokens). Assistant spans are found by
rendering prefixes: an assistant turn ``i`` covers the characters between the rendering of turns
``[0, i)`` with the generation prompt and the rendering of turns ``[0, i]`` (trailing whitespace
after the end-of-turn token excluded). This needs a template whose renderings of a prefix of the
conversation are prefixes of the whole rendering; templates that rewrite earlier turns are rejected
with a DataError. Without a chat template the default format is used (same as the tiny model's
template)::

    <bos><|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}<eos>\\n

(each turn ``<|role|>\\n{content}\\n``; ``<eos>`` is the tokenizer's EOS string, recognised as the
EOS token by the tokenizer; constants :data:`DEFAULT_TURN`, :data:`DEFAULT_GENERATION_PROMPT`).

Evaluation renders its prompts with :func:`render_chat` and prepends BOS by :func:`chat_gets_bos`,
the same two rules, so a prompt is token for token the prefix the model was fine-tuned on, with or
without a chat template (a second layout for evaluation would test the model on prompts it never
saw).

BOS/EOS: for ``qa``, ``text`` and the default chat format the tokenizer's BOS id is prepended (if
it has one; never labelled) and, for ``qa``/``text``, its EOS id appended (labelled). Token ids
are produced with ``add_special_tokens=False`` so a tokenizer's own post-processor cannot add a
second BOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from synthunlearn.errors import DataError

CHAT, PROMPT_RESPONSE, QA, TEXT = "chat", "prompt_response", "qa", "text"
# Kind -> required columns, in detection order.
KIND_COLUMNS = {
    CHAT: ("messages",),
    PROMPT_RESPONSE: ("prompt", "response"),
    QA: ("question", "answer"),
    TEXT: ("text",),
}

QA_PROMPT = "Question: {question}\nAnswer:"
QA_ANSWER = " {answer}"
DEFAULT_ROLES = ("system", "user", "assistant")
DEFAULT_TURN = "<|{role}|>\n{content}"  # + EOS for assistant turns, then "\n"
DEFAULT_GENERATION_PROMPT = "<|assistant|>\n"


@dataclass
class Formatted:
    """One example before tokenisation."""

    text: str
    # Half-open character ranges of ``text`` whose tokens carry loss.
    spans: list[tuple[int, int]] = field(default_factory=list)
    add_bos: bool = True
    add_eos: bool = False  # append the EOS id (labelled)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_gets_bos(tokenizer) -> bool:
    """Whether the BOS id is prepended to a chat rendering: yes in the default format, never under a
    chat template (the template renders its own BOS, or deliberately none)."""
    return not has_chat_template(tokenizer)


def _default_layout(messages: list[dict], eos_text: str, where: str, key: str) -> tuple[str, list[tuple[int, int]]]:
    """The default format's text of ``messages`` and the character spans of the assistant turns."""
    text, spans = "", []
    for j, m in enumerate(messages):
        if m["role"] not in DEFAULT_ROLES:
            raise DataError(f"{key}: {where}: field 'messages[{j}].role': {m['role']!r} is not "
                            f"one of {', '.join(DEFAULT_ROLES)} (the tokenizer has no chat template)")
        header = DEFAULT_TURN.format(role=m["role"], content="")
        if m["role"] == "assistant":
            start = len(text) + len(header)
            text += header + m["content"] + eos_text
            spans.append((start, len(text)))
        else:
            text += header + m["content"]
        text += "\n"
    return text, spans


def render_chat(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    """The text of a conversation as fine-tuning lays it out: the tokenizer's chat template if it has
    one, else the default format. With ``add_generation_prompt`` the text ends where the next
    assistant reply begins. The BOS id is not part of the text: prepend it when
    :func:`chat_gets_bos` says so."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    text, _ = _default_layout(messages, getattr(tokenizer, "eos_token", None) or "", "messages", "chat")
    return text + DEFAULT_GENERATION_PROMPT if add_generation_prompt else text


def detect_kind(columns, key: str, path) -> str:
    cols = set(columns)
    for kind, needed in KIND_COLUMNS.items():
        if all(c in cols for c in needed):
            return kind
    raise DataError(
        f"{key}: {path}: cannot tell the record kind from the fields {sorted(cols)}; expected "
        "'messages' (chat), 'prompt'+'response', 'question'+'answer' or 'text'")


def _string(record: dict, name: str, where: str, key: str, label: Optional[str] = None) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        got = "missing/null" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{key}: {where}: field {label or name!r}: expected a string, got {got}")
    return value


def _messages(record: dict, where: str, key: str) -> list[dict]:
    msgs = record.get("messages")
    if msgs is None and record.get("prompt") is not None:
        return [{"role": "user", "content": _string(record, "prompt", where, key)},
                {"role": "assistant", "content": _string(record, "response", where, key)}]
    if not isinstance(msgs, list) or not msgs:
        got = "missing/null" if msgs is None else (f"a {type(msgs).__name__}" if msgs else "empty")
        raise DataError(f"{key}: {where}: field 'messages': expected a non-empty list of "
                        f"{{role, content}} turns, got {got}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{key}: {where}: field 'messages[{j}]': expected an object with role "
                            f"and content, got a {type(m).__name__}")
        role = _string(m, "role", where, key, f"messages[{j}].role")
        content = _string(m, "content", where, key, f"messages[{j}].content")
        out.append({"role": role, "content": content})
    return out


class Formatter:
    """Turns records of one kind into :class:`Formatted` examples for one tokenizer."""

    def __init__(self, kind: str, tokenizer, key: str):
        self.kind = kind
        self.key = key
        self.tokenizer = tokenizer
        self.use_template = kind in (CHAT, PROMPT_RESPONSE) and has_chat_template(tokenizer)
        self.eos_text = getattr(tokenizer, "eos_token", None) or ""

    def __call__(self, record: dict, where: str) -> Formatted:
        if self.kind == TEXT:
            text = _string(record, "text", where, self.key)
            return Formatted(text, [(0, len(text))], add_bos=True, add_eos=True)
        if self.kind == QA:
            q = _string(record, "question", where, self.key)
            a = _string(record, "answer", where, self.key)
            prompt = QA_PROMPT.format(question=q)
            text = prompt + QA_ANSWER.format(answer=a)
            return Formatted(text, [(len(prompt), len(text))], add_bos=True, add_eos=True)
        if self.kind == PROMPT_RESPONSE:
            messages = [{"role": "user", "content": _string(record, "prompt", where, self.key)},
                        {"role": "assistant", "content": _string(record, "response", where, self.key)}]
        else:
            messages = _messages(record, where, self.key)
        if self.use_template:
            return self._templated(messages, where)
        return self._default_chat(messages, where)

    def _default_chat(self, messages: list[dict], where: str) -> Formatted:
        text, spans = _default_layout(messages, self.eos_text, where, self.key)
        return Formatted(text, spans, add_bos=True, add_eos=False)

    def _render(self, messages, where, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # template errors (e.g. an unsupported role) are data errors
            raise DataError(f"{self.key}: {where}: the tokenizer's chat template rejected the "
                            f"messages: {type(exc).__name__}: {exc}") from None

    def _templated(self, messages: list[dict], where: str) -> Formatted:
        text = self._render(messages, where, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], where, True) if i else ""
            upto = self._render(messages[: i + 1], where, False)
            if not (text.startswith(upto) and upto.startswith(before)):
                raise DataError(
                    f"{self.key}: {where}: cannot locate assistant turn {i}: the chat template does "
                    "not render conversation prefixes as prefixes of the whole conversation "
                    "(it rewrites earlier turns); use a different template or 'text' records")
            end = len(upto)
            while end > len(before) and upto[end - 1].isspace():
                end -= 1
            spans.append((len(before), end))
        return Formatted(text, spans, add_bos=False, add_eos=False)


def format_records(records, kind: str, tokenizer, key: str,
                   where: Callable[[int], str]) -> list[Formatted]:
    """Format every record of a ``datasets.Dataset`` (or list of dicts) of one ``kind``."""
    fmt = Formatter(kind, tokenizer, key)
    return [fmt(rec, where(i)) for i, rec in enumerate(records)]
