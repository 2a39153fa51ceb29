"""Answer metrics for VQA-style evaluation, as torchmetrics ``Metric`` objects (sum states: DDP-safe).

- :class:`VQAAccuracy`: exact match after the standard VQA answer normalisation (:func:`normalize_answer`:
  lowercase, punctuation stripped, number words -> digits, articles dropped, whitespace collapsed).
  A question may have several accepted answers; a prediction is right when it matches any of them.
- :class:`ANLS`: average normalised Levenshtein similarity (DocVQA / ST-VQA): per question the best over
  its answers of ``1 - dist / max(len)``, zeroed when the normalised distance is >= 0.5.
- :class:`VQAMetrics`: one object per split for the LightningModule. It keeps both scores overall and per
  task, plus, for grid questions (ShapeGrid / TextGrid: ``meta["row"]``, ``meta["col"]``, 1-based as the
  synthetic generator records them), accuracy per grid cell. ``compute()`` returns a flat dict ready for
  ``self.log_dict({f"val/{k}": v ...})``; :func:`plot_cell_accuracy` draws a cell matrix as a heatmap.

Every state is a fixed-shape tensor reduced with ``sum`` (or ``max`` for the grid extent), so ranks sync
by an all-reduce and ``merge_state`` combines two objects exactly. Task names are fixed at construction
(states must have the same shape on every rank); questions of an unknown task count under ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.text import edit_distance

if TYPE_CHECKING:
    import lightning as L

DEFAULT_TASKS = ("shapegrid", "textgrid", "caption")
"""The synthetic benchmark's tasks (``datamodules.synthetic.TASKS``)."""
OTHER_TASK = "other"

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
}
_ARTICLES = {"a", "an", "the"}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_NON_DECIMAL_POINT = re.compile(r"(?<!\d)\.|\.(?!\d)")  # keep the point of 3.5, drop a sentence's full stop
_PUNCTUATION = re.compile(r"[^\w\s.]|_")


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: "The Two red circles." -> "2 red circles"."""
    text = _DIGIT_COMMA.sub("", text.lower().replace("\n", " ").replace("\t", " "))
    text = _PUNCTUATION.sub(lambda m: "" if m.group() == "'" else " ", text)  # "don't" -> "dont"
    text = _NON_DECIMAL_POINT.sub(" ", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(word for word in words if word not in _ARTICLES)


def _answers(answer: str | Sequence[str]) -> list[str]:
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers:
        raise ValueError("a question needs at least one ground-truth answer")
    return answers


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _answers(answers)))


def anls_scores(predictions: Sequence[str], answers: Sequence[str | Sequence[str]], threshold: float = 0.5) -> Tensor:
    """Per-question ANLS: max over answers of ``1 - NL`` with ``NL = lev / max(len)``, 0 when ``NL >= threshold``.

    Strings are compared lowercased with whitespace collapsed, as the DocVQA evaluation does.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    preds, targets, owner = [], [], []
    for index, (prediction, gts) in enumerate(zip(predictions, answers)):
        for gt in _answers(gts):
            preds.append(" ".join(prediction.lower().split()))
            targets.append(" ".join(gt.lower().split()))
            owner.append(index)
    scores = torch.zeros(len(predictions), dtype=torch.float64)
    if not preds:
        return scores
    distance = edit_distance(preds, targets, reduction="none").to(torch.float64)
    longest = torch.tensor([max(len(p), len(t), 1) for p, t in zip(preds, targets)], dtype=torch.float64)
    normalized = distance / longest
    similarity = torch.where(normalized < threshold, 1.0 - normalized, torch.zeros_like(normalized))
    return scores.scatter_reduce(0, torch.tensor(owner), similarity, reduce="amax")


class VQAAccuracy(Metric):
    """Exact-match accuracy on normalised answers (several accepted answers per question allowed)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> None:
        if len(predictions) != len(answers):
            raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
        self.correct += sum(exact_match(p, a) for p, a in zip(predictions, answers))
        self.total += len(predictions)

    def compute(self) -> Tensor:
        return (self.correct / self.total).float()


class ANLS(Metric):
    """Average normalised Levenshtein similarity with threshold ``threshold`` (0.5 in DocVQA / ST-VQA)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> None:
        self.score += anls_scores(predictions, answers, self.threshold).sum().to(self.score.device)
        self.total += len(predictions)

    def compute(self) -> Tensor:
        return (self.score / self.total).float()


class VQAMetrics(Metric):
    """Accuracy and ANLS overall, per task and per grid cell, for one split.

    ``update(predictions, metas)``: each meta has ``answer`` (str or list of accepted answers) and
    optionally ``task``, ``row`` / ``col`` (1-based grid position of the question) and the grid size as
    ``rows`` / ``cols`` (what ``datamodules.synthetic`` writes) or ``grid`` = (rows, cols). Cells are
    counted up to ``max_grid``; positions outside it are ignored for the cell matrix only.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        tasks: Sequence[str] = DEFAULT_TASKS,
        max_grid: tuple[int, int] = (8, 8),
        anls_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tasks = tuple(dict.fromkeys([*tasks, OTHER_TASK]))
        self.max_grid = tuple(max_grid)
        self.anls_threshold = anls_threshold
        n, (rows, cols) = len(self.tasks), self.max_grid
        f64 = torch.float64
        self.add_state("correct", default=torch.zeros(n, dtype=f64), dist_reduce_fx="sum")
        self.add_state("anls", default=torch.zeros(n, dtype=f64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n, dtype=f64), dist_reduce_fx="sum")
        self.add_state("cell_correct", default=torch.zeros(n, rows, cols, dtype=f64), dist_reduce_fx="sum")
        self.add_state("cell_total", default=torch.zeros(n, rows, cols, dtype=f64), dist_reduce_fx="sum")
        self.add_state("grid_extent", default=torch.zeros(n, 2, dtype=torch.long), dist_reduce_fx="max")

    def _task_index(self, meta: dict) -> int:
        task = meta.get("task") or OTHER_TASK
        return self.tasks.index(task) if task in self.tasks else self.tasks.index(OTHER_TASK)

    def update(self, predictions: Sequence[str], metas: Sequence[dict]) -> None:
        if len(predictions) != len(metas):
            raise ValueError(f"{len(predictions)} predictions for {len(metas)} metas")
        answers = [meta["answer"] for meta in metas]
        anls = anls_scores(predictions, answers, self.anls_threshold).to(self.anls.device)
        rows, cols = self.max_grid
        for index, (prediction, meta) in enumerate(zip(predictions, metas)):
            task = self._task_index(meta)
            hit = exact_match(prediction, meta["answer"])
            self.correct[task] += hit
            self.anls[task] += anls[index]
            self.total[task] += 1
            row, col = meta.get("row"), meta.get("col")
            if row is None or col is None or not (1 <= row <= rows and 1 <= col <= cols):
                continue
            self.cell_correct[task, row - 1, col - 1] += hit
            self.cell_total[task, row - 1, col - 1] += 1
            grid = meta.get("grid") or (meta.get("rows", row), meta.get("cols", col))
            extent = torch.tensor([min(max(grid[0], row), rows), min(max(grid[1], col), cols)], device=self.anls.device)
            self.grid_extent[task] = torch.maximum(self.grid_extent[task], extent)

    def compute(self) -> dict[str, Tensor]:
        """``accuracy``, ``anls``, ``count`` over all questions, and ``accuracy/<task>``, ``anls/<task>`` for
        every task that had a question (the same keys on every rank: computed after the sync)."""
        total = self.total.sum()
        out = {
            "accuracy": (self.correct.sum() / total).float(),
            "anls": (self.anls.sum() / total).float(),
            "count": total.float(),
        }
        for index, task in enumerate(self.tasks):
            if self.total[index] > 0:
                out[f"accuracy/{task}"] = (self.correct[index] / self.total[index]).float()
                out[f"anls/{task}"] = (self.anls[index] / self.total[index]).float()
        return out

    def _synced(self):
        """Context in which the states hold every rank's sum (a no-op outside DDP), as in ``compute()``."""
        return self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=True)

    def cell_accuracy(self, task: str) -> Tensor:
        """[rows, cols] accuracy per grid cell of ``task`` (NaN where no question was asked), sized to the
        largest grid seen for the task (0 x 0 when the task had no grid question). Call it on every rank."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this metric tracks {self.tasks}")
        index = self.tasks.index(task)
        with self._synced():
            rows, cols = (int(v) for v in self.grid_extent[index])
            correct = self.cell_correct[index, :rows, :cols].clone()
            total = self.cell_total[index, :rows, :cols].clone()
        return torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, float("nan"))).float()

    def cell_tasks(self) -> list[str]:
        """Tasks with at least one grid-cell question (the ones worth a heatmap). Call it on every rank."""
        with self._synced():
            asked = self.cell_total.sum(dim=(1, 2)) > 0
        return [task for task, has in zip(self.tasks, asked.tolist()) if has]


def plot_cell_accuracy(accuracy: Tensor, title: str = "accuracy per grid cell"):
    """Heatmap of a [rows, cols] cell-accuracy matrix (NaN cells left blank), as a matplotlib Figure.

    Built without pyplot, so it is safe in any process: ``logger.experiment.add_figure(tag, fig)`` or
    ``fig.savefig("cells.png")``.
    """
    from matplotlib.figure import Figure

    values = accuracy.detach().cpu().float().numpy()
    rows, cols = values.shape
    fig = Figure(figsize=(1.0 + 0.6 * max(cols, 1), 0.8 + 0.6 * max(rows, 1)))
    ax = fig.subplots()
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    for r in range(rows):
        for c in range(cols):
            if values[r, c] == values[r, c]:  # not NaN
                ax.text(c, r, f"{values[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if values[r, c] > 0.5 else "white")
    ax.set_xticks(range(cols), [str(c + 1) for c in range(cols)])
    ax.set_yticks(range(rows), [str(r + 1) for r in range(rows)])
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


class BenchmarkScores(Metric):
    """A VLMEvalKit benchmark's scores (``llava_uhd.eval.scoring``: the same rules as ``python -m llava_uhd.eval
    score``) for a validate/test split whose data is that benchmark's TSV (``--data.val_tsv``).

    ``update(predictions, indices)`` scores each prediction against its row at once and keeps, per row, three
    numbers (row position, hit, choice read) as ``cat`` states, so ranks gather them. ``compute()`` drops
    repeated rows (ranks pad their share with repeats to keep step counts equal) and aggregates: a flat dict of
    the overall numbers (``accuracy``, ``f1``, ``total``, ...), ``<metric>/<category>`` per category, ``count``
    and ``unparseable``. ``headline`` names the number a results table shows for this benchmark.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, benchmark, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from llava_uhd.eval.scoring import HEADLINE

        self.benchmark = benchmark
        self.position = {row["index"]: i for i, row in enumerate(benchmark.rows)}
        self.headline = HEADLINE[benchmark.kind]
        for name in ("rows", "hits", "choices"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], indices: Sequence[str]) -> None:
        from llava_uhd.eval.scoring import score_row

        if len(predictions) != len(indices):
            raise ValueError(f"{len(predictions)} predictions for {len(indices)} indices")
        positions, hits, choices = [], [], []
        for prediction, index in zip(predictions, indices):
            if str(index) not in self.position:
                raise KeyError(f"{self.benchmark.name}: no row with index {index!r}")
            score = score_row(self.benchmark, self.benchmark.by_index[str(index)], prediction)
            positions.append(self.position[str(index)])
            hits.append(score.hit)
            choices.append(score.choice)
        device = self.device
        self.rows.append(torch.tensor(positions, dtype=torch.long, device=device))
        self.hits.append(torch.tensor(hits, dtype=torch.float64, device=device))
        self.choices.append(torch.tensor(choices, dtype=torch.long, device=device))

    def compute(self) -> dict[str, Tensor]:
        from torchmetrics.utilities import dim_zero_cat

        from llava_uhd.eval.scoring import RowScore, aggregate

        rows, hits, choices = (dim_zero_cat(s).tolist() for s in (self.rows, self.hits, self.choices))
        seen: dict[int, RowScore] = {}
        for position, hit, choice in zip(rows, hits, choices):
            seen.setdefault(int(position), RowScore(float(hit), int(choice)))
        scored = [(self.benchmark.rows[p], seen[p]) for p in sorted(seen)]
        scores = aggregate(self.benchmark, scored)
        out = {name: torch.tensor(float(value)) for name, value in scores["overall"].items()}
        for category, values in scores["per_category"].items():
            for name, value in values.items():
                if name != "count":
                    out[f"{name}/{category}"] = torch.tensor(float(value))
        out["count"] = torch.tensor(float(scores["counts"]["scored"]))
        out["unparseable"] = torch.tensor(float(scores["counts"]["unparseable"]))
        return out


SPLITS = ("val", "test")


class GenerationScores(nn.Module):
    """Validate / test scores of generated answers: VQA metrics per split (questions with an ``answer``) and
    benchmark scores for rows of a benchmark TSV (``datamodules.tsv``), scored as ``python -m llava_uhd.eval
    score`` scores them. The benchmark metric is made on the split's first benchmark row, from its loader."""

    def __init__(self) -> None:
        super().__init__()
        self.vqa = nn.ModuleDict({split: VQAMetrics() for split in SPLITS})
        self.benchmark = nn.ModuleDict()

    def update(self, split: str, records: Sequence[dict], metas: Sequence[dict], loader: Any = None) -> None:
        """Score one batch's answers (``records`` from :func:`answer_samples`) against its ``meta``."""
        scored = [(r["answer"], m) for r, m in zip(records, metas) if m.get("answer") is not None]
        if scored:
            self.vqa[split].update([p for p, _ in scored], [m for _, m in scored])
        rows = [(r["answer"], m["index"]) for r, m in zip(records, metas) if m.get("benchmark")]
        if rows:
            self.benchmark_metric(split, loader).update([p for p, _ in rows], [i for _, i in rows])

    def benchmark_metric(self, split: str, loader: Any = None) -> BenchmarkScores:
        """The split's ``BenchmarkScores``, made on first use over the benchmark its loader reads."""
        if split not in self.benchmark:
            benchmark = getattr(getattr(loader, "dataset", None), "benchmark", None)
            if benchmark is None:
                raise ValueError(f"{split} batch rows name a benchmark, but the {split} loader reads no benchmark TSV")
            self.benchmark[split] = BenchmarkScores(benchmark).to(self.vqa[split].device)
        return self.benchmark[split]

    def log_epoch(self, module: L.LightningModule, split: str) -> None:
        """Log the split's scores through ``module`` (``<split>/<benchmark>/<metric>``, ``<split>/<metric>``),
        draw each grid task's per-cell accuracy into the logger (rank 0), then reset."""
        scores = self.benchmark[split] if split in self.benchmark else None
        if scores is not None and scores.update_called:
            values = scores.compute()
            module.log_dict({f"{split}/{scores.benchmark.name}/{k}": v for k, v in values.items()}, sync_dist=False)
            scores.reset()
        metric = self.vqa[split]
        if not metric.update_called:
            return
        values = metric.compute()
        module.log_dict({f"{split}/{k}": v for k, v in values.items()}, sync_dist=False)
        experiment = getattr(module.logger, "experiment", None)
        for task in metric.cell_tasks():
            cells = metric.cell_accuracy(task)
            if module.trainer.is_global_zero and hasattr(experiment, "add_figure"):
                figure = plot_cell_accuracy(cells, f"{split} {task}: accuracy per grid cell")
                experiment.add_figure(f"{split}/cell_accuracy/{task}", figure, module.global_step)
        metric.reset()
