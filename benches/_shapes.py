"""Parameter shapes of the models the step benchmark uses, built without torchvision.

Only the shapes matter to an optimizer step outside forward/backward: how many tensors, of which
sizes, in which order (the order ``model.parameters()`` would give).
"""

from __future__ import annotations

Shape = tuple[int, ...]


def resnet18_shapes(width: int = 64, num_classes: int = 1000) -> list[Shape]:
    """ResNet-18's parameters in ``torchvision.models.resnet18().parameters()`` order.

    62 tensors (20 convolutions without bias, 20 BatchNorm weight/bias pairs, the fc weight and
    bias); 11,689,512 parameters at ``width=64``. A smaller ``width`` scales every stage's channel
    count (64, 128, 256, 512 -> width·(1, 2, 4, 8)) and keeps the 62 tensors.
    """
    shapes: list[Shape] = []

    def bn(c: int) -> None:
        shapes.extend([(c,), (c,)])

    shapes.append((width, 3, 7, 7))  # conv1
    bn(width)
    cin = width
    for stage in range(4):
        cout = width * 2**stage
        for block in range(2):
            stride2 = stage > 0 and block == 0
            shapes.append((cout, cin, 3, 3))  # conv1
            bn(cout)
            shapes.append((cout, cout, 3, 3))  # conv2
            bn(cout)
            if stride2 or cin != cout:
                shapes.append((cout, cin, 1, 1))  # downsample.0
                bn(cout)  # downsample.1
            cin = cout
    shapes.extend([(num_classes, cin), (num_classes,)])  # fc
    return shapes


def transformer_shapes(d_model: int = 256, n_blocks: int = 24, mlp_ratio: int = 4) -> list[Shape]:
    """A pre-LN transformer encoder stack without embeddings, in ``parameters()`` order.

    Per block (12 tensors, all with biases): LayerNorm 1 (weight, bias); fused qkv projection
    ``(3d, d)`` + bias; output projection ``(d, d)`` + bias; LayerNorm 2; MLP ``(r·d, d)`` + bias and
    ``(d, r·d)`` + bias. Then a final LayerNorm. 24 blocks: 290 tensors; at ``d_model=256`` that is
    ``24·(12d² + 13d) + 2d`` = 18,954,752 parameters, most tensors of 256–262,144 elements.
    """
    d, h = d_model, mlp_ratio * d_model
    shapes: list[Shape] = []
    for _ in range(n_blocks):
        shapes += [(d,), (d,)]  # ln1
        shapes += [(3 * d, d), (3 * d,)]  # attn.qkv
        shapes += [(d, d), (d,)]  # attn.proj
        shapes += [(d,), (d,)]  # ln2
        shapes += [(h, d), (h,)]  # mlp.fc1
        shapes += [(d, h), (d,)]  # mlp.fc2
    shapes += [(d,), (d,)]  # final ln
    return shapes


def numel(shapes: list[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for k in s:
            n *= k
        total += n
    return total


if __name__ == "__main__":
    r = resnet18_shapes()
    t = transformer_shapes()
    print(f"resnet18: {len(r)} tensors, {numel(r):,} params")
    print(f"transformer(d=256, 24 blocks): {len(t)} tensors, {numel(t):,} params")
