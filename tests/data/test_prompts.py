import pytest
from helpers import encode_task

from spearfl.data.prompts import (
    FREE_FORM_INSTRUCTION,
    INSTRUCTIONS,
    REASONING_FREE_FORM_INSTRUCTION,
    REASONING_INSTRUCTIONS,
    REVISION_INSTRUCTION,
    ChatTemplateMissing,
    PromptFormat,
    cloze_context,
    encode_messages,
    plain_transcript,
    render_task,
    revision_messages,
    task_messages,
)
from spearfl.data.schema import Example
from spearfl.feedback.providers import make_oracle

FACTS = "Saturn's rings are made mostly of water ice."
SOLUTION = "Count the planets with rings: only Saturn is famous for them, so pick it."


def planets(num_options: int, label_style: str = "letters", gold: int = 2) -> Example:
    options = ("Mars", "Venus", "Saturn", "Mercury", "Earth")[:num_options]
    return Example(
        "t/planets", "Which planet is best known for its rings?", options, gold, label_style=label_style,
        facts=FACTS, solution=SOLUTION,
    )


def option_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:2] in {f"{c}." for c in "ABCDEFGHIJ123456789"} or line.startswith("- ")]


def test_three_options_are_labelled_a_to_c():
    text = render_task(planets(3))
    assert option_lines(text) == ["A. Mars", "B. Venus", "C. Saturn"]
    assert INSTRUCTIONS["letters"] in text


def test_five_options_are_labelled_a_to_e():
    assert option_lines(render_task(planets(5))) == ["A. Mars", "B. Venus", "C. Saturn", "D. Mercury", "E. Earth"]


def test_numbered_labels():
    text = render_task(planets(4, "numbers"))
    assert option_lines(text) == ["1. Mars", "2. Venus", "3. Saturn", "4. Mercury"]
    assert INSTRUCTIONS["numbers"] in text and INSTRUCTIONS["letters"] not in text


def test_text_labels_list_the_options_without_letters():
    example = Example("t/yes", "Can penguins fly?", ("Yes", "No"), 1, label_style="text", facts="Penguins are flightless.")
    text = render_task(example)
    assert option_lines(text) == ["- Yes", "- No"]
    assert "A." not in text and INSTRUCTIONS["text"] in text


def test_passage_comes_before_the_question_and_free_form_gets_its_instruction():
    example = Example("t/sum", "How many apples are left?", answer="18", passage="Sam had 20 apples and ate 2.",
                      solution="20 - 2 = 18.")
    text = render_task(example)
    assert text.index("Sam had 20 apples") < text.index("How many apples")
    assert FREE_FORM_INSTRUCTION in text
    assert "18" not in text and "20 - 2" not in text


@pytest.mark.parametrize("num_options", [3, 5])
def test_the_task_prompt_never_shows_facts_solution_or_gold(tokenizer, num_options):
    example = planets(num_options)
    for text in (render_task(example), tokenizer.decode(encode_task(tokenizer, example))):
        assert FACTS not in text and "water ice" not in text
        assert SOLUTION not in text and "Count the planets" not in text
        assert "Answer: C" not in text and "correct option is" not in text


def test_revision_messages_hold_the_task_previous_answer_and_feedback_only():
    example = planets(5)
    feedback = make_oracle("none", 2, False)(example, "Answer: A")
    messages = revision_messages(example, "  I think Mars.\nAnswer: A\n", feedback.text)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0] == task_messages(example)[0]
    assert messages[1]["content"] == "I think Mars.\nAnswer: A"
    assert messages[2]["content"] == f"{feedback.text} {REVISION_INSTRUCTION}"
    everything = "\n".join(m["content"] for m in messages)
    assert FACTS not in everything and SOLUTION not in everything
    assert "Answer: C" not in everything and "Saturn" not in messages[2]["content"]


def test_encode_task_uses_the_chat_template_once(tokenizer):
    example = planets(3)
    ids = encode_task(tokenizer, example)
    expected = tokenizer.apply_chat_template(task_messages(example), add_generation_prompt=True, tokenize=True)
    if hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert ids == list(expected)
    text = tokenizer.decode(ids)
    assert render_task(example) in text
    assert text.endswith("<|im_start|>assistant\n")
    assert ids.count(tokenizer.bos_token_id) == text.count(tokenizer.bos_token)  # no extra BOS in front


class TemplatelessTokenizer:
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(character) for character in text]


def test_models_without_a_chat_template_get_a_plain_transcript():
    messages = revision_messages(planets(3), "Answer: A", "Incorrect.")
    transcript = plain_transcript(messages)
    assert transcript.startswith("User: ") and transcript.endswith("\n\nAssistant:")
    assert "Assistant: Answer: A" in transcript
    assert encode_messages(TemplatelessTokenizer(), messages) == [ord(c) for c in transcript]


def test_answer_prefix_puts_the_marker_in_the_prompt(tokenizer):
    example = planets(3)
    plain, prefixed = PromptFormat(tokenizer, answer_prefix=False), PromptFormat(tokenizer, answer_prefix=True)
    marker = tokenizer.encode("Answer:", add_special_tokens=False)
    assert plain.task(example) == encode_task(tokenizer, example)
    assert prefixed.task(example) == encode_task(tokenizer, example) + marker
    assert plain.option_completion("B") == tokenizer.encode("Answer: B", add_special_tokens=False)
    assert prefixed.option_completion("B") == tokenizer.encode(" B", add_special_tokens=False)
    assert prefixed.answer_text(" B\n") == "Answer: B\n" and plain.answer_text(" B\n") == " B\n"
    revision = tokenizer.decode(prefixed.revision(example, " A\n", "Incorrect."))
    assert "Answer: A" in revision and revision.endswith("<|im_start|>assistant\nAnswer:")


def test_never_gives_a_base_model_plain_text_although_its_tokenizer_has_a_template(tokenizer):
    example = planets(3)
    plain = PromptFormat(tokenizer, answer_prefix=False, chat_template="never")
    text = tokenizer.decode(plain.task(example))
    assert "<|im_start|>" not in text
    assert text == plain_transcript(task_messages(example))
    assert PromptFormat(tokenizer, answer_prefix=False, chat_template="auto").task(example) == encode_task(tokenizer, example)
    assert PromptFormat(tokenizer, answer_prefix=False, chat_template="always").task(example) == encode_task(tokenizer, example)


def test_always_without_a_template_is_an_error_and_auto_falls_back_to_plain_text():
    messages = task_messages(planets(3))
    with pytest.raises(ChatTemplateMissing, match="chat_template"):
        encode_messages(TemplatelessTokenizer(), messages, "always")
    assert encode_messages(TemplatelessTokenizer(), messages, "auto") == [ord(c) for c in plain_transcript(messages)]


def test_a_config_asking_for_a_template_the_tokenizer_lacks_is_refused_naming_the_field():
    from helpers import make_config

    from spearfl.config import ConfigError
    from spearfl.runtime.setup import prompt_format_for

    with pytest.raises(ConfigError, match="prompt.chat_template"):
        prompt_format_for(make_config("prompt.chat_template=always"), TemplatelessTokenizer())


def test_reasoning_asks_for_steps_before_the_answer_line_and_counts_the_last_answer(tokenizer):
    example = planets(3)
    reasoning = PromptFormat(tokenizer, answer_prefix=False, reasoning=True)
    text = tokenizer.decode(reasoning.task(example))
    assert REASONING_INSTRUCTIONS["letters"] in text and INSTRUCTIONS["letters"] not in text
    assert REASONING_FREE_FORM_INSTRUCTION in render_task(Example("f/0", "2 + 3?", answer="5"), reasoning=True)
    assert reasoning.last_answer and not PromptFormat(tokenizer, answer_prefix=False).last_answer
    revision = tokenizer.decode(reasoning.revision(example, "Mars has no rings.\nAnswer: A\n", "Incorrect."))
    assert REASONING_INSTRUCTIONS["letters"] in revision
    oracle = make_oracle("none", 2, False, last_answer=True)
    assert oracle(example, "Maybe Answer: A\nNo: Saturn has rings.\nAnswer: C\n").correct
    assert not make_oracle("none", 2, False)(example, "Maybe Answer: A\nNo: Saturn has rings.\nAnswer: C\n").correct


def test_reasoning_and_an_answer_prefix_exclude_each_other():
    from helpers import make_config

    from spearfl.config import ConfigError

    with pytest.raises(ConfigError, match="reasoning and answer_prefix"):
        make_config("prompt.reasoning=true", "prompt.answer_prefix=true")


def test_cloze_context_is_the_datasets_own_or_question_answer():
    assert cloze_context(planets(3)) == "Question: Which planet is best known for its rings?\nAnswer:"
    with_passage = Example("t/p", "Is it wet?", ("Yes", "No"), 0, label_style="text", passage="Rain fell all day.")
    assert cloze_context(with_passage) == "Rain fell all day.\nQuestion: Is it wet?\nAnswer:"
    assert cloze_context(Example("t/s", "A cat has", ("four legs", "two"), 0, cloze_context="A cat has")) == "A cat has"
