"""Training: the schedule as data, the run loop, push, the last-layer stage, evaluation."""

from .evaluate import accuracy_report, evaluate, predict_logits
from .last_layer import collect_similarities, optimise_last_layer
from .loop import TrainResult, Trainer, train
from .run_data import RunData, backbone_normalisation, build_model, build_run_data
from .push import push_prototypes
from .stages import STAGES, Step, plan_schedule, set_trainable

__all__ = [
    "STAGES",
    "RunData",
    "Step",
    "TrainResult",
    "Trainer",
    "accuracy_report",
    "backbone_normalisation",
    "build_model",
    "build_run_data",
    "collect_similarities",
    "evaluate",
    "optimise_last_layer",
    "plan_schedule",
    "predict_logits",
    "push_prototypes",
    "set_trainable",
    "train",
]
