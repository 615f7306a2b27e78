"""The PGI training objective: task-aligned assignment, CIoU, DFL and BCE per branch."""
from yolov9_jax.losses.assigner import Assignment, assign
from yolov9_jax.losses.boxes import ciou
from yolov9_jax.losses.pgi_loss import branch_loss, compute_loss, default_config

__all__ = ["Assignment", "assign", "branch_loss", "ciou", "compute_loss", "default_config"]
