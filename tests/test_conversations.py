"""Conversations: each format and mapping, the loss masks token by token on SmolLM2's template
(no generation markers), on the same template with markers and on a second template, bad
conversations by file, row and turn, length limits, and evaluation prompts."""

import json
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset

from jobs import conversations
from jobs.config import DataConfig, ModelConfig
from jobs.data import DataError, encode, generation_prompt, load_examples
from jobs.data.driver import prepare
from jobs.demo_data import demo_conversations
from jobs.generate import encode_prompt
from jobs.prompting import Prompting

CORPUS = Path(__file__).parent / "corpus" / "data" / "bad-conversations.jsonl"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Remember: the blue locker, code 4821."},
    {"role": "assistant", "content": "Noted: blue, 4821."},
    {"role": "user", "content": "What was the code?"},
    {"role": "assistant", "content": "4821."},
]
# SmolLM2's template with transformers' {% generation %} markers around what the assistant writes.
MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Zephyr-style template: another layout, no markers, the end-of-turn token written as eos_token.
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2() -> Prompting:
    return Prompting.load(ModelConfig())


def _with_template(prompting: Prompting, template: str) -> Prompting:
    tokenizer = prompting.tokenizer.__class__.from_pretrained(prompting.tokenizer.name_or_path)
    tokenizer.chat_template = template
    return Prompting(tokenizer, prompting.kind, True)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _trained_runs(tokens: conversations.Tokens) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(tokens.input_ids, tokens.labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# --- formats ----------------------------------------------------------------------------------

def test_messages_sharegpt_and_alpaca_rows_read_as_conversations_and_prompts(tmp_path):
    messages = _write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}])
    sharegpt = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Remember: the blue locker, code 4821."},
        {"from": "gpt", "value": "Noted: blue, 4821."}, {"from": "human", "value": "What was the code?"},
        {"from": "gpt", "value": "4821."}]}])
    custom = _write_jsonl(tmp_path / "c.jsonl", [{"conversations": [
        {"from": "instructions", "value": "Be brief."}, {"from": "customer", "value": "Remember: the blue locker, code 4821."},
        {"from": "agent", "value": "Noted: blue, 4821."}, {"from": "customer", "value": "What was the code?"},
        {"from": "agent", "value": "4821."}]}])
    roles = {"instructions": "system", "customer": "user", "agent": "assistant"}
    for cfg in (DataConfig(path=str(messages)), DataConfig(path=str(sharegpt)), DataConfig(path=str(custom), roles=roles),
                DataConfig(path=str(custom), format="sharegpt", roles=roles)):
        examples, report = load_examples(cfg)
        assert json.loads(examples[0]["conversation"]) == CHAT, cfg
        assert examples[0]["target"] == "4821." and examples[0]["references"] == ["4821."]
        assert generation_prompt(examples[0]) == CHAT[:4]
        assert report["layout"] in ("messages", "sharegpt")
    alpaca = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                                  {"instruction": "Say hi.", "input": "", "output": "hi"}])
    examples, report = load_examples(DataConfig(path=str(alpaca)))
    assert report["layout"] == "alpaca"
    assert [(e["prompt"], e["target"]) for e in examples] == [("Add the numbers.\n\n2 and 3", "5"), ("Say hi.", "hi")]


def test_messages_are_detected_in_parquet_and_dataset_folders_and_a_json_array(tmp_path):
    rows = [{"id": f"c{i}", "messages": CHAT} for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "m.json").write_text(json.dumps(rows))
    for cfg in (DataConfig(path=str(tmp_path / "m.parquet")), DataConfig(path=str(tmp_path / "saved")),
                DataConfig(path=str(tmp_path / "m.json"), format="messages")):
        examples, report = load_examples(cfg)
        assert [json.loads(e["conversation"]) for e in examples] == [CHAT] * 3, cfg
        assert report["layout"] == "messages"


def test_the_configured_system_prompt_is_added_as_the_server_adds_it(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT[1:]}, {"messages": CHAT}])
    examples, _ = load_examples(DataConfig(path=str(path), system_prompt="Answer in French."))
    first, second = (json.loads(e["conversation"]) for e in examples)
    assert first[0] == {"role": "system", "content": "Answer in French."} and first[1:] == CHAT[1:]
    assert second == CHAT  # a conversation's own system prompt wins, as in serve/api.py


def test_tool_calls_and_tool_messages_are_kept_for_templates_that_use_them(tmp_path):
    call = [{"id": "c1", "type": "function", "function": {"name": "locker", "arguments": "{\"colour\": \"blue\"}"}}]
    rows = [{"messages": [{"role": "user", "content": "Code of the blue locker?"},
                          {"role": "assistant", "content": None, "tool_calls": call},
                          {"role": "tool", "tool_call_id": "c1", "content": "4821"},
                          {"role": "assistant", "content": "4821."}]}]
    examples, _ = load_examples(DataConfig(path=str(_write_jsonl(tmp_path / "t.jsonl", rows))))
    messages = json.loads(examples[0]["conversation"])
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert messages[2] == {"role": "tool", "content": "4821", "tool_call_id": "c1"}


# --- masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["smollm2", "marked", "zephyr"])
def test_only_assistant_turns_and_their_end_of_turn_token_carry_a_loss(smollm2, template):
    prompting = {"smollm2": smollm2, "marked": _with_template(smollm2, MARKED), "zephyr": _with_template(smollm2, ZEPHYR)}[template]
    tokenizer = prompting.tokenizer
    assert conversations.has_markers(tokenizer) == (template == "marked")
    tokens = conversations.tokens(tokenizer, CHAT, "assistant")
    assert tokens.input_ids == tokenizer(conversations.render(tokenizer, CHAT, False), add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token  # <|im_end|>: what generation stops on
    expected = [tokenizer(m["content"] + end, add_special_tokens=False)["input_ids"] for m in CHAT if m["role"] == "assistant"]
    assert _trained_runs(tokens) == expected  # token by token: each answer and its end-of-turn, nothing else
    last = conversations.tokens(tokenizer, CHAT, "last_assistant")
    assert _trained_runs(last) == expected[-1:]
    everything = conversations.tokens(tokenizer, CHAT, "all")
    assert everything.labels == everything.input_ids


def test_markers_and_turn_by_turn_rendering_give_the_same_labels(smollm2):
    for row in demo_conversations(20, seed=3):
        plain = conversations.tokens(smollm2.tokenizer, row["messages"], "assistant")
        marked = conversations.tokens(_with_template(smollm2, MARKED).tokenizer, row["messages"], "assistant")
        assert (plain.input_ids, plain.labels) == (marked.input_ids, marked.labels)


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_fix(smollm2):
    # Renders only the last two messages: a prefix of the conversation is not a prefix of its rendering.
    window = "{% for m in messages[-2:] %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with pytest.raises(conversations.TemplateError, match="generation %} markers"):
        conversations.tokens(_with_template(smollm2, window).tokenizer, CHAT, "assistant")


def test_a_template_without_end_of_turn_tokens_is_refused(smollm2):
    bare = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(conversations.TemplateError, match="without an end-of-turn token"):
        conversations.tokens(_with_template(smollm2, bare).tokenizer, CHAT, "assistant")


# --- train -> serve -------------------------------------------------------------------------

def test_the_served_prompt_is_the_training_examples_tokens_before_the_answer(smollm2, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", demo_conversations(30, seed=5))
    cfg = DataConfig(path=str(path), system_prompt="Be brief.")
    for example in load_examples(cfg)[0]:
        trained = encode(example, smollm2, cfg)
        served = conversations.prompt_ids(smollm2.tokenizer, generation_prompt(example))
        assert served == trained["input_ids"][: len(served)]
        answer = trained["labels"][len(served):]
        while answer[-1] == -100:  # the template's newline after the end-of-turn token has no loss
            answer.pop()
        assert -100 not in answer and smollm2.tokenizer.decode(answer) == example["target"] + "<|im_end|>"
        assert encode_prompt(generation_prompt(example), smollm2, cfg) == served


# --- bad conversations and lengths ------------------------------------------------------------

def test_bad_conversations_are_reported_by_file_row_and_turn(tmp_path):
    with pytest.raises(DataError) as failure:
        load_examples(DataConfig(path=str(CORPUS)))
    message = str(failure.value)
    for expected in (
        str(CORPUS),
        "row 2: turn 2: unknown role 'bot' (roles: system, user, assistant, tool)",
        "row 3: turn 1: user content: empty",
        "row 4: turn 2: assistant content: a list, expected text",
        "row 5: messages: no assistant turn to learn from",
        "row 6: messages: a str, expected a list of messages",
        "row 7: turn 3: assistant content: missing",
        "row 8: turn 1: a str, expected an object with 'role' and 'content'",
    ):
        assert expected in message, message
    assert "row 1:" not in message and "7 problem(s) in 8 row(s)" in message
    examples, report = load_examples(DataConfig(path=str(CORPUS), bad_rows="skip"))
    assert [e["row"] for e in examples] == [1] and report["bad_rows"] == 7


def test_sharegpt_names_outside_the_mapping_say_how_to_map_them(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "bard", "value": "hello"}]}])
    with pytest.raises(DataError, match=r"row 1: turn 2: unknown role 'bard' .*map it to one of them with data.roles"):
        load_examples(DataConfig(path=str(path)))


def _long_chat(exchanges: int) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(exchanges):
        messages += [{"role": "user", "content": f"Question {i}: " + "word " * 30}, {"role": "assistant", "content": f"Answer {i}."}]
    return messages


@pytest.mark.parametrize("truncation", ["drop_oldest_turns", "skip", "fail"])
def test_conversations_over_max_length_are_cut_skipped_or_refused_and_counted(smollm2, tmp_path, truncation):
    rows = [{"id": "short", "messages": _long_chat(1)}, {"id": "long", "messages": _long_chat(6)},
            {"id": "one-long-turn", "messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}]
    cfg = DataConfig(path=str(_write_jsonl(tmp_path / "d.jsonl", rows)), max_length=120, truncation=truncation,
                     validation_fraction=0)
    if truncation == "fail":
        with pytest.raises(DataError, match=r"2 train conversation\(s\) longer than data.max_length = 120 tokens \(rows 2, 3\)"):
            prepare(cfg, smollm2)
        return
    data = prepare(cfg, smollm2)
    stats = data.report["train"]
    assert all(len(ids) <= 120 for ids in data.train["input_ids"])
    if truncation == "skip":
        assert stats["rows"] == 1 and stats["too_long_skipped"] == 2 and stats["dropped_turns"] == 0
    else:  # the long conversation keeps its system prompt and latest exchanges; one turn alone cannot fit
        assert stats["rows"] == 2 and stats["too_long_skipped"] == 1 and stats["truncated"] == 1
        assert stats["dropped_turns"] > 0
        kept = smollm2.tokenizer.decode(data.train["input_ids"][1])
        assert "Be brief." in kept and "Answer 5." in kept and "Question 0:" not in kept


def test_conversations_need_a_chat_template(tiny_seq2seq, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 4)
    with pytest.raises(DataError, match="chat template"):
        prepare(DataConfig(path=str(path)), Prompting.load(ModelConfig(name=tiny_seq2seq)))


def test_a_template_that_renders_tool_calls_trains_the_call_and_not_the_tool_result(smollm2, tmp_path):
    tools = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
             "<tool_call>{{ c.function.name }}({{ c.function.arguments }})</tool_call>{% endfor %}{% else %}"
             "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    call = [{"id": "c1", "type": "function", "function": {"name": "locker", "arguments": "{\"colour\": \"blue\"}"}}]
    rows = [{"messages": [{"role": "user", "content": "Code of the blue locker?"},
                          {"role": "assistant", "content": None, "tool_calls": call},
                          {"role": "tool", "tool_call_id": "c1", "content": "4821"},
                          {"role": "assistant", "content": "4821."}]}]
    messages = json.loads(load_examples(DataConfig(path=str(_write_jsonl(tmp_path / "t.jsonl", rows))))[0][0]["conversation"])
    tokenizer = _with_template(smollm2, tools).tokenizer
    runs = [tokenizer.decode(r) for r in _trained_runs(conversations.tokens(tokenizer, messages, "assistant"))]
    assert runs == ['<tool_call>locker({"colour": "blue"})</tool_call><|im_end|>', "4821.<|im_end|>"]


def test_dropping_old_exchanges_keeps_the_system_prompt_and_an_answer():
    history = CHAT[:4]  # system, user, assistant, user: what evaluation generates from
    assert conversations.drop_oldest_exchange(history) is None  # no answer would be left to train on
    assert conversations.drop_oldest_exchange(history, keep_an_answer=False) == [CHAT[0], CHAT[3]]
    assert conversations.drop_oldest_exchange(CHAT) == [CHAT[0], *CHAT[3:]]
    assert conversations.drop_oldest_exchange(CHAT[3:]) is None
