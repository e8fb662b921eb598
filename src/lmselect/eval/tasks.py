"""The ten evaluation tasks, built from lm-evaluation-harness's own task configs but reading local files.

Every task object we evaluate is a harness ``ConfigurableTask`` built by the harness's own task factory from the
harness's own YAML (prompt template, answer choices, target, metrics, ``process_docs``). For offline runs we override
only *where the documents come from*:

* ``dataset_path: json`` + ``dataset_kwargs: {data_files: {split: <local file>}}`` (the ``datasets`` json loader),
* the split keys (``test_split`` / ``validation_split``) so the harness scores the split the local file holds,
* ``process_docs``: when the local file has a different schema from the harness's Hugging Face dataset, a converter
  to the native schema runs first and the harness's own ``process_docs`` (HellaSwag) after it.

Local files use the layout of the team's staged benchmark folder (``<dir>/sciq/sciq_validation.jsonl``, ...), so
``--task-data`` can point at a full copy and the bundled slices in ``data/tasks`` use exactly the same relative
names. Splits that differ from the harness's are recorded in every result (``LOCAL_TASKS[...].note``).

``tests/eval/test_task_identity.py`` checks, for every task, that our local task and the harness's built-in task
turn the same documents into identical requests (contexts and continuations).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from lmselect.artifacts import LmselectError, atomic_path, atomic_write_text
from lmselect.data.readers import iter_json_records

if TYPE_CHECKING:  # heavy imports stay lazy: `lmselect --help` must not import the harness
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

log = logging.getLogger("lmselect.eval")

# The headline suite (METHODS.md §6) and LAMBADA, which is reported but not averaged (it is the selection target).
HEADLINE_TASKS: tuple[str, ...] = (
    "sciq", "arc_easy", "arc_challenge", "logiqa", "openbookqa", "boolq", "hellaswag", "piqa", "winogrande",
)
ALL_TASKS: tuple[str, ...] = HEADLINE_TASKS + ("lambada_openai",)

# Sub-folders of ``lm_eval/tasks`` holding the YAML of our tasks: indexing only these takes ~0.1 s where a full
# ``TaskManager()`` scan of the ~15k harness tasks takes several seconds.
_HARNESS_TASK_DIRS: tuple[str, ...] = (
    "sciq", "arc", "logiqa", "openbookqa", "super_glue/boolq", "hellaswag", "piqa", "winogrande", "lambada",
)

_OLMES_PREFIX = "Question: "
_OLMES_SUFFIX = "\nAnswer:"
_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class LocalTask:
    """Where one task's documents live locally and how they map onto the harness's dataset schema.

    ``file`` is relative to the task-data directory (the staged-data layout). ``split`` is the split the file holds,
    ``harness_split`` the one the harness scores online; ``schema`` names the converter to the harness's native
    schema (``native`` = none needed); ``required`` lists fields every record must have.
    """

    task: str
    file: str
    split: str
    harness_split: str
    schema: str
    required: tuple[str, ...]
    note: str = ""


LOCAL_TASKS: dict[str, LocalTask] = {
    t.task: t
    for t in (
        LocalTask(
            "sciq", "sciq/sciq_validation.jsonl", "validation", "test", "native",
            ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
            note="SciQ test split not available offline: scores the validation split (same size, 1,000 items)",
        ),
        LocalTask(
            "arc_easy", "arc/ARC-Easy_test_olmes.jsonl", "test", "test", "olmes_arc", ("id", "query", "choices", "gold"),
            note="test split from the OLMES request dump, converted to the ai2_arc schema",
        ),
        LocalTask(
            "arc_challenge", "arc/ARC-Challenge_test_olmes.jsonl", "test", "test", "olmes_arc",
            ("id", "query", "choices", "gold"),
            note="test split from the OLMES request dump, converted to the ai2_arc schema",
        ),
        LocalTask(
            "logiqa", "logiqa/logiqa_test.jsonl", "test", "test", "logiqa_parsed",
            ("label", "context", "question", "options"),
            note="parsed jsonl + the EleutherAI/logiqa loader's normalisation (text.replace('.', '. ').strip())",
        ),
        LocalTask(
            "openbookqa", "openbookqa/openbookqa_main_test_olmes.jsonl", "test", "test", "olmes_openbookqa",
            ("id", "query", "choices", "gold"),
            note="test split from the OLMES request dump, converted to the openbookqa/main schema",
        ),
        LocalTask(
            "boolq", "boolq/boolq_validation.jsonl", "validation", "validation", "boolq",
            ("question", "passage", "answer"),
            note="BoolQ validation (google/boolq schema) mapped to the super_glue/boolq schema (label = int(answer))",
        ),
        LocalTask(
            "hellaswag", "hellaswag/hellaswag_validation.jsonl.gz", "validation", "validation", "native",
            ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        ),
        LocalTask(
            "piqa", "piqa/piqa_validation_hfschema.jsonl", "validation", "validation", "native",
            ("goal", "sol1", "sol2", "label"),
        ),
        LocalTask(
            "winogrande", "winogrande/winogrande_xl_validation.jsonl", "validation", "validation", "native",
            ("sentence", "option1", "option2", "answer"),
        ),
        LocalTask("lambada_openai", "lambada/lambada_test.jsonl", "test", "test", "native", ("text",)),
    )
}


# ----------------------------------------------------------------------------------------------------------------
# schema converters (local record -> the harness's Hugging Face schema); module level so `datasets` can hash them


def _strip_olmes_query(query: str) -> str:
    """``"Question: <q>\\nAnswer:"`` -> ``<q>`` (the OLMES dumps render the harness's own ARC/OBQA prompt)."""
    if not (query.startswith(_OLMES_PREFIX) and query.endswith(_OLMES_SUFFIX)):
        raise ValueError(f"OLMES query does not look like 'Question: ...\\nAnswer:': {query[:60]!r}")
    return query[len(_OLMES_PREFIX) : -len(_OLMES_SUFFIX)]


def olmes_to_arc(doc: dict[str, Any]) -> dict[str, Any]:
    """OLMES {id, query, choices, gold} -> ai2_arc {id, question, choices{text,label}, answerKey}.

    The letters are arbitrary: the harness uses ``choices.label.index(answerKey)`` only to find the gold index.
    """
    labels = list(_LETTERS[: len(doc["choices"])])
    return {
        "id": doc["id"],
        "question": _strip_olmes_query(doc["query"]),
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[int(doc["gold"])],
    }


def olmes_to_openbookqa(doc: dict[str, Any]) -> dict[str, Any]:
    """OLMES {id, query, choices, gold} -> openbookqa/main {id, question_stem, choices{text,label}, answerKey}."""
    labels = list(_LETTERS[: len(doc["choices"])])
    return {
        "id": doc["id"],
        "question_stem": _strip_olmes_query(doc["query"]),
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[int(doc["gold"])],
    }


def _logiqa_normalize(text: str) -> str:
    # The EleutherAI/logiqa loading script (the harness's dataset) applies exactly this to every text field.
    return text.replace(".", ". ").strip()


def logiqa_parsed_to_native(doc: dict[str, Any]) -> dict[str, Any]:
    """Parsed LogiQA {label: 0-3, context, question, options} -> EleutherAI/logiqa {label: 'a'-'d', ...}."""
    return {
        "label": "abcd"[int(doc["label"])],
        "context": _logiqa_normalize(doc["context"]),
        "question": _logiqa_normalize(doc["question"]),
        "options": [_logiqa_normalize(o) for o in doc["options"]],
    }


def boolq_to_super_glue(doc: dict[str, Any], idx: int) -> dict[str, Any]:
    """google/boolq {question, passage, answer: bool} -> super_glue/boolq {question, passage, idx, label: 0/1}."""
    return {"question": doc["question"], "passage": doc["passage"], "idx": int(idx), "label": int(bool(doc["answer"]))}


_CONVERTERS: dict[str, tuple[Callable[..., dict[str, Any]], bool]] = {
    # schema -> (converter, needs the row index)
    "olmes_arc": (olmes_to_arc, False),
    "olmes_openbookqa": (olmes_to_openbookqa, False),
    "logiqa_parsed": (logiqa_parsed_to_native, False),
    "boolq": (boolq_to_super_glue, True),
}


class ConvertThen:
    """A ``process_docs`` that maps local records to the native schema, then applies the harness's own one (if any)."""

    def __init__(self, schema: str, then: Callable[[Any], Any] | None = None) -> None:
        self.schema = schema
        self.then = then

    def __call__(self, dataset: Any) -> Any:
        fn, with_idx = _CONVERTERS[self.schema]
        # Never reuse a cached map result: `datasets` fingerprints module-level functions by name, so an edited
        # converter would silently come back stale from the cache. The files are small; convert in memory.
        out = dataset.map(
            fn, with_indices=with_idx, remove_columns=list(dataset.column_names),
            load_from_cache_file=False, keep_in_memory=True,
        )
        return self.then(out) if self.then is not None else out

    def __repr__(self) -> str:  # shows up in the harness's dumped task config
        return f"ConvertThen({self.schema!r}, then={getattr(self.then, '__qualname__', None)})"


# ----------------------------------------------------------------------------------------------------------------
# local files


def resolve_task_names(tasks: str | Iterable[str] | None) -> list[str]:
    """``None``/``"all"`` -> the 10 tasks; ``"headline"`` -> the 9 averaged ones; else validated names, in order."""
    if tasks is None:
        return list(ALL_TASKS)
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    out: list[str] = []
    for t in items:
        if not t:
            continue
        if t == "all":
            out += [x for x in ALL_TASKS if x not in out]
        elif t == "headline":
            out += [x for x in HEADLINE_TASKS if x not in out]
        elif t in LOCAL_TASKS:
            if t not in out:
                out.append(t)
        else:
            raise LmselectError(f"unknown eval task '{t}' (known: {', '.join(ALL_TASKS)}, or 'all' / 'headline')")
    if not out:
        raise LmselectError("no eval tasks given")
    return out


def read_local_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a local ``.jsonl`` / ``.jsonl.gz`` task file; bad lines raise ``LmselectError`` naming file:line."""
    out: list[dict[str, Any]] = []
    for _, rec in iter_json_records(path, what="task file"):
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


def local_task_file(task: str, task_data: str | Path) -> Path:
    """Path of ``task``'s local file under ``task_data``, checked to exist and to hold the expected fields."""
    spec = LOCAL_TASKS[task]
    root = Path(task_data)
    if not root.is_dir():
        raise LmselectError(f"{root}: task-data directory not found")
    path = root / spec.file
    if not path.is_file():
        raise LmselectError(f"{path}: task file for '{task}' not found (expected <task-data>/{spec.file})")
    first = read_local_records(path, limit=1)
    if not first:
        raise LmselectError(f"{path}: task file for '{task}' is empty")
    missing = [k for k in spec.required if k not in first[0]]
    if missing:
        raise LmselectError(f"{path}:1: '{task}' record lacks field(s) {', '.join(missing)} (schema {spec.schema})")
    return path


# ----------------------------------------------------------------------------------------------------------------
# harness task configs


@lru_cache(maxsize=1)
def harness_task_manager() -> TaskManager:
    """A harness ``TaskManager`` indexing only the folders of our ten tasks (their YAML, includes and functions)."""
    import lm_eval.tasks as lm_tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_tasks.__file__).resolve().parent
    dirs = [root / d for d in _HARNESS_TASK_DIRS if (root / d).is_dir()]
    return TaskManager(include_defaults=False, include_path=[str(d) for d in dirs])


def _entry(task: str) -> Any:
    tm = harness_task_manager()
    entry = tm.task_index.get(task)
    if entry is None:  # the harness moved a folder: fall back to its full index (slower, same configs)
        from lm_eval.tasks import TaskManager

        entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        import lm_eval

        raise LmselectError(f"task '{task}' not found in lm-evaluation-harness {lm_eval.__version__}")
    return entry


def harness_task_config(task: str) -> dict[str, Any]:
    """The harness's own resolved config for ``task`` (YAML + includes, ``!function`` entries resolved)."""
    entry = _entry(task)
    tm = harness_task_manager()
    # ``_load_full_config`` is the exact loader the harness's TaskFactory uses for ``tm.load([task])``.
    return tm._factory._load_full_config(entry, None)


def local_overrides(task: str, task_data: str | Path) -> dict[str, Any]:
    """Config overrides that make the harness's ``task`` read ``task_data``'s local file instead of the Hub."""
    spec = LOCAL_TASKS[task]
    path = local_task_file(task, task_data)
    base = harness_task_config(task)
    process_docs = base.get("process_docs")
    if spec.schema != "native":
        process_docs = ConvertThen(spec.schema, then=process_docs)
    ov: dict[str, Any] = {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {spec.split: str(path.resolve())}},
        # zero-shot: no training/few-shot split is read; score the split the local file holds
        "training_split": None,
        "validation_split": spec.split if spec.split == "validation" else None,
        "test_split": spec.split if spec.split == "test" else None,
        "process_docs": process_docs,
    }
    return ov


def build_tasks(
    tasks: Sequence[str], task_data: str | Path | None = None, *, online: bool = False
) -> dict[str, Task]:
    """Harness task objects for ``tasks``: local files under ``task_data``, or the harness's download (``online``).

    Built through the harness's own factory (``TaskFactory._build_task``), the same code path as
    ``TaskManager.load([name])``, with :func:`local_overrides` merged over the YAML config offline.
    """
    names = resolve_task_names(tasks)
    if not online and task_data is None:
        raise LmselectError("build_tasks: give task_data (a local task directory) or online=True")
    # validate every file before building anything, so a missing file fails in a second, not after other tasks load
    overrides = {t: (None if online else local_overrides(t, task_data)) for t in names}  # type: ignore[arg-type]
    tm = harness_task_manager()
    out: dict[str, Task] = {}
    for t in names:
        try:
            out[t] = tm._factory._build_task(_entry(t), overrides[t])
        except LmselectError:
            raise
        except Exception as e:  # datasets / harness errors on a file: one line naming the task and file
            where = LOCAL_TASKS[t].file if not online else "online dataset"
            msg = " ".join(str(e).split())[:300]
            raise LmselectError(f"task '{t}' ({where}): cannot load documents: {type(e).__name__}: {msg}") from e
    return out


def task_split_info(task: str, task_data: str | Path | None, online: bool) -> dict[str, Any]:
    """What a result for ``task`` was computed on: file, split, the harness's split, and a note when they differ."""
    spec = LOCAL_TASKS[task]
    if online:
        return {"source": "online", "split": spec.harness_split, "harness_split": spec.harness_split}
    info: dict[str, Any] = {
        "source": "local",
        "file": str(Path(task_data) / spec.file) if task_data is not None else spec.file,
        "split": spec.split,
        "harness_split": spec.harness_split,
        "schema": spec.schema,
    }
    if spec.note:
        info["note"] = spec.note
    return info


# ----------------------------------------------------------------------------------------------------------------
# export for plain `lm_eval --include_path`

EXPORT_PREFIX = "lmselect_"


def exported_task_name(task: str) -> str:
    """Name of ``task`` in exported configs (``lmselect_sciq``): distinct from the harness's own task of the same data,
    so ``--include_path`` adds a task instead of silently shadowing the built-in one that downloads."""
    return EXPORT_PREFIX + task


def export_task_configs(tasks: Sequence[str] | str | None, task_data: str | Path, out_dir: str | Path) -> list[str]:
    """Write task YAMLs under ``out_dir`` that plain ``lm_eval --include_path out_dir`` runs offline.

    Each ``<out>/<task>/<lmselect_task>.yaml`` *includes* the harness's own YAML (absolute path: prompt, choices,
    metrics and ``process_docs`` are the harness's, read from this installation) and overrides only the data source,
    as :func:`local_overrides` does in-process. The data file is copied next to it, converted to the harness's native
    schema where the local file's schema differs (that conversion is what ``ConvertThen`` does in-process). Returns
    the exported task names, in order.
    """
    import json
    import shutil

    import yaml


    names = resolve_task_names(tasks)
    files = {t: local_task_file(t, task_data) for t in names}  # validate every file before writing anything
    out_dir = Path(out_dir)
    exported = []
    for t in names:
        spec = LOCAL_TASKS[t]
        harness_yaml = Path(_entry(t).yaml_path).resolve()
        tdir = out_dir / t
        tdir.mkdir(parents=True, exist_ok=True)
        src = files[t]
        if spec.schema == "native":  # copied as is (.jsonl.gz too: the datasets json loader reads gzip itself)
            data = tdir / src.name
            with atomic_path(data) as tmp:
                shutil.copyfile(src, tmp)
        else:
            fn, with_idx = _CONVERTERS[spec.schema]
            data = tdir / (src.name.removesuffix(".gz").removesuffix(".jsonl") + f".{spec.schema}-native.jsonl")
            with atomic_path(data) as tmp, open(tmp, "w") as f:
                for i, rec in enumerate(read_local_records(src)):
                    f.write(json.dumps(fn(rec, i) if with_idx else fn(rec)) + "\n")
        cfg = {
            "include": str(harness_yaml),
            "task": exported_task_name(t),
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.split: str(data.resolve())}},
            "training_split": None,
            "validation_split": spec.split if spec.split == "validation" else None,
            "test_split": spec.split if spec.split == "test" else None,
        }
        header = (
            f"# lmselect export of the harness task '{t}' reading {src} (split {spec.split}; the harness scores "
            f"{spec.harness_split}).\n" + (f"# {spec.note}\n" if spec.note else "")
        )
        atomic_write_text(tdir / f"{exported_task_name(t)}.yaml", header + yaml.safe_dump(cfg, sort_keys=False))
        exported.append(exported_task_name(t))
    return exported
