"""Targets P(x|c) = a(x|c)·Φ(x,c): scorers, their products, distributional constraints, tasks."""

from .distributional import DistributionalConstraint, DualFit, InfeasibleConstraintError, fit_lambda
from .scorers import (AnyWord, BooleanScorer, ClassifierReward, CompilesAsPython, ProbabilityScorer, ProductScorer,
                      RegexMatch, RewardScorer, Scorer, ScorerError, VaderSentiment, WordPresent)
from .target import BaseLM, Target, TargetScores, load_contexts
from .tasks import Task, available_tasks, get_task

__all__ = ["AnyWord", "BaseLM", "BooleanScorer", "ClassifierReward", "CompilesAsPython", "DistributionalConstraint",
           "DualFit", "InfeasibleConstraintError", "ProbabilityScorer", "ProductScorer", "RegexMatch", "RewardScorer",
           "Scorer", "ScorerError", "Target", "TargetScores", "Task", "VaderSentiment", "WordPresent",
           "available_tasks", "fit_lambda", "get_task", "load_contexts"]
