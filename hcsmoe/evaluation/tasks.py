"""Multiple-choice accuracy through lm-evaluation-harness, on its tasks or on the bundled BIG-bench items."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from hcsmoe.errors import UserError
from hcsmoe.evaluation.scoring import context_length

TASK_DIR = Path(__file__).parents[1] / "lm_eval_tasks"


BUNDLED_TASKS = ("hcsmoe_strategyqa", "hcsmoe_social_iqa")


TASK_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")  # what lm-eval results are kept


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise UserError(f"multiple-choice tasks need lm-evaluation-harness ({error}); install hcsmoe[eval]")
    return lm_eval, HFLM, TaskManager


@lru_cache(maxsize=2)
def _task_manager(with_builtin: bool):
    """The bundled task definitions, plus lm-eval's own (about 10 s to index) only when a task needs them."""
    _, _, TaskManager = _lm_eval()
    return TaskManager(include_path=str(TASK_DIR), include_defaults=with_builtin)


def check_tasks(tasks: Sequence[str]):
    """The lm-eval TaskManager that knows every requested task; an unknown name is a UserError."""
    manager = _task_manager(with_builtin=any(t not in _task_manager(False).all_tasks for t in tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; bundled tasks: {', '.join(BUNDLED_TASKS)}, or any lm-eval task")
    return manager


def run_tasks(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 8) -> dict:
    """Zero-shot accuracy on lm-eval tasks: the bundled hcsmoe_* tasks read local files; any other name is
    an lm-eval task whose data lm-eval downloads. Returns {task: {"n", "acc", "acc_stderr"[, "acc_norm",
    "acc_norm_stderr"]}} for every task (and group) that reports accuracy."""
    lm_eval, HFLM, _ = _lm_eval()
    manager = check_tasks(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=context_length(model))
    try:
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=1000
        )
    except OSError as error:  # includes ConnectionError: lm-eval's own tasks download their data
        raise UserError(f"cannot load the data of task(s) {', '.join(tasks)}: {str(error).splitlines()[0]}")
    return {
        name: {"n": output["n-samples"].get(name, {}).get("effective")}
        | {metric: metrics[f"{metric},none"] for metric in TASK_METRICS if f"{metric},none" in metrics}
        for name, metrics in output["results"].items()
        if "acc,none" in metrics
    }
