"""Knowledge distillation: train a smaller student on a teacher's softened outputs plus the hard labels."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from margin.common.errors import InvalidArgument
from margin.compression.recipe import DistillStep, student_spec
from margin.modelzoo.architectures import build_model
from margin.modelzoo.datasets import Split


def build_student(step: DistillStep, *, input_dim: int, num_classes: int) -> tuple[nn.Module, dict]:
    """The untrained student of a distill step and its full architecture spec
    (``build_model({**student_architecture, "family": student_family})``, input size and classes from the data
    where the step leaves them out)."""
    spec = student_spec(step, input_dim=input_dim, num_classes=num_classes)
    return build_model(spec), spec


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, alpha: float) -> torch.Tensor:
    """``alpha * T² * KL(p_teacher,T || p_student,T) + (1 - alpha) * CE(student, labels)``, where ``p_·,T`` is the
    softmax of the logits divided by ``T``; the ``T²`` keeps the soft term's gradients on the scale of the hard one."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature ** 2 * soft + (1.0 - alpha) * hard


def distill(teacher: nn.Module, student: nn.Module, data: Split, *, temperature: float, alpha: float, epochs: int,
            lr: float, batch_size: int = 64, seed: int = 0,
            after_epoch: Callable[[int], None] | None = None) -> nn.Module:
    """Train ``student`` in place (Adam) against the fixed ``teacher`` on ``data``'s training rows; returns it in
    eval mode. The teacher runs in eval mode once over the training data (its logits are cached)."""
    if temperature <= 0:
        raise InvalidArgument(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument(f"alpha must be in [0, 1], got {alpha}")
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise InvalidArgument("epochs must be >= 0, lr > 0 and batch_size >= 1")
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    teacher_was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        teacher_logits = torch.cat([teacher(x[i:i + 1024]) for i in range(0, len(x), 1024)]).float()
    teacher.train(teacher_was_training)
    with torch.no_grad():
        student.eval()
        probe = student(x[:2])
    if probe.shape[1] != teacher_logits.shape[1]:
        raise InvalidArgument(f"student has {probe.shape[1]} outputs, the teacher {teacher_logits.shape[1]}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    for epoch in range(1, epochs + 1):
        student.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad()
            loss = distillation_loss(student(x[idx]), teacher_logits[idx], y[idx], temperature=temperature,
                                     alpha=alpha)
            loss.backward()
            optimizer.step()
        if after_epoch is not None:
            after_epoch(epoch)
    student.eval()
    return student
