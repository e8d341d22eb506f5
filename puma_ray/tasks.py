"""The two tasks and every rule that depends on which one a run does: one home (rating, ctr).

A task decides the metrics a report shows (primary first) and which direction is better, the label tokens read
at the answer position and the paper's template wording, the head a store trains, and the range predictions are
clamped to. Everything else asks `get_task(name)`.
"""
from __future__ import annotations

from dataclasses import dataclass

from puma_ray.errors import ConfigError

RATING_TEMPLATE = ("#Question: We have information about the user's preferences encoded in the feature <UserID>. "
                   "Predict the user's rating (as an integer between 1 and 5) for the movie/TV <ItemTitle>.\n#Answer:")
CTR_TEMPLATE = ("#Question: The user recently clicked the news: <History>. We have information about the user's "
                "preferences encoded in the feature <UserID>. Will the user click the news <ItemTitle>? "
                "Answer with \"Yes\" or \"No\".\n#Answer:")
# item-first wordings: the same words with the user's feature moved last, so that everything before it (question,
# item, history) is a per-item (per-history) prefix the prefix cache computes once, and after the prompt only a
# short answer cue runs per record (models/prefix_cache.py)
RATING_ITEM_FIRST_TEMPLATE = ("#Question: Predict the user's rating (as an integer between 1 and 5) for the movie/TV "
                              "<ItemTitle>. We have information about the user's preferences encoded in the feature "
                              "<UserID>.\n#Answer:")
CTR_ITEM_FIRST_TEMPLATE = ("#Question: The user recently clicked the news: <History>. Will the user click the news "
                           "<ItemTitle>? Answer with \"Yes\" or \"No\". We have information about the user's "
                           "preferences encoded in the feature <UserID>.\n#Answer:")
WORDINGS = ("paper", "item_first")


@dataclass(frozen=True)
class Task:
    name: str
    metrics: tuple[str, ...]  # what every report shows, the primary metric first
    higher_is_better: bool  # of the primary metric
    labels: tuple[str, ...]  # default label tokens, one token each, read out at the answer position
    template: str  # the paper's wording (Section 4.1)
    item_first_template: str  # the same words, the user's feature last (cache-friendly)
    head: str  # the head class a store trains for this task (models/heads.py)
    clamp: tuple[float, float]  # predictions outside it are never right: clamped before metrics

    @property
    def primary(self) -> str:
        return self.metrics[0]

    def wording(self, name: str) -> str:
        """The template text of a named wording: "paper" or "item_first"."""
        if name not in WORDINGS:
            raise ConfigError(f"unknown template wording {name!r}; known: {list(WORDINGS)}")
        return self.template if name == "paper" else self.item_first_template

    def better(self, a: float, b: float) -> bool:
        """Is primary-metric value a better than b?"""
        return a > b if self.higher_is_better else a < b


TASKS = {
    "rating": Task("rating", ("rmse", "mae"), False, ("1", "2", "3", "4", "5"), RATING_TEMPLATE,
                   RATING_ITEM_FIRST_TEMPLATE, "RatingHead",
                   (1.0, 5.0)),
    "ctr": Task("ctr", ("auc", "uauc"), True, ("Yes",), CTR_TEMPLATE, CTR_ITEM_FIRST_TEMPLATE, "CTRHead", (0.0, 1.0)),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None


def metric_direction(metric: str) -> bool:
    """True when a higher value of this (primary) metric is better; ConfigError for a metric no task ranks by."""
    for task in TASKS.values():
        if task.primary == metric:
            return task.higher_is_better
    raise ConfigError(f"unknown quality metric {metric!r}; known: {[t.primary for t in TASKS.values()]}")
