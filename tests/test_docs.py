"""README.md and docs/*.md say what the code does: every Python block users copy runs (here or in the test named by
its marker), every command of a user script parses with that script's own argument parser, every path and link
points at something that exists, and .ci/run runs exactly the README's set-up and test commands."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import transformers
from helpers import (
    DOCUMENTS,
    REPO_ROOT,
    RUN_GLUE,
    STUDENT,
    TEACHER,
    TINY_OFFICIAL_V2,
    FirstTokenTask,
    code_blocks,
    doc_block,
    first_token_classifier,
    load_script,
    perturb_parameters,
    tiny_config,
)
from transformers import HfArgumentParser, TrainingArguments

from modeling_deberta_custom import DebertaCustomForSequenceClassification, DebertaCustomModel

# Python blocks marked `<!-- test: NAME -->`, and the test that runs each.
BLOCK_TESTS = {
    "usage": "test_docs.py::test_usage_block_runs",
    "callbacks": "test_docs.py::test_trainer_blocks_run",
    "sift": "test_docs.py::test_trainer_blocks_run",
    "distillation": "test_docs.py::test_trainer_blocks_run",
    "peft": "test_docs.py::test_peft_block_runs",
    "sentence-transformers": "test_docs.py::test_sentence_transformers_block_runs",
    "serving": "test_serving.py::test_serving_snippet_runs",
}

# Files the docs name that other work in progress adds (the layout of the design notes). A test fails once one
# exists: then take it off this list, so that from then on a broken name is caught.
PENDING: set[str] = set()

TOP_FOLDERS = ("scripts", "examples", "experiments", "benchmarks", "docs", "tests", "configuration", "data", "metrics",
               "modeling_deberta_custom")
FOLDERS = "|".join(TOP_FOLDERS)
REPO_PATH = re.compile(rf"(?<![\w/.-])((?:{FOLDERS})/[\w./-]*\w)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def all_blocks():
    return [(document, language, code, marker) for document in DOCUMENTS
            for language, code, marker in code_blocks(document)]


# ----------------------------------------------------------------------------------------------------------------------
# Every Python block runs, or says why not
# ----------------------------------------------------------------------------------------------------------------------


def test_every_python_block_is_run_or_says_why():
    unmarked, unknown = [], []
    for document, language, code, marker in all_blocks():
        if language != "python":
            continue
        where = f"{document.relative_to(REPO_ROOT)}: {code.splitlines()[0]!r}"
        if marker is None or not marker.startswith(("test: ", "not run: ")):
            unmarked.append(where)
        elif marker.startswith("test: ") and marker[len("test: "):] not in BLOCK_TESTS:
            unknown.append(f"{where} ({marker})")
    assert not unmarked, ("Python blocks need `<!-- test: NAME -->` (and a test that runs them) or "
                          f"`<!-- not run: REASON -->` on the line above: {unmarked}")
    assert not unknown, f"markers with no test in BLOCK_TESTS: {unknown}"
    for name in BLOCK_TESTS:
        doc_block(name)  # exactly one block per name


@pytest.fixture(scope="module")
def tiny_spm_model(tmp_path_factory):
    """A small Unigram SentencePiece model trained on the bundled SST-2 sentences (stands in for DeBERTa-v3's)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    lines = (REPO_ROOT / "data" / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:2001]
    (folder / "text.txt").write_text("\n".join(line.split("\t")[0] for line in lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(folder / "text.txt"), model_prefix=str(folder / "spm"),
                                             vocab_size=300, model_type="unigram", minloglevel=2,
                                             user_defined_symbols=[], pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                             pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
                                             unk_piece="[UNK]")
    return folder / "spm.model"


def test_usage_block_runs(tmp_path, tiny_spm_model):
    """README "Use it in your own code", in a fresh process as a user runs it: the Hub id replaced by an official-layout
    folder written by transformers, the base preset by the tiny one, the spm.model by a small one."""
    official = tmp_path / "official"
    fields = {k: v for k, v in TINY_OFFICIAL_V2.items() if k != "model_type"}
    transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**fields)).save_pretrained(official)
    code = (doc_block("usage")
            .replace("path/to/deberta-v3-base/spm.model", str(tiny_spm_model))
            .replace("microsoft/deberta-v3-base", str(official))
            .replace("configuration/base.json", str(REPO_ROOT / "configuration" / "tiny.json")))
    report = ("{'reloaded': type(reloaded).__name__, 'mlm': type(mlm).__name__, 'transformers_files': "
              "sorted(os.listdir('for-transformers')), 'tokenizer_files': sorted(os.listdir('deberta-v3-tokenizer'))}")
    code += f"\nimport json, os; print(json.dumps({report}))\n"  # what the block left behind
    (tmp_path / "work").mkdir()
    (tmp_path / "usage.py").write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(tmp_path / "usage.py")], cwd=tmp_path / "work", env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # (where the package cannot be imported, the folder's own code loads: tests/test_remote_code.py)
    assert report["reloaded"] == "DebertaCustomForSequenceClassification", report
    assert report["mlm"] == "DebertaCustomForMaskedLM"
    assert "config.json" in report["transformers_files"] and "tokenizer.json" in report["tokenizer_files"]


class TrainsWhenBuilt(transformers.Trainer):
    """A Trainer that trains as soon as it is built, so that every `Trainer(...)` line of a block runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train()


def test_trainer_blocks_run(tmp_path, monkeypatch):
    """The README's callbacks block, docs/sift.md's and docs/distillation.md's: each Trainer they build trains two
    steps of the toy task with its callback."""
    monkeypatch.setattr(transformers, "Trainer", TrainsWhenBuilt)
    teacher = first_token_classifier(1, **TEACHER)
    teacher.save_pretrained(tmp_path / "teacher")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_steps=1)
    for name in ("callbacks", "sift", "distillation"):
        code = doc_block(name).replace("outputs/distill/sst2-teacher", str(tmp_path / "teacher"))
        model = first_token_classifier(**STUDENT)
        namespace = dict(model=model, student=model, args=args, train=FirstTokenTask(16), teacher=teacher)
        exec(compile(code, f"block {name}", "exec"), namespace)
        history = namespace["trainer"].state.log_history
        assert namespace["trainer"].state.global_step == 2, name
        expected_term = "sift_loss" if name == "sift" else "distill_kd_loss"
        assert expected_term in set().union(*history), (name, history)


def test_peft_block_runs():
    peft = pytest.importorskip("peft")
    model = DebertaCustomForSequenceClassification(tiny_config(num_labels=2))
    namespace = dict(model=model)
    exec(compile(doc_block("peft"), "block peft", "exec"), namespace)
    lora = namespace["lora"]
    assert isinstance(lora, peft.PeftModel)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert any("query_proj.lora_A" in name for name in trainable) and any("pooler" in name for name in trainable)


def test_sentence_transformers_block_runs(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO_ROOT / "data" / "tokenizer")
    folders = {"path/to/backbone-folder": DebertaCustomModel(tiny_config(vocab_size=len(tokenizer))),
               "path/to/one-label-classifier-folder": DebertaCustomForSequenceClassification(
                   tiny_config(vocab_size=len(tokenizer), num_labels=1))}
    code = doc_block("sentence-transformers")
    for placeholder, model in folders.items():
        folder = tmp_path / placeholder.split("/")[-1]
        perturb_parameters(model)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        code = code.replace(placeholder, str(folder))
    namespace = {}
    exec(compile(code, "block sentence-transformers", "exec"), namespace)
    assert namespace["encoder"].encode(["a"]).shape == (1, 32)
    assert "(2, 32)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Commands: user scripts parse their documented arguments; other files named exist
# ----------------------------------------------------------------------------------------------------------------------


def parse_run_glue(module, argv):
    module.parse_arguments(argv)


def parse_pretrain(module, argv):
    HfArgumentParser((module.PretrainingArguments, TrainingArguments)).parse_args_into_dataclasses(args=argv)


def parse_plain(module, argv):
    module.parse_args(argv)


SCRIPT_PARSERS = {
    "scripts/run_glue.py": parse_run_glue,
    "scripts/pretrain.py": parse_pretrain,
    "scripts/train_tokenizer.py": parse_plain,
    "scripts/export_onnx.py": parse_plain,
}


def shell_commands(code: str):
    """The commands of a bash block as argument lists: continuation lines joined, comments dropped, variables set in
    the block expanded ("$X" as one argument, $X split as the shell splits it)."""
    variables = {}
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            name, value = words[0].split("=", 1)
            variables[name] = value
            continue
        if not words:
            continue
        for name, value in variables.items():
            line = line.replace(f'"${name}"', shlex.quote(value)).replace(f"${name}", value)
        yield shlex.split(line, comments=True)


def documented_commands():
    """(document, script, argv) for every command in the bash blocks that runs a file of this repository."""
    found = []
    for document, language, code, marker in all_blocks():
        if language != "bash" or (marker or "").startswith("not run: "):
            continue
        for words in shell_commands(code):
            files = [i for i, word in enumerate(words) if re.fullmatch(rf"(?:{FOLDERS})/\S+\.py", word)]
            if files:
                found.append((document.relative_to(REPO_ROOT), words[files[0]], words[files[0] + 1:]))
    return found


def test_documented_commands_parse():
    commands = documented_commands()
    assert len([c for c in commands if c[1] == "scripts/run_glue.py"]) >= 5, commands  # the parser found them
    failures = []
    modules = {}
    for document, script, argv in commands:
        if script in PENDING:
            continue
        if not (REPO_ROOT / script).is_file():
            failures.append(f"{document}: {script} does not exist")
            continue
        parse = SCRIPT_PARSERS.get(script)
        if parse is None:
            continue  # examples, experiments and benchmarks: that the file exists is what is checked
        if script not in modules:
            modules[script] = load_script(REPO_ROOT / script)
        try:
            parse(modules[script], argv)
        except (SystemExit, ValueError) as error:
            failures.append(f"{document}: {script} {shlex.join(argv)}: {error!r}")
    for script in modules:
        sys.modules.pop(modules[script].__name__, None)
    assert not failures, "\n".join(failures)


def test_the_argument_check_can_fail():
    module = load_script(RUN_GLUE)
    try:
        with pytest.raises(ValueError, match="no_such_flag"):
            parse_run_glue(module, ["--task", "sst2", "--model_preset", "tiny", "--no_such_flag", "1"])
    finally:
        sys.modules.pop(module.__name__, None)


def test_paths_and_links_exist():
    missing, now_present = [], sorted(path for path in PENDING if (REPO_ROOT / path).exists())
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for path in set(REPO_PATH.findall(text)) - PENDING:
            if not (REPO_ROOT / path).exists():
                missing.append(f"{document.relative_to(REPO_ROOT)}: {path}")
        for target in set(LINK.findall(text)):
            if target.startswith(("http://", "https://", "#")):
                continue
            file, _, anchor = target.partition("#")
            resolved = (document.parent / file).resolve()
            if str(resolved.relative_to(REPO_ROOT)) in PENDING:
                continue
            if not resolved.exists():
                missing.append(f"{document.relative_to(REPO_ROOT)}: link {target}")
            elif anchor and anchor not in heading_anchors(resolved):
                missing.append(f"{document.relative_to(REPO_ROOT)}: link {target} (no such heading)")
    assert not missing, "\n".join(missing)
    assert not now_present, f"these now exist: remove them from PENDING in tests/test_docs.py: {now_present}"


def heading_anchors(markdown) -> set:
    """GitHub's anchors for the headings of a markdown file."""
    anchors = set()
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


# ----------------------------------------------------------------------------------------------------------------------
# CI runs what the README says
# ----------------------------------------------------------------------------------------------------------------------


def test_ci_runs_the_readme_commands():
    readme_lines = {line.strip() for language, code, _ in code_blocks(REPO_ROOT / "README.md")
                    if language == "bash" for line in code.splitlines()}
    ci_commands = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert any("pytest" in line for line in ci_commands) and any("ruff check" in line for line in ci_commands)
    assert any(line.startswith("python3 -m venv") for line in ci_commands)
    not_in_readme = [line for line in ci_commands if line not in readme_lines]
    assert not not_in_readme, f".ci/run runs commands the README does not show: {not_in_readme}"


def test_readme_is_short():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 220, f"README.md has {lines} lines: move detail to docs/"
