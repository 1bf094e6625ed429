"""DINO (4-scale) after the backbone: channel mapper, deformable encoder, two-stage query selection, decoder
with iterative box refinement and look-forward-twice, contrastive denoising (PAPER.md §3.3).

Data flows as in `piip.models.heads.detector`: images -> normalised, padded batch -> backbone pyramid at
strides 8/16/32 (`model.pyramid_strides`) -> `ChannelMapper` to 256 channels plus a stride-64 level -> encoder
-> top-k proposals -> decoder -> per-layer class logits and boxes -> losses (training) or the top 300
(class, query) pairs (evaluation). Each part computes what mmdet 2.x's `DINO` computes in the official
configs, so converted official checkpoints (`from_official`) give its detections; parameter names are
piip's own (`piip.models.convert.mmdet_dino` holds the renames). Everything is plain PyTorch: deformable
attention runs through `piip.models.backbone.deformable` (grid-sample, or a faster registered op).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import MLP, box_convert

from piip.errors import ConfigError
from piip.models.backbone.deformable import set_deformable_backend
from piip.models.checks import number_in, whole_number
from piip.models.heads.detector import Detector, stored_sizes
from piip.models.heads.dino_denoising import Denoising, inverse_sigmoid, make_denoising
from piip.models.heads.dino_losses import DINOCriterion, LossWeights
from piip.models.heads.dino_matching import MatchCosts
from piip.models.heads.dino_transformer import Decoder, Encoder, sine_position_encoding
from piip.models.heads.mask_rcnn import ImageBatcher, check_size_divisible

BACKBONE_STRIDES = [8, 16, 32]


@dataclass
class DINOConfig:
    """`task.module.detector` for `name: dino`; defaults are the official 4-scale DINO (image statistics in
    0-255 pixel units)."""

    num_queries: int = 900
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim: int = 256
    num_heads: int = 8
    num_levels: int = 4  # the backbone's 3 levels plus stride-2 convs on its last one
    num_points: int = 4
    ffn_dim: int = 2048
    num_dn: int = 100  # denoising queries per image (dynamic groups); 0 turns denoising off
    label_noise: float = 0.5
    box_noise: float = 1.0
    max_detections: int = 300
    image_mean: list[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    image_std: list[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    size_divisible: int = 32
    costs: dict[str, float] = field(default_factory=lambda: {"focal": 2.0, "l1": 5.0, "giou": 2.0})
    loss_weights: dict[str, float] = field(default_factory=lambda: {"focal": 1.0, "l1": 5.0, "giou": 2.0})

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DINOConfig:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"task.module.detector: unknown field(s) {unknown} for the DINO detector; expected some of "
                f"{sorted(known)}"
            )
        config = cls(**data)
        for name in ("label_noise", "box_noise"):
            number_in(getattr(config, name), f"task.module.detector.{name}", 0, None)
        for name in (
            "num_queries",
            "num_encoder_layers",
            "num_decoder_layers",
            "max_detections",
            "num_points",
        ):
            setattr(config, name, whole_number(getattr(config, name), f"task.module.detector.{name}"))
        config.num_dn = whole_number(config.num_dn, "task.module.detector.num_dn", minimum=0)
        if config.dim % config.num_heads or config.dim % 32:
            raise ConfigError(
                f"task.module.detector.dim={config.dim}: expected a multiple of num_heads "
                f"({config.num_heads}) and of 32 (GroupNorm in the channel mapper)"
            )
        for name, known_terms in (("costs", MatchCosts), ("loss_weights", LossWeights)):
            terms = {f.name for f in fields(known_terms)}
            wrong = sorted(set(getattr(config, name)) - terms)
            if wrong:
                raise ConfigError(f"task.module.detector.{name}: unknown term(s) {wrong}; expected {terms}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChannelMapper(nn.Module):
    """1x1 conv + GroupNorm(32) per backbone level, then stride-2 3x3 convs (+ GN) from the last backbone
    map for the extra levels (mmdet's `ChannelMapper` without activation)."""

    def __init__(self, in_channels: list[int], out_channels: int, num_levels: int) -> None:
        super().__init__()
        self.inputs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), nn.GroupNorm(32, out_channels))
            for c in in_channels
        )
        self.extra = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels[-1] if i == 0 else out_channels, out_channels, 3, 2, 1, bias=False),
                nn.GroupNorm(32, out_channels),
            )
            for i in range(num_levels - len(in_channels))
        )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [layer(x) for layer, x in zip(self.inputs, maps, strict=True)]
        for i, layer in enumerate(self.extra):
            out.append(layer(maps[-1] if i == 0 else out[-1]))
        return out


@dataclass
class HeadOutputs:
    """Per-layer predictions of the decoder queries (denoising ones first) and the encoder's top-k."""

    logits: torch.Tensor  # (layers, B, pad + K, C)
    boxes: torch.Tensor  # (layers, B, pad + K, 4) sigmoid (cx, cy, w, h) of each image's own size
    enc_logits: torch.Tensor  # (B, K, C)
    enc_boxes: torch.Tensor  # (B, K, 4)


class DINO(Detector):
    """DINO on a backbone whose pyramid has strides 8/16/32; `num_classes` object classes, no background."""

    name = "dino"
    predicts_masks = False

    def __init__(self, backbone: nn.Module, num_classes: int, config: DINOConfig) -> None:
        super().__init__(backbone)
        strides = getattr(backbone.pyramid, "strides", None)
        if strides != BACKBONE_STRIDES:
            raise ConfigError(
                f"task.backbone.pyramid_strides: DINO reads strides {BACKBONE_STRIDES}, the backbone "
                f"gives {strides} (set pyramid_strides: {BACKBONE_STRIDES} in the task's backbone)"
            )
        if config.num_levels < len(strides):
            raise ConfigError(f"task.module.detector.num_levels: expected at least {len(strides)}")
        check_size_divisible(backbone, config.size_divisible)
        self.config = c = config
        self.num_classes = num_classes
        self.batcher = ImageBatcher(c.image_mean, c.image_std, c.size_divisible)
        self.neck = ChannelMapper(backbone.pyramid.out_channels, c.dim, c.num_levels)
        self.level_embeds = nn.Parameter(torch.empty(c.num_levels, c.dim))
        layer = {"num_heads": c.num_heads, "num_levels": c.num_levels, "num_points": c.num_points}
        self.encoder = Encoder(c.num_encoder_layers, dim=c.dim, ffn_dim=c.ffn_dim, **layer)
        self.enc_output = nn.Linear(c.dim, c.dim)
        self.enc_output_norm = nn.LayerNorm(c.dim)
        self.query_embed = nn.Embedding(c.num_queries, c.dim)  # learned content queries
        self.label_embedding = nn.Embedding(num_classes, c.dim)  # denoising queries' content
        self.decoder = Decoder(c.num_decoder_layers, c.dim, ffn_dim=c.ffn_dim, **layer)
        # one class and one box head per decoder layer, and a last pair for the encoder's proposals
        self.class_heads = nn.ModuleList(
            nn.Linear(c.dim, num_classes) for _ in range(c.num_decoder_layers + 1)
        )
        self.box_heads = nn.ModuleList(MLP(c.dim, [c.dim, c.dim, 4]) for _ in range(c.num_decoder_layers + 1))
        self.criterion = DINOCriterion(num_classes, MatchCosts(**c.costs), LossWeights(**c.loss_weights))
        self.reset_parameters()
        backend = getattr(getattr(backbone, "config", None), "deformable_backend", "auto")
        set_deformable_backend(self, backend)  # the backbone's choice (model.deformable_backend)

    @classmethod
    def from_config(cls, backbone: nn.Module, num_classes: int, config: dict[str, Any]) -> DINO:
        return cls(backbone, num_classes, DINOConfig.from_dict(config))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mmdet's init: Xavier-uniform transformer matrices (deformable attention keeps its own init),
        N(0, 1) level embeddings and queries, Kaiming neck convs, class biases at prior 0.01, zero last box
        layers."""
        for part in (self.encoder, self.decoder, self.enc_output):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for module in self.modules():
            if hasattr(module, "sampling_offsets"):
                module.reset_parameters()
        nn.init.normal_(self.level_embeds)
        nn.init.normal_(self.query_embed.weight)
        for module in self.neck.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        prior = -math.log((1 - 0.01) / 0.01)
        for head in self.class_heads:
            nn.init.constant_(head.bias, prior)
        for head in self.box_heads:
            nn.init.zeros_(head[-2].weight)
            nn.init.zeros_(head[-2].bias)

    # -- the model --------------------------------------------------------------------------------------
    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Losses in training; in eval, the top `max_detections` boxes at each target's `orig_size`."""
        if self.training and targets is None:
            raise ValueError("DINO needs targets in training mode")
        original = stored_sizes(images, targets)
        batch, _ = self.batcher(images)
        sizes = [tuple(int(v) for v in s) for s in batch.image_sizes]
        maps = self.neck(self.backbone(batch.tensors).pyramid)
        if not self.training:
            outputs, _ = self.heads(maps, sizes)
            return self.detections(outputs, sizes, original)
        normalised = [normalise_target(t, size) for t, size in zip(targets, sizes, strict=True)]
        denoising = self.denoising(maps, [t["labels"] for t in normalised], [t["boxes"] for t in normalised])
        outputs, denoising = self.heads(maps, sizes, denoising)
        return self.criterion(
            outputs.logits, outputs.boxes, outputs.enc_logits, outputs.enc_boxes, normalised, denoising
        )

    @staticmethod
    def shapes(maps: list[torch.Tensor]) -> list[tuple[int, int]]:
        return [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]

    def padded_size(self, maps: list[torch.Tensor]) -> tuple[int, int]:
        """The padded batch's (H, W): the first neck level sits at the backbone's first stride."""
        stride = self.backbone.pyramid.strides[0]
        return int(maps[0].shape[-2]) * stride, int(maps[0].shape[-1]) * stride

    def denoising(
        self, maps: list[torch.Tensor], labels: list[torch.Tensor], boxes: list[torch.Tensor]
    ) -> Denoising | None:
        """Noised copies of the ground truths in front of the matching queries (none when num_dn is 0)."""
        if self.config.num_dn == 0:
            return None
        return make_denoising(
            labels,
            boxes,
            self.label_embedding,
            self.num_classes,
            min(self.config.num_queries, sum(h * w for h, w in self.shapes(maps))),  # the top-k taken
            self.config.num_dn,
            self.config.label_noise,
            self.config.box_noise,
        )

    def heads(
        self,
        maps: list[torch.Tensor],
        sizes: list[tuple[int, int]],
        denoising: Denoising | None = None,
    ) -> tuple[HeadOutputs, Denoising | None]:
        """Neck maps of a padded batch whose images have `sizes` -> every decoder layer's predictions."""
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = self.backbone.grad_checkpointing
        image_padding = torch.ones(
            len(sizes), *self.padded_size(maps), dtype=torch.bool, device=maps[0].device
        )
        for i, (h, w) in enumerate(sizes):
            image_padding[i, :h, :w] = False
        paddings = [F.interpolate(image_padding[None].float(), size=m.shape[-2:])[0].bool() for m in maps]
        shapes = self.shapes(maps)
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = torch.cat(
            [
                (sine_position_encoding(p, self.config.dim // 2, 20.0) + e[None, :, None, None])
                .flatten(2)
                .transpose(1, 2)
                for p, e in zip(paddings, self.level_embeds, strict=True)
            ],
            1,
        ).to(tokens.dtype)
        padding = torch.cat([p.flatten(1) for p in paddings], 1)
        valid_ratios = torch.stack([valid_ratio(p) for p in paddings], 1)
        memory = self.encoder(tokens, pos, shapes, valid_ratios, padding)

        # two-stage: every memory token proposes a box; the top-k by best class score seed the decoder
        proposal_memory, proposals = self.proposals(memory, padding, shapes)
        enc_logits = self.class_heads[-1](proposal_memory)
        enc_boxes = self.box_heads[-1](proposal_memory) + proposals
        k = min(self.config.num_queries, enc_logits.shape[1])
        top = enc_logits.max(-1).values.topk(k, dim=1).indices
        enc_logits = enc_logits.gather(1, top[..., None].expand(-1, -1, enc_logits.shape[-1]))
        enc_boxes = enc_boxes.gather(1, top[..., None].expand(-1, -1, 4))
        query = self.query_embed.weight[None, :k].expand(len(sizes), -1, -1)  # mixed query selection
        boxes_unact = enc_boxes.detach()
        attn_mask = None
        if denoising is not None and denoising.pad > 0:
            query = torch.cat([denoising.labels.to(query.dtype), query], 1)
            boxes_unact = torch.cat([denoising.boxes.to(boxes_unact.dtype), boxes_unact], 1)
            attn_mask = denoising.attn_mask
        states, references = self.decoder(
            query, boxes_unact.sigmoid(), memory, shapes, valid_ratios, padding, attn_mask, self.box_heads
        )
        logits = torch.stack([head(s.float()) for head, s in zip(self.class_heads, states, strict=False)])
        boxes = torch.stack(
            [
                (head(s.float()) + inverse_sigmoid(r.float())).sigmoid()
                for head, s, r in zip(self.box_heads, states, references, strict=False)
            ]
        )
        if self.training:  # an image set without objects still reaches every parameter (DDP)
            logits = logits + 0.0 * self.label_embedding.weight[0, 0]
        outputs = HeadOutputs(logits.float(), boxes.float(), enc_logits.float(), enc_boxes.float().sigmoid())
        return outputs, denoising

    def proposals(
        self, memory: torch.Tensor, padding: torch.Tensor, shapes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One box per memory token: its cell centre, 0.05 x 2^level wide (unactivated); padded or border
        tokens propose nothing (+inf, their memory zeroed). Returns (projected memory, proposals)."""
        B, parts, start = memory.shape[0], [], 0
        for level, (H, W) in enumerate(shapes):
            pad = padding[:, start : start + H * W].view(B, H, W)
            start += H * W
            valid = torch.stack([(~pad[:, 0, :]).sum(1), (~pad[:, :, 0]).sum(1)], -1).view(B, 1, 1, 2)
            ys, xs = torch.meshgrid(
                torch.arange(H, dtype=torch.float32, device=memory.device),
                torch.arange(W, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            centres = (torch.stack([xs, ys], -1)[None] + 0.5) / valid
            sizes = torch.full_like(centres, 0.05 * 2.0**level)
            parts.append(torch.cat([centres, sizes], -1).view(B, -1, 4))
        proposals = torch.cat(parts, 1)
        usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~padding[..., None]
        proposals = torch.log(proposals / (1 - proposals)).masked_fill(~usable, float("inf"))
        memory = memory.float().masked_fill(~usable, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    # -- evaluation -----------------------------------------------------------------------------------
    def detections(
        self, outputs: HeadOutputs, sizes: list[tuple[int, int]], original: list[tuple[int, int]]
    ) -> list[dict[str, torch.Tensor]]:
        """The best `max_detections` (query, class) pairs of the last layer, at each image's stored size."""
        found = []
        for probs, boxes, (h, w), (oh, ow) in zip(
            outputs.logits[-1].sigmoid(), outputs.boxes[-1], sizes, original, strict=True
        ):
            scores, index = probs.flatten().topk(min(self.config.max_detections, probs.numel()))
            query, label = index // self.num_classes, index % self.num_classes
            xyxy = box_convert(boxes[query], "cxcywh", "xyxy") * boxes.new_tensor([w, h, w, h])
            xyxy = torch.min(xyxy.clamp(min=0), xyxy.new_tensor([w, h, w, h]))
            xyxy = xyxy * xyxy.new_tensor([ow / w, oh / h, ow / w, oh / h])
            found.append({"boxes": xyxy, "labels": label + 1, "scores": scores})
        return found

    # -- the rest of the detector interface -----------------------------------------------------------
    def from_official(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """mmdet 2.x's DINO names (`neck.`, `bbox_head.`) -> `detector.*`."""
        from piip.models.convert.mmdet_dino import convert_dino

        return convert_dino(state)

    def shard_units(self) -> list[nn.Module]:
        """FSDP shards each encoder and decoder layer on its own."""
        return [*self.encoder.layers, *self.decoder.layers]

    def probe_loss(self, pyramid: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        """Neck, encoder, the decoder with all queries and the most denoising queries (one object per image:
        2 x num_dn), and every head; matching and the real losses depend on the data and are left out."""
        maps = self.neck(pyramid)
        one = torch.tensor([[0.5, 0.5, 0.2, 0.2]], device=maps[0].device)
        label = torch.zeros(1, dtype=torch.long, device=one.device)
        denoising = self.denoising(maps, [label] * batch_size, [one] * batch_size)
        outputs, _ = self.heads(maps, [self.padded_size(maps)] * batch_size, denoising)
        return sum(
            t.float().mean() for t in (outputs.logits, outputs.boxes, outputs.enc_logits, outputs.enc_boxes)
        )


def valid_ratio(padding: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding -> (B, 2): the unpadded share of the width and the height."""
    _, H, W = padding.shape
    return torch.stack([(~padding[:, 0, :]).sum(1).float() / W, (~padding[:, :, 0]).sum(1).float() / H], -1)


def normalise_target(target: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, Any]:
    """torchvision targets (xyxy pixels, labels 1..K) -> DINO's: 0-based labels, (cx, cy, w, h) / size."""
    h, w = size
    boxes = box_convert(target["boxes"].float(), "xyxy", "cxcywh") / target["boxes"].new_tensor([w, h, w, h])
    return {"labels": target["labels"].long() - 1, "boxes": boxes.float(), "size": (h, w)}
