"""Turn your own documents into uniform synthetic Q-A pairs with a local Hugging Face model.

    python -m synthunlearn.experiment.synthesize --model DIR --documents FILE --output FILE
        [--template TEXT_OR_FILE] [--pairs-per-document N] [--max-new-tokens N] [--batch-size N]
        [--limit N] [--device auto]

This is the paper's data pipeline (an LLM reads a document and writes question-answer pairs about
it) and therefore also the source of its flaw: every pair comes out in the one format the prompt
asks for. The output is ``{"question", "answer", "document"}`` JSON Lines, which the training
launchers render as ``Question: {q}\\nAnswer: {a}`` (the ``forget`` set of ``launch/unlearn.py``,
or extra continued pre-training data).

Documents: a ``.jsonl`` file of ``{"text": ...}`` records, or any other text file, where blank
lines separate documents. The template is a string (or a path to a file holding one) with a
``{document}`` placeholder and optionally ``{n}`` (pairs wanted); it is sent as one user turn
through the model's chat template (or the plain default format of
:func:`synthunlearn.evaluation.generate.format_chat`). Generation is greedy.

The reply is parsed for ``Question: ... / Answer: ...`` blocks (``Q:``/``A:`` too, any case,
numbering like ``1.`` tolerated); at most ``--pairs-per-document`` pairs per document are kept and
exact duplicates dropped. Documents whose reply holds no parseable pair are counted and reported,
not silently padded: a model too weak to follow the template yields few pairs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from synthunlearn.errors import DataError, UserError

DEFAULT_TEMPLATE = (
    "Read the document and write {n} question-answer pairs about the facts it states. "
    "Use exactly this format for every pair:\n"
    "Question: <question>\nAnswer: <short answer>\n\n"
    "Document:\n{document}"
)

# "Question:" / "Q:" opens a pair and "Answer:" / "A:" its answer; an optional list number before.
_PAIR_RE = re.compile(
    r"^[ \t]*(?:\d+[.)][ \t]*)?(?:question|q)[ \t]*:[ \t]*(?P<q>.+?)[ \t]*\n+"
    r"[ \t]*(?:answer|a)[ \t]*:[ \t]*(?P<a>.+?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE)


def parse_pairs(text: str) -> List[Tuple[str, str]]:
    """Every ``Question: ...`` line directly followed by an ``Answer: ...`` line in ``text``."""
    pairs = []
    for match in _PAIR_RE.finditer(text):
        question, answer = match.group("q").strip(), match.group("a").strip()
        if question and answer:
            pairs.append((question, answer))
    return pairs


def read_documents(path) -> List[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--documents {path}: no such file")
    if path.suffix == ".jsonl":
        docs = []
        # Lines of the file, split at "\n" only, as the training loader (synthunlearn.data.sources)
        # reads JSON Lines: str.splitlines() would also split at U+2028, U+0085 and other
        # characters that valid JSON strings may hold unescaped, and reject a valid record.
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                line = _decode(raw, path, number)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise DataError(f"{path}:{number}: invalid JSON ({error})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{number}: expected an object with a string field 'text'")
                docs.append(record["text"])
        return [d for d in docs if d.strip()]
    data = path.read_bytes()
    text = _decode(data, path, None)
    blocks = re.split(r"\n[ \t]*\n", text)
    return [b.strip() for b in blocks if b.strip()]


def _decode(data: bytes, path: Path, number: Optional[int]) -> str:
    """``data`` as UTF-8, or a DataError naming the line (``number``, or counted in ``data``)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = number if number is not None else data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                        "save the file as UTF-8") from None


# Endings of the files a template is usually kept in: a --template value with one of them (or
# with a directory separator) and no {document} is a file path, even when no such file exists.
_TEMPLATE_SUFFIXES = (".txt", ".md", ".j2", ".jinja", ".tmpl", ".tpl", ".prompt")


def load_template(value: Optional[str]) -> str:
    if value is None:
        return DEFAULT_TEMPLATE
    candidate = Path(value)
    try:
        is_file = len(value) < 4096 and candidate.is_file()
    except (OSError, ValueError):  # e.g. a long one-line template: "file name too long"
        is_file = False
    if is_file:
        try:
            template = candidate.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--template {value}: cannot read the file ({error})") from None
        if "{document}" not in template:
            raise UserError(f"--template {value}: the file must contain the placeholder {{document}}")
        return template
    if "{document}" not in value:
        looks_like_path = "\n" not in value and (
            "/" in value or "\\" in value or value.lower().endswith(_TEMPLATE_SUFFIXES))
        if looks_like_path:
            # Most likely a mistyped template file: say so, not that the text lacks a placeholder.
            raise UserError(f"--template {value}: no such file (resolved to {candidate.absolute()}); give "
                            "an existing template file or the template text itself, with {document}")
        raise UserError("--template: must contain the placeholder {document}")
    return value


def synthesize(model, tokenizer, documents: Sequence[str], *, template: str = DEFAULT_TEMPLATE,
               pairs_per_document: int = 3, max_new_tokens: int = 128, batch_size: int = 8) -> Tuple[List[dict], dict]:
    """Q-A records for ``documents`` and statistics (documents, replies without a pair, pairs)."""
    from synthunlearn.evaluation.generate import format_chat, generate_responses

    prompts = []
    for doc in documents:
        # str.replace, not str.format: documents and user templates may contain braces. {n} is
        # filled in before the document goes in, so a document's own "{n}" text stays as written.
        content = template.replace("{n}", str(pairs_per_document)).replace("{document}", doc)
        prompts.append(format_chat(tokenizer, [{"role": "user", "content": content}]))
    replies = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 stop_strings=())
    records, empty, seen = [], 0, set()
    for index, reply in enumerate(replies):
        pairs = parse_pairs(reply)[:pairs_per_document]
        if not pairs:
            empty += 1
        for question, answer in pairs:
            if (question, answer) in seen:
                continue
            seen.add((question, answer))
            records.append({"question": question, "answer": answer, "document": index})
    stats = {"documents": len(documents), "documents_without_pairs": empty, "pairs": len(records)}
    return records, stats


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face causal-LM directory")
    parser.add_argument("--documents", required=True, help=".jsonl of {\"text\"} or a text file (blank-line separated)")
    parser.add_argument("--output", required=True, help="output .jsonl of {\"question\", \"answer\", \"document\"}")
    parser.add_argument("--template", default=None, help="prompt template (string or file) with {document} and optional {n}")
    parser.add_argument("--pairs-per-document", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from synthunlearn.modeling import check_model_dir

        template = load_template(args.template)
        documents = read_documents(args.documents)[:args.limit]
        if not documents:
            raise DataError(f"--documents {args.documents}: no documents")
        if not Path(args.model).is_dir():
            raise UserError(f"--model {args.model}: not a model directory")
        # Safetensors weights only and no shipped code, as for every model the trainer loads.
        check_model_dir(args.model, "--model", trust_remote_code=False)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True).to(device).eval()
        records, stats = synthesize(model, tokenizer, documents, template=template,
                                    pairs_per_document=args.pairs_per_document,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(json.dumps(stats))
    if stats["pairs"] == 0:
        print("warning: no reply held a 'Question: ... / Answer: ...' pair; a stronger model or a "
              "template closer to its training format is needed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
