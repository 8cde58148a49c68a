"""TOFU data shipped in the package: every split loads and validates; malformed files fail loudly."""

import json

import pytest
from test_tofu_fixtures import tiny_tokenizer

from llm.data import IGNORE_INDEX
from llm.tofu.data import DATA_DIR, SPLIT_KINDS, SPLITS, TofuItem, load_split
from llm.tofu.format import PLAIN_TEMPLATE, collate, format_example

SIZES = {"full": 4000, "forget01": 40, "forget05": 200, "forget10": 400, "retain90": 3600, "retain95": 3800,
         "retain99": 3960, "forget01_perturbed": 40, "forget05_perturbed": 200, "forget10_perturbed": 400,
         "retain_perturbed": 400, "real_authors": 100, "world_facts": 117, "real_authors_perturbed": 100,
         "world_facts_perturbed": 117}


def test_package_data_holds_every_split_and_the_licence():
    assert set(SPLITS) == set(SIZES)
    for name in SPLITS:
        assert (DATA_DIR / f"{name}.json").is_file()
    assert "MIT" in (DATA_DIR / "LICENSE.md").read_text()
    assert (DATA_DIR / "SOURCE.md").is_file()


@pytest.mark.parametrize("name", SPLITS)
def test_every_split_loads_with_its_fields(name):
    items = load_split(name)
    assert len(items) == SIZES[name]
    assert all(isinstance(item, TofuItem) and item.question and item.answer for item in items)
    has_perturbed = "perturbed_answer" in SPLIT_KINDS[name]
    assert all((item.perturbed_answers is not None) == has_perturbed for item in items)
    assert all((item.paraphrased_answer is not None) == ("paraphrased_answer" in SPLIT_KINDS[name]) for item in items)


def test_split_relations():
    """forget10 + retain90 partition full; the perturbed files carry the same questions as their split."""
    full, forget, retain = (load_split(n) for n in ("full", "forget10", "retain90"))
    assert {i.question for i in forget} | {i.question for i in retain} == {i.question for i in full}
    assert [i.question for i in load_split("forget10_perturbed")] == [i.question for i in forget]
    assert load_split("world_facts_perturbed")[0] == TofuItem("Where would you find the Eiffel Tower?", "Paris",
                                                              perturbed_answers=("Berlin", "London", "Madrid"))


def _write(tmp_path, name, lines):
    (tmp_path / f"{name}.json").write_text("\n".join(lines) + "\n")
    return tmp_path


GOOD = json.dumps({"question": "q", "answer": "a", "perturbed_answer": ["x", "y"]})


@pytest.mark.parametrize("bad, message", [
    ('{"question": "q", "answer": ', "line 2: not valid JSON"),
    (json.dumps({"question": "q", "perturbed_answer": ["x"]}), "line 2: missing field 'answer'"),
    (json.dumps({"question": "q", "answer": 3, "perturbed_answer": ["x"]}), "line 2: field 'answer' must be a string"),
    (json.dumps({"question": "q", "answer": "a", "perturbed_answer": []}),
     "line 2: field 'perturbed_answer' must be a non-empty list"),
    (json.dumps({"question": "q", "answer": "a", "perturbed_answer": "x"}),
     "line 2: field 'perturbed_answer' must be a non-empty list"),
    (json.dumps({"question": "q", "answer": "a", "perturbed_answer": ["x", None]}),
     "line 2: field 'perturbed_answer' holds a non-string"),
    ("[1, 2]", "line 2: expected a JSON object"),
])
def test_malformed_lines_name_file_line_and_field(tmp_path, bad, message):
    folder = _write(tmp_path, "world_facts_perturbed", [GOOD, bad])
    with pytest.raises(ValueError, match="world_facts_perturbed.json, " + message):
        load_split("world_facts_perturbed", data_dir=folder)


def test_unknown_split_empty_file_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown TOFU split 'forget50'"):
        load_split("forget50")
    with pytest.raises(ValueError, match="no items"):
        load_split("full", data_dir=_write(tmp_path, "full", [""]))
    with pytest.raises(FileNotFoundError):
        load_split("retain90", data_dir=tmp_path)


@pytest.mark.parametrize("chat", [True, False])
def test_format_example_labels_only_the_answer_and_eos(chat):
    tok = tiny_tokenizer(chat)
    example = format_example(tok, "what is the capital of france ?", "paris .")
    ids, labels = example["input_ids"], example["labels"]
    n_prompt = sum(label == IGNORE_INDEX for label in labels)
    assert len(ids) == len(labels) and labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer_ids = tok("paris .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[n_prompt:] == ids[n_prompt:] == answer_ids
    prompt = tok.decode(ids[:n_prompt])
    if chat:
        assert prompt == "<|user|> what is the capital of france ? <|assistant|>"  # the template, no extra BOS
    else:
        assert ids[0] == tok.bos_token_id  # the plain template gets the tokenizer's BOS
        assert PLAIN_TEMPLATE == "Question: {question}\nAnswer:"
        assert tok.decode(ids[1:n_prompt]) == "Question : what is the capital of france ? Answer :"


def test_collate_right_pads():
    tok = tiny_tokenizer(chat=True)
    examples = [format_example(tok, "who wrote a book ?", "she"),
                format_example(tok, "who ?", "an author born in paris")]
    batch = collate(examples, tok.pad_token_id)
    width = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"]
        assert batch["labels"][row, :n].tolist() == e["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}
