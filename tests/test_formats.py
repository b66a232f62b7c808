"""Every supported preference layout normalises to the same conversational triple."""

import re

import pytest

from alignpress.errors import AlignpressError
from alignpress.formats import RowError, check_columns, detect_format, normalise_row, parse_hh

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

# One row per layout (shapes from shared/reference/models-and-data.md), all meaning the same pair.
ROWS = {
    "capybara": {
        "source": "x", "prompt": "Hi?", "rating_chosen": 5, "rating_rejected": 1,
        "chosen": [U("Hi?"), A("Hello!")], "rejected": [U("Hi?"), A("Go away.")],
    },
    "conversational": {"prompt": [U("Hi?")], "chosen": [A("Hello!")], "rejected": [A("Go away.")]},
    "standard": {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
    "implicit": {"chosen": [U("Hi?"), A("Hello!")], "rejected": [U("Hi?"), A("Go away.")]},
    "hh": {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
    "system_question": {"system": "", "question": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
}
EXPECTED = {"prompt": [U("Hi?")], "chosen": [A("Hello!")], "rejected": [A("Go away.")]}


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_detect_and_normalise(fmt):
    row = ROWS[fmt]
    assert detect_format(list(row), [row]) == (fmt, {fmt: [0]})
    assert normalise_row(fmt, row) == EXPECTED


def test_ultrafeedback_layout_is_capybara():
    # UltraFeedback: string prompt, whole conversations in chosen/rejected, plus messages and scores.
    row = {"prompt": "Hi?", "prompt_id": "1", "chosen": [U("Hi?"), A("Hello!")], "rejected": [U("Hi?"), A("Go away.")],
           "messages": [U("Hi?"), A("Hello!")], "score_chosen": 8.0, "score_rejected": 3.0}
    assert detect_format(list(row), [row])[0] == "capybara"
    assert normalise_row("capybara", row) == EXPECTED


def test_multi_turn_capybara_keeps_history_in_prompt():
    row = {"prompt": "x", "chosen": [U("a"), A("b"), U("c"), A("good")], "rejected": [U("a"), A("b"), U("c"), A("bad")]}
    assert normalise_row("capybara", row) == {"prompt": [U("a"), A("b"), U("c")], "chosen": [A("good")], "rejected": [A("bad")]}


def test_system_question_with_system_prompt():
    row = {"system": "Be brief.", "question": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
    assert normalise_row("system_question", row)["prompt"] == [S("Be brief."), U("Hi?")]


def test_hh_multi_turn():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    assert parse_hh(text) == [U("a"), A("b"), U("c"), A("d")]


def test_implicit_strings_use_shared_prefix():
    row = {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}
    assert normalise_row("implicit", row) == {"prompt": [U("Q: 2+2? A: ")], "chosen": [A("4")], "rejected": [A("5")]}
    # Answers that begin with the same letters keep them: the prompt ends at the last shared word
    row = {"chosen": "Q: what is 0 plus 0?\nA: The answer is 0.", "rejected": "Q: what is 0 plus 0?\nA: That is hard."}
    assert normalise_row("implicit", row) == {"prompt": [U("Q: what is 0 plus 0?\nA: ")], "chosen": [A("The answer is 0.")],
                                              "rejected": [A("That is hard.")]}
    with pytest.raises(RowError, match="share no prefix"):
        normalise_row("implicit", {"chosen": "Yes, fine.", "rejected": "Yeah."})


def test_message_lists_written_as_text_are_refused():
    """A CSV export writes a message list as its repr (pandas) or JSON; read as the standard layout,
    the list's text became the answer and the conversation before it was lost."""
    chosen = [U("Hi?"), A("Hello!")]
    rows = [{"prompt": "Hi?", "chosen": str(chosen), "rejected": str([U("Hi?"), A("Go away.")])}]
    with pytest.raises(AlignpressError) as e:
        detect_format(["prompt", "chosen", "rejected"], rows, source="capy.csv")
    assert str(e.value) == ("capy.csv: row 0, column 'chosen' holds a list of {role, content} messages written as text (a CSV keeps no "
                            "lists); read the data from JSON lines or parquet, where lists stay lists: \"[{'role': 'user', 'content': 'Hi?'}, {'r\"")
    as_json = {"prompt": "Hi?", "chosen": "Hello!", "rejected": __import__("json").dumps([A("No.")])}
    with pytest.raises(RowError, match="^rejected holds a list of {role, content} messages written as text"):
        normalise_row("standard", as_json)
    # Text that only looks like it stays text: a list in an answer, brackets, the word role
    for text in ["[{1, 2}] is a set in a list", "[{'x': 1}] has no role", "[{role}] of the day", "[{'role': 'user'"]:
        assert normalise_row("standard", {"prompt": "p", "chosen": text, "rejected": "no"})["chosen"] == [A(text)]


@pytest.mark.parametrize(
    "fmt, row, reason",
    [
        ("capybara", {"prompt": "p", "chosen": [U("a"), A("b")], "rejected": [U("DIFFERENT"), A("c")]}, "differ before the last answer"),
        ("capybara", {"prompt": "p", "chosen": [U("a")], "rejected": [U("a")]}, "last message of chosen and rejected must be the assistant"),
        ("capybara", {"prompt": "p", "chosen": [A("b")], "rejected": [A("c")]},
         "^chosen and rejected are one assistant message each, with no prompt before them: with the prompt as text in the prompt column, that is format standard$"),
        ("conversational", {"prompt": [{"role": "robot", "content": "x"}], "chosen": [A("b")], "rejected": [A("c")]}, "role 'robot'"),
        ("conversational", {"prompt": [U("a")], "chosen": [U("b")], "rejected": [A("c")]}, "chosen must be exactly one assistant message"),
        ("hh", {"chosen": "Human: no leading blank line", "rejected": "x"}, "HH transcript has text before"),
    ],
)
def test_malformed_rows(fmt, row, reason):
    with pytest.raises(RowError, match=reason):
        normalise_row(fmt, row)


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(AlignpressError) as e:
        detect_format(["query", "answer"], [{"query": "a", "answer": "b"}], source="d.csv")
    assert str(e.value) == (
        "d.csv: cannot tell the preference format from the columns ['answer', 'query']: missing chosen, rejected. "
        "Every layout needs chosen and rejected (plus prompt, or question); rename them with a column mapping "
        "(data.datasets[].columns) or set data.format to one of: capybara, conversational, standard, implicit, hh, system_question"
    )
    # With the source's recipe section, the hint names its own fields (data.columns for data.dataset).
    for prefix in ("data", "data.datasets[1]"):
        with pytest.raises(AlignpressError) as e:
            detect_format(["query", "answer"], [{"query": "a", "answer": "b"}], source="d.csv", prefix=prefix)
        assert str(e.value).endswith(f"rename them with a column mapping ({prefix}.columns) or set {prefix}.format to one of: capybara, "
                                     "conversational, standard, implicit, hh, system_question")


@pytest.mark.parametrize(
    "columns, what",
    [
        (["prompt", "completion", "label"], "unpaired preference data (prompt, completion, label: TRL's KTO layout)"),
        (["messages"], "conversations for supervised fine-tuning (a messages column)"),
        (["text"], "supervised fine-tuning data (prompt/completion or text)"),
    ],
)
def test_layouts_that_are_not_pairs(columns, what):
    with pytest.raises(AlignpressError, match=re.escape(f"hold {what}, not preference pairs")):
        detect_format(columns, [dict.fromkeys(columns, "x")])


def test_a_text_prompt_with_one_assistant_message_per_answer_is_standard():
    """A prompt string and chosen/rejected as one assistant message each (TRL's layout with a text
    prompt) was detected as capybara, whose whole conversations then had no prompt: every row refused."""
    row = {"prompt": "What is 2 plus 3?", "chosen": [A("5.")], "rejected": [A("6.")]}
    assert detect_format(list(row), [row]) == ("standard", {"standard": [0]})
    assert normalise_row("standard", row) == {"prompt": [U("What is 2 plus 3?")], "chosen": [A("5.")], "rejected": [A("6.")]}
    # One side a whole conversation: capybara still, and its own refusals name what is wrong
    mixed = {**row, "rejected": [U("What is 2 plus 3?"), A("6.")]}
    assert detect_format(list(mixed), [mixed])[0] == "capybara"


def test_detection_uses_every_given_row_and_reports_disagreement():
    rows = [ROWS["capybara"]] * 3 + [{**ROWS["capybara"], "chosen": "Hello!", "rejected": "Go away."}]
    assert detect_format(list(ROWS["capybara"]), rows) == ("capybara", {"capybara": [0, 1, 2], "standard": [3]})


def test_wrong_value_type_names_row_and_column():
    rows = [{"prompt": "Hi?", "chosen": 5, "rejected": 1}, {"prompt": "Hi?", "chosen": 6, "rejected": 2}]
    with pytest.raises(AlignpressError) as e:
        detect_format(["prompt", "chosen", "rejected"], rows, source="d.parquet")
    assert str(e.value) == (
        "d.parquet: row 0, column 'chosen': an integer (5); a preference layout needs text or a list of "
        "{role, content} messages there (checked 2 rows, none fits a layout)"
    )


@pytest.mark.parametrize(
    "chosen, reason",
    [
        ([{"role": "bot", "content": "x"}, A("y")], "chosen has a message with role 'bot'; expected one of system, user, assistant"),
        ([U("x"), {"role": "assistant"}], "chosen has a message without 'content'"),
        ([U("x"), {"role": "assistant", "content": 3}], "chosen has a message whose content is an integer (3), not text"),
        ("text", "chosen is text ('text'), not a list of {role, content} messages"),
    ],
)
def test_malformed_messages_say_why(chosen, reason):
    with pytest.raises(RowError) as e:
        normalise_row("capybara", {"prompt": "p", "chosen": chosen, "rejected": [U("x"), A("z")]})
    assert str(e.value) == reason


@pytest.mark.parametrize(
    "rejected, reason",
    [
        (None, "rejected is missing (or null), not text or a list of {role, content} messages"),
        (7, "rejected is an integer (7), not text or a list of {role, content} messages"),
        ([], "rejected is an empty list, not a list of {role, content} messages"),
        ([U("x")], "rejected must be exactly one assistant message"),
    ],
)
def test_a_standard_rows_answer_may_be_text_or_messages(rejected, reason):
    """A JSON line without the key reaches normalise_row as None (datasets fills it in): said as
    "missing (or null)", and the standard layout's answer wants text or messages, not messages alone."""
    with pytest.raises(RowError) as e:
        normalise_row("standard", {"prompt": "p", "chosen": "c", "rejected": rejected})
    assert str(e.value) == reason


def test_missing_columns_named():
    with pytest.raises(AlignpressError) as e:
        check_columns("system_question", ["system", "chosen"], "data.jsonl")
    assert str(e.value) == (
        "data.jsonl: field 'data.format': format 'system_question' needs columns question, chosen, rejected; "
        "missing question, rejected (the data has: chosen, system)"
    )


def test_the_majority_layout_wins_even_when_the_first_row_is_odd():
    odd = {**ROWS["capybara"], "chosen": "Hello!", "rejected": "Go away."}
    rows = [odd] + [ROWS["capybara"]] * 3
    assert detect_format(list(ROWS["capybara"]), rows) == ("capybara", {"standard": [0], "capybara": [1, 2, 3]})


@pytest.mark.parametrize("answer", [[U("x"), A("y")], [A("x"), A("y")], [U("x")]])
def test_an_answer_is_exactly_one_assistant_message(answer):
    row = {"prompt": [U("Hi?")], "chosen": answer, "rejected": [A("No.")]}
    with pytest.raises(RowError, match="^chosen must be exactly one assistant message$"):
        normalise_row("conversational", row)
