import gzip
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from speculor.errors import SpeculorError
from speculor.prompts import Prompt, load_prompt_set, load_prompts, render_prompt


def word_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer that prepends <s>, like Llama tokenizers do."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "USER:": 4, "ASSISTANT:": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=chat_template
    )


def test_humaneval_prompts_are_the_code_to_complete():
    prompts = load_prompt_set("humaneval")
    assert len(prompts) == 164
    assert prompts[0].id == "HumanEval/0"
    assert prompts[0].text.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert not prompts[0].chat
    assert load_prompts("humaneval", limit=3) == [p.text for p in prompts[:3]]


def test_spec_bench_and_mt_bench_use_the_first_turn():
    spec = load_prompt_set("spec-bench")
    mt = load_prompt_set("MT_Bench")
    assert (len(spec), len(mt)) == (480, 80)
    assert spec[:80] == mt
    assert mt[0] == Prompt(
        "81",
        "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences "
        "and must-see attractions.",
        "writing",
        chat=True,
    )


def test_limit_spreads_over_categories_in_file_order():
    sample = load_prompt_set("spec-bench", limit=15)
    assert [p.id for p in sample[:4]] == ["81", "82", "91", "92"]
    assert len({p.category for p in sample}) == 13
    assert [int(p.id) for p in sample] == sorted(int(p.id) for p in sample)


def test_user_file_with_prompt_or_turns(tmp_path):
    path = tmp_path / "mine.jsonl.gz"
    lines = [{"prompt": "def f():"}, {}, {"id": "x", "turns": ["Hi there", "And then?"], "category": "chat"}]
    text = "\n".join(json.dumps(line) for line in lines[:1]) + "\n\n" + json.dumps(lines[2]) + "\n"
    path.write_bytes(gzip.compress(text.encode()))
    assert load_prompt_set(path) == [Prompt("1", "def f():"), Prompt("x", "Hi there", "chat", chat=True)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "line 1: not valid JSON"),
        ('{"text": "a"}\n', "line 1: needs a non-empty 'prompt'"),
        ("", "no prompts"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SpeculorError, match=message):
        load_prompt_set(path)


def test_unknown_name_and_bad_limit():
    with pytest.raises(SpeculorError, match="unknown prompt set 'gsm9k'"):
        load_prompts("gsm9k")
    with pytest.raises(SpeculorError, match="limit"):
        load_prompts("humaneval", limit=0)


def test_render_uses_the_chat_template_without_a_second_bos():
    template = "{{ bos_token }}{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
    tokenizer = word_tokenizer(template)
    chat = Prompt("1", "hello", chat=True)
    rendered = render_prompt(chat, tokenizer)
    assert rendered == "USER: hello ASSISTANT:"
    assert tokenizer.encode(rendered) == [1, 4, 3, 5]
    assert render_prompt(Prompt("2", "hello"), tokenizer) == "hello"


def test_render_without_a_template_is_plain_text():
    assert render_prompt(Prompt("1", "hello", chat=True), word_tokenizer(None)) == "hello"
    assert render_prompt(Prompt("1", "hello", chat=True), None) == "hello"
