"""ResNet-18, ResNet-50, AlexNet, MobileNetV2 and the ViT for CIFAR in PyTorch, layer for layer as in cifar_jax.models.

torch only (no torchvision). Initialisation follows torchvision / PyTorch defaults, as the
Flax models do. Inputs are NCHW float tensors.
"""

from typing import Optional

import torch
from torch import nn

from cifar_jax.models.mobilenetv2 import CIFAR_INVERTED_RESIDUAL_SETTING
from cifar_jax.models.vit import LAYER_NORM_EPSILON

BN_MOMENTUM = 0.1  # PyTorch convention; Flax momentum 0.9
BN_EPS = 1e-5


def _bn(features):
    return nn.BatchNorm2d(features, eps=BN_EPS, momentum=BN_MOMENTUM)


def _kaiming_fan_out(module: nn.Module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_features, features, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, features, 3, stride, 1, bias=False)
        self.bn1 = _bn(features)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
        self.bn2 = _bn(features)
        _add_projection(self, in_features, features, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(_shortcut(self, x) + y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 with the stride, 1x1 expand by 4 (torchvision's ResNet v1.5)."""

    expansion = 4

    def __init__(self, in_features, features, stride):
        super().__init__()
        out = features * self.expansion
        self.conv1 = nn.Conv2d(in_features, features, 1, 1, 0, bias=False)
        self.bn1 = _bn(features)
        self.conv2 = nn.Conv2d(features, features, 3, stride, 1, bias=False)
        self.bn2 = _bn(features)
        self.conv3 = nn.Conv2d(features, out, 1, 1, 0, bias=False)
        self.bn3 = _bn(out)
        _add_projection(self, in_features, out, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(_shortcut(self, x) + y)


def _add_projection(block, in_features, out_features, stride):
    block.has_projection = stride != 1 or in_features != out_features
    if block.has_projection:
        block.downsample_conv = nn.Conv2d(in_features, out_features, 1, stride, 0, bias=False)
        block.downsample_bn = _bn(out_features)


def _shortcut(block, x):
    return block.downsample_bn(block.downsample_conv(x)) if block.has_projection else x


class ResNet(nn.Module):
    def __init__(self, num_classes=10, stage_sizes=(2, 2, 2, 2), block=BasicBlock,
                 widths=(64, 128, 256, 512), dropout_rate=0.0):
        super().__init__()
        self.dropout_rate = dropout_rate
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = _bn(64)
        self.block_names = []
        in_features = 64
        for stage, (blocks, width) in enumerate(zip(stage_sizes, widths)):
            for b in range(blocks):
                name = f"layer{stage + 1}_{b}"
                self.add_module(name, block(in_features, width, 2 if stage > 0 and b == 0 else 1))
                self.block_names.append(name)
                in_features = width * block.expansion
        self.fc = nn.Linear(in_features, num_classes)
        _kaiming_fan_out(self)

    def forward(self, x, dropout_rate: Optional[float] = None):
        p = self.dropout_rate if dropout_rate is None else dropout_rate
        x = torch.relu(self.bn1(self.conv1(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(nn.functional.dropout(x.mean(dim=(2, 3)), p, self.training))


class ResNet18(ResNet):
    pass


class ResNet50(ResNet):
    def __init__(self, num_classes=10, dropout_rate=0.0):
        super().__init__(num_classes, (3, 4, 6, 3), Bottleneck, dropout_rate=dropout_rate)


class AlexNet(nn.Module):
    def __init__(self, num_classes=10, dropout_rate=0.5, hidden=4096):
        super().__init__()
        self.dropout_rate = dropout_rate
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1)
        self.conv2 = nn.Conv2d(64, 192, 3, 1, 1)
        self.conv3 = nn.Conv2d(192, 384, 3, 1, 1)
        self.conv4 = nn.Conv2d(384, 256, 3, 1, 1)
        self.conv5 = nn.Conv2d(256, 256, 3, 1, 1)
        self.fc1 = nn.Linear(256 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x, dropout_rate: Optional[float] = None):
        p = self.dropout_rate if dropout_rate is None else dropout_rate
        pool = lambda y: nn.functional.max_pool2d(y, 2)  # noqa: E731
        x = pool(torch.relu(self.conv1(x)))
        x = pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.conv4(x))
        x = pool(torch.relu(self.conv5(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(nn.functional.dropout(x, p, self.training)))
        x = torch.relu(self.fc2(nn.functional.dropout(x, p, self.training)))
        return self.fc3(x)


class ConvBNReLU6(nn.Module):
    def __init__(self, in_features, features, kernel=1, stride=1, groups=1, activation=True):
        super().__init__()
        self.conv = nn.Conv2d(in_features, features, kernel, stride, (kernel - 1) // 2,
                              groups=groups, bias=False)
        self.bn = _bn(features)
        self.activation = activation

    def forward(self, x):
        x = self.bn(self.conv(x))
        return torch.clamp(x, 0, 6) if self.activation else x


class InvertedResidual(nn.Module):
    def __init__(self, in_features, features, stride, expansion):
        super().__init__()
        hidden = in_features * expansion
        self.expand = ConvBNReLU6(in_features, hidden, 1) if expansion != 1 else None
        self.depthwise = ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvBNReLU6(hidden, features, 1, activation=False)
        self.residual = stride == 1 and in_features == features

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=10, dropout_rate=0.2, setting=CIFAR_INVERTED_RESIDUAL_SETTING):
        super().__init__()
        self.dropout_rate = dropout_rate
        self.stem = ConvBNReLU6(3, 32, 3, 1)
        self.block_names = []
        in_features, index = 32, 0
        for t, c, n, s in setting:
            for i in range(n):
                name = f"block{index}"
                self.add_module(name, InvertedResidual(in_features, c, s if i == 0 else 1, t))
                self.block_names.append(name)
                in_features, index = c, index + 1
        self.head = ConvBNReLU6(in_features, 1280, 1)
        self.classifier = nn.Linear(1280, num_classes)
        _kaiming_fan_out(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x, dropout_rate: Optional[float] = None):
        p = self.dropout_rate if dropout_rate is None else dropout_rate
        x = self.stem(x)
        for name in self.block_names:
            x = getattr(self, name)(x)
        x = self.head(x).mean(dim=(2, 3))
        return self.classifier(nn.functional.dropout(x, p, self.training))


class TinyCNN(nn.Module):
    """cifar_jax/models/tiny.py: two conv + BN + ReLU blocks, global average pool, dropout, fc."""

    def __init__(self, num_classes=10, dropout_rate=0.2):
        super().__init__()
        self.dropout_rate = dropout_rate
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), _bn(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, 1, 1, bias=False), _bn(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x, dropout_rate: Optional[float] = None):
        p = self.dropout_rate if dropout_rate is None else dropout_rate
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3))
        return self.fc(nn.functional.dropout(x, p, self.training))


class SelfAttention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        n, t, width = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, width))


class EncoderBlock(nn.Module):
    def __init__(self, width, num_heads, mlp_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPSILON)
        self.attn = SelfAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPSILON)
        self.fc1, self.fc2 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """cifar_jax/models/vit.py: ViT-Lite-7/4 (patch 4, width 256, 7 blocks, 4 heads, MLP 512)."""

    def __init__(self, num_classes=10, dropout_rate=0.1, patch_size=4, width=256, depth=7,
                 num_heads=4, mlp_dim=512, image_size=32):
        super().__init__()
        self.dropout_rate = dropout_rate
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        tokens = (image_size // patch_size) ** 2 + 1
        self.pos_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, tokens, width),
                                                                std=0.02))
        self.block_names = [f"block{i}" for i in range(depth)]
        for name in self.block_names:
            self.add_module(name, EncoderBlock(width, num_heads, mlp_dim))
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPSILON)
        self.head = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x, dropout_rate: Optional[float] = None):
        p = self.dropout_rate if dropout_rate is None else dropout_rate
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
        for name in self.block_names:
            x = getattr(self, name)(x)
        x = self.norm(x)[:, 0]
        return self.head(nn.functional.dropout(x, p, self.training))


MODELS = {"resnet18": ResNet18, "alexnet": AlexNet, "mobilenetv2": MobileNetV2,
          "resnet50": ResNet50, "vit": ViT, "tiny": TinyCNN}


def get_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(sorted(MODELS))}.")
    return MODELS[name](**kwargs)
