"""A ResNet-style CNN for 3x32x32 images, as a Margin model package.

Margin never imports this file in a service: a worker runs it inside a sandbox, calling
``build_model(**config)`` and training the module it returns in Margin's own loop. The optional
``metrics`` and ``example_inputs`` below are part of the contract too; with no ``loss``, the model is
trained with cross-entropy against the dataset's integer labels ``y``.
"""
import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two conv3x3 + BatchNorm layers and a shortcut (1x1 conv + BatchNorm where the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(channels_out),
            nn.ReLU(), nn.Conv2d(channels_out, channels_out, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(channels_out))
        reshapes = stride != 1 or channels_in != channels_out
        self.shortcut = (nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(channels_out)) if reshapes else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A stride-2 stem, a block at ``width`` channels, a stride-2 block at twice that, global average pooling and
    a linear head."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, images):
        return self.head(self.blocks(self.stem(images)).mean(dim=(2, 3)))


def build_model(width: int = 16, classes: int = 10) -> nn.Module:
    return ResNet(width, classes)


def metrics(outputs, batch):
    """Reported as val_top2_accuracy next to Margin's val_accuracy and val_loss."""
    top2 = outputs.topk(2, dim=1).indices
    return {"top2_accuracy": (top2 == batch["y"][:, None]).any(dim=1).float().mean().item()}


def example_inputs(batch_size: int):
    return torch.zeros(batch_size, 3, 32, 32)
