"""Losses, metrics, the trainer and UMS-Rep's fine-tuning strategies."""

from medmtl.engine.checkpoint import load_checkpoint, save_atomic
from medmtl.engine.losses import (ClassificationLoss, MultiTaskLoss, SegmentationLoss, TaskLosses, denoising_loss,
                                  detection_loss)
from medmtl.engine.metrics import (MetricAccumulator, classification_metrics, denoising_metrics, detection_metrics,
                                   segmentation_metrics)
from medmtl.engine.strategies import STRATEGIES, finetune, pretrain_representation
from medmtl.engine.trainer import TrainConfig, Trainer

__all__ = ["STRATEGIES", "finetune", "pretrain_representation", "ClassificationLoss", "MetricAccumulator", "MultiTaskLoss", "SegmentationLoss", "TaskLosses",
           "TrainConfig", "Trainer", "classification_metrics", "denoising_loss", "denoising_metrics",
           "detection_loss", "detection_metrics", "load_checkpoint", "save_atomic", "segmentation_metrics"]
