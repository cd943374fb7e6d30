"""The CVR network (hashed embeddings → DCN-v2 cross layers → MLP → head) and its adapters.

The platform pretrains the whole network on its own data and freezes it. The
clean rooms then train only *gated LoRA adapters* (Hu et al., "LoRA", ICLR 2022)
on every linear layer, plus a bias offset on the head:

    y = W x + b + g · (α / r) · B A x            A: [r, in], B: [out, r], g: scalar gate

B starts at zero, so the adapted network starts exactly equal to the backbone;
the gate g (init 1) lets a layer's adapter be scaled as a whole. Adapters are a
small fraction of the backbone's parameters (see :func:`parameter_counts`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pcvr.models.features import EncodedFeatures

if TYPE_CHECKING:
    from pcvr.data.encoding import FeatureEncoding

__all__ = [
    "predict",
    "ModelConfig",
    "ModelShape",
    "CVRNet",
    "GatedLoRALinear",
    "attach_adapters",
    "adapter_parameters",
    "get_adapter_vector",
    "set_adapter_vector",
    "adapter_grad_vector",
    "parameter_counts",
    "save_backbone",
    "load_backbone",
    "backbone_digest",
]


@dataclass(frozen=True)
class ModelShape:
    """The network's size, which the platform chooses; the data decides the rest (:class:`ModelConfig`)."""

    embedding_dim: int = 16
    cross_layers: int = 2
    mlp_dims: tuple[int, ...] = (128, 64)
    lora_rank: int = 4
    lora_alpha: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network and of its adapters; saved beside the weights.

    ``buckets`` (embedding rows per categorical column) and ``num_dense`` come from
    the feature encoding (:meth:`for_encoding`); the rest is a :class:`ModelShape`.
    """

    buckets: tuple[int, ...]
    num_dense: int
    embedding_dim: int = ModelShape.embedding_dim
    cross_layers: int = ModelShape.cross_layers
    mlp_dims: tuple[int, ...] = ModelShape.mlp_dims
    lora_rank: int = ModelShape.lora_rank
    lora_alpha: float = ModelShape.lora_alpha

    def __post_init__(self) -> None:
        if not self.buckets and self.num_dense < 1:
            raise ValueError("a model needs at least one categorical or dense input")
        if (self.buckets and min(self.buckets) < 1) or self.num_dense < 0 or self.embedding_dim < 1 or self.lora_rank < 1:
            raise ValueError("buckets, embedding_dim and lora_rank must be >= 1, num_dense >= 0")

    @classmethod
    def for_encoding(cls, encoding: "FeatureEncoding", shape: ModelShape = ModelShape()) -> "ModelConfig":
        """The config of a model over ``encoding``'s columns, sized by ``shape``."""
        return cls(buckets=encoding.buckets, num_dense=encoding.num_dense, **dataclasses.asdict(shape))

    @property
    def shape(self) -> ModelShape:
        return ModelShape(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelShape)})

    @property
    def input_dim(self) -> int:
        return len(self.buckets) * self.embedding_dim + self.num_dense

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        return cls(**{**values, "buckets": tuple(values["buckets"]), "mlp_dims": tuple(values["mlp_dims"])})


class CrossLayer(nn.Module):
    """DCN-v2 cross layer (Wang et al., 2021): x_{l+1} = x_0 ⊙ (W x_l + b) + x_l."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class CVRNet(nn.Module):
    """Backbone: embeddings of hashed categorical fields + dense features → cross → MLP → logit."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.ModuleList(nn.Embedding(n, config.embedding_dim) for n in config.buckets)
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=0.05)
        self.cross = nn.ModuleList(CrossLayer(config.input_dim) for _ in range(config.cross_layers))
        layers: list[nn.Module] = []
        width = config.input_dim
        for hidden in config.mlp_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward(self, features: EncodedFeatures) -> torch.Tensor:
        """Logits of the clean conversion probability, shape [N]."""
        embedded = [table(features.categorical[:, i]) for i, table in enumerate(self.embeddings)]
        x0 = torch.cat([*embedded, features.dense], dim=1)  # [N, input_dim]
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.head(self.mlp(x)).squeeze(-1)


class GatedLoRALinear(nn.Module):
    """A frozen linear layer plus a gated low-rank update (module docstring)."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, with_bias_offset: bool = False) -> None:
        super().__init__()
        self.base = base
        for parameter in self.base.parameters():
            parameter.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.gate = nn.Parameter(torch.ones(()))
        self.bias_offset = nn.Parameter(torch.zeros(base.out_features)) if with_bias_offset else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x @ self.lora_a.T) @ self.lora_b.T  # [N, out]
        y = self.base(x) + self.gate * self.scale * update
        return y if self.bias_offset is None else y + self.bias_offset


def attach_adapters(backbone: CVRNet, *, seed: int = 0) -> CVRNet:
    """A copy of ``backbone`` with every parameter frozen and adapters on every linear layer.

    ``seed`` fixes the random A matrices (B is zero); the global RNG is left untouched.
    """
    model = copy.deepcopy(backbone)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    rank, alpha = backbone.config.lora_rank, backbone.config.lora_alpha
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        _wrap_linears(model, rank=rank, alpha=alpha)
    return model


def _wrap_linears(model: CVRNet, *, rank: int, alpha: float) -> None:
    for layer in model.cross:
        layer.linear = GatedLoRALinear(layer.linear, rank=rank, alpha=alpha)
    for i, module in enumerate(model.mlp):
        if isinstance(module, nn.Linear):
            model.mlp[i] = GatedLoRALinear(module, rank=rank, alpha=alpha)
    model.head = GatedLoRALinear(model.head, rank=rank, alpha=alpha, with_bias_offset=True)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters, in a fixed order (the wire order)."""
    return [p for p in model.parameters() if p.requires_grad]


def get_adapter_vector(model: nn.Module) -> torch.Tensor:
    """All adapter parameters flattened into one float32 vector."""
    return torch.cat([p.detach().reshape(-1) for p in adapter_parameters(model)]).to(torch.float32)


def set_adapter_vector(model: nn.Module, vector: torch.Tensor) -> None:
    """Load a flat vector (as from :func:`get_adapter_vector`) into the adapters."""
    params = adapter_parameters(model)
    expected = sum(p.numel() for p in params)
    if vector.ndim != 1 or vector.numel() != expected:
        raise ValueError(f"adapter vector has shape {tuple(vector.shape)}; expected ({expected},)")
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(vector[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def adapter_grad_vector(model: nn.Module) -> torch.Tensor:
    """The adapters' accumulated ``.grad`` flattened in wire order (zeros where absent)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in adapter_parameters(model)]
    ).to(torch.float32)


@torch.no_grad()
def predict(model: nn.Module, features: EncodedFeatures, *, batch_size: int = 65_536) -> np.ndarray:
    """Predicted conversion probabilities, float64, shape [N] (the platform's holdout and a clean room's split)."""
    model.eval()
    chunks = [
        torch.sigmoid(model(features.take(torch.arange(start, min(start + batch_size, len(features))))))
        for start in range(0, len(features), batch_size)
    ]
    return torch.cat(chunks).double().numpy()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Backbone (frozen) and adapter (trainable) parameter counts."""
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"backbone": sum(p.numel() for p in model.parameters()) - adapters, "adapters": adapters}


def save_backbone(model: CVRNet, directory: Path) -> None:
    """Write ``config.json`` and ``backbone.pt`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n")
    torch.save(model.state_dict(), directory / "backbone.pt")


def load_backbone(directory: Path) -> CVRNet:
    """Load a backbone saved by :func:`save_backbone`; every parameter frozen.

    Raises:
        ValueError: a file is missing, unreadable or does not hold a backbone (one line, naming it).
    """
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "backbone.pt"
    try:
        config = ModelConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{config_path}: not a backbone config: {_first_line(exc)}") from None
    model = CVRNet(config)
    try:
        model.load_state_dict(torch.load(weights_path, weights_only=True))
    except Exception as exc:  # torch raises many types on a corrupt or foreign file
        raise ValueError(f"{weights_path}: not a backbone saved by pcvr ({type(exc).__name__})") from None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def backbone_digest(model: CVRNet) -> bytes:
    """BLAKE2b-128 of a backbone's config and every weight (pass it before adapters are attached)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0" + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
