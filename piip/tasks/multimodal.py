"""PIIP-LLaVA (PAPER.md §6): PIIP vision tower -> branch projector -> visual tokens spliced into a causal LM.

Which parts train is configuration (`trainable`): stage 1 (alignment) trains only the projector, stage 2
(instruction tuning) the projector, the language model and the whole vision tower. Frozen parts stay in
eval mode and run without autograd, as upstream's frozen tower does. Evaluation answers the data module's
question set by greedy generation with the language model's KV cache (`transformers` `generate`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from piip.data.files import write_json
from piip.data.llava.conversation import TEMPLATES, generation_prompt
from piip.data.llava.dataset import ConversationBatch, load_tokenizer
from piip.data.llava.questions import QuestionBatch
from piip.errors import ConfigError
from piip.models.convert.llava import TOWER, convert_llava_heads, tower_state
from piip.models.heads.llava import (
    BranchProjector,
    language_model_width,
    load_language_model,
    splice_visual_tokens,
)
from piip.tasks.base import PIIPTask, ValidationHooksForTest

log = logging.getLogger(__name__)

PARTS = ("vision_tower", "projector", "language_model")


class MultimodalTask(ValidationHooksForTest, PIIPTask, requires={"merge": "none", "head": "none"}):
    """PIIP-LLaVA: the vision tower (every branch's final map), a projector per branch and a causal LM."""

    def __init__(
        self,
        backbone: dict[str, Any],
        optim: dict[str, Any],
        language_model: dict[str, Any],
        trainable: list[str] = ("projector",),
        load_pretrained: bool = False,
        grad_checkpointing: bool = False,
        **base: Any,
    ) -> None:
        unknown = sorted(set(trainable) - set(PARTS))
        if unknown:
            raise ConfigError(
                f"task.module.trainable: unknown part(s) {unknown}; expected some of {list(PARTS)}"
            )
        super().__init__(
            backbone, optim, load_pretrained=load_pretrained, grad_checkpointing=grad_checkpointing, **base
        )
        path = language_model.get("path")
        if not path:
            raise ConfigError("task.module.language_model.path: a local Hugging Face causal LM folder")
        self.language_model = load_language_model(
            path, pretrained=load_pretrained, dtype=language_model.get("dtype")
        )
        self.tokenizer = load_tokenizer(path, "task.module.language_model.path")
        self.projector = BranchProjector(
            [b.dims[-1] for b in self.backbone.branches], language_model_width(self.language_model)
        )
        if grad_checkpointing:
            self.language_model.gradient_checkpointing_enable()
        self.trainable = tuple(trainable)
        for name in PARTS:
            self.part(name).requires_grad_(name in self.trainable)
        self.train()  # from_pretrained leaves the LM in eval mode; apply the frozen-parts policy instead
        top = self.backbone.config.resolutions[0]
        self.visual_tokens = (top // self.backbone.branches[0].strides[-1]) ** 2
        self._metric: Any = None

    def shard_units(self) -> list[nn.Module]:
        """Vision blocks and the LLM's decoder layers (the classes its `_no_split_modules` names)."""
        layer_classes = set(getattr(self.language_model, "_no_split_modules", None) or ())
        layers = [m for m in self.language_model.modules() if type(m).__name__ in layer_classes]
        return super().shard_units() + layers

    def sharded_forward_methods(self) -> dict[str, tuple[nn.Module, Any]]:
        """The prompt is embedded here (splice_visual_tokens), outside the LLM's forward; sharded, that
        lookup must gather the LLM's root unit (embeddings, final norm, head) as its forward does."""
        return {"embed_prompt": (self.language_model, lambda lm, ids: lm.get_input_embeddings()(ids))}

    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of the prompt (under FSDP through the LLM unit's own gathering entry point)."""
        model = self.language_model
        return (getattr(model, "embed_prompt", None) or model.get_input_embeddings())(input_ids)

    def part(self, name: str) -> nn.Module:
        return {
            "vision_tower": self.backbone,
            "projector": self.projector,
            "language_model": self.language_model,
        }[name]

    def train(self, mode: bool = True) -> MultimodalTask:
        """Frozen parts stay in eval mode (no dropout or drop-path noise in features nobody trains)."""
        super().train(mode)
        for name in PARTS:
            if name not in self.trainable:
                self.part(name).eval()
        return self

    def data_needs(self) -> dict[str, Any]:
        """Truncation to `task.data.max_length` counts each image as its visual tokens, and may not exceed
        the language model's position embeddings."""
        positions = getattr(self.language_model.config, "max_position_embeddings", None)
        return {"visual_tokens": self.visual_tokens, "max_positions": positions}

    # -- official checkpoints -----------------------------------------------------------------------------
    def split_official(
        self, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A released PIIP-LLaVA checkpoint (LLaVA's layout): the vision tower under
        `model.vision_tower.vision_tower.`, everything else (projector, Vicuna) for `from_official_heads`."""
        if not any(k.startswith(TOWER) for k in state):
            return super().split_official(state)
        tower = tower_state({k.removeprefix(TOWER): v for k, v in state.items() if k.startswith(TOWER)})
        return tower, {k: v for k, v in state.items() if not k.startswith(TOWER)}

    def from_official_heads(
        self, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """`model.mm_projector.*` -> `projector.*`, Vicuna's `model.*` / `lm_head.*` -> `language_model.*`."""
        return convert_llava_heads(state, len(self.backbone.branches))

    # -- model --------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, T, D) visual tokens; no autograd through a frozen tower."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and "vision_tower" in self.trainable):
            maps = self.backbone(images).branch_maps
        return self.projector(maps)

    def forward(self, batch: ConversationBatch) -> torch.Tensor:
        """The language-modelling loss over the answer tokens."""
        visual = self.encode_images(batch.images) if batch.images is not None else None
        embeds, mask, labels = splice_visual_tokens(
            self.embed_prompt,
            batch.input_ids,
            batch.attention_mask,
            visual,
            batch.labels,
        )
        loss = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        if visual is None and self.training and ({"vision_tower", "projector"} & set(self.trainable)):
            # a text-only batch: touch the image path so data-parallel ranks all see its gradients (zero)
            side = self.backbone.config.resolutions[0]
            loss = loss + 0.0 * self.encode_images(embeds.new_zeros(1, 3, side, side).float()).sum()
        return loss

    def training_step(self, batch: ConversationBatch, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.check_finite(loss, batch_idx)
        size = batch.num_samples
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log(
            "train/truncated",
            float(batch.truncated),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            batch_size=size,
        )
        self.log_lr()
        return loss

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None,
        max_new_tokens: int,
    ) -> list[str]:
        """Greedy answers of left-padded prompts (KV-cached decoding), special tokens removed."""
        visual = self.encode_images(images) if images is not None else None
        embeds, mask, _ = splice_visual_tokens(
            self.embed_prompt, input_ids, attention_mask, visual, left_pad=True
        )
        output = self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def answer(
        self,
        question: str,
        image: torch.Tensor | None,
        template: str = "vicuna_v1",
        max_new_tokens: int = 64,
        history: list[tuple[str, str]] | None = None,
    ) -> str:
        """Answer a question about one preprocessed image (3, H, W), or without image; `history` holds the
        earlier (question, answer) turns of the conversation (chat tool)."""
        prompt = generation_prompt(question, image is not None, TEMPLATES[template], self.tokenizer, history)
        ids = torch.tensor([prompt], device=self.device)
        images = image[None].to(self.device) if image is not None else None
        return self.generate(ids, torch.ones_like(ids, dtype=torch.bool), images, max_new_tokens)[0]

    # -- evaluation ---------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._metric = self.attached_data().question_source.metric()

    def validation_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        source = self.attached_data().question_source
        answers = self.generate(batch.input_ids, batch.attention_mask, batch.images, source.max_new_tokens)
        source.update(self._metric, batch.metas, answers)

    def on_validation_epoch_end(self) -> None:
        source = self.attached_data().question_source
        states = self.gather_objects(self._metric.state())
        metrics: dict[str, float] = {}
        if self.trainer.is_global_zero:
            merged = source.metric()
            merged.merge(states)
            metrics = {f"{source.name}_{k}": float(v) for k, v in merged.compute().items()}
            if self.predictions_prefix is not None:
                path = write_json(f"{self.predictions_prefix}_{source.name}_answers.json", merged.records())
                log.info("answers: %s", path)
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        stage = "test" if self.trainer.testing else "val"
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name.endswith("accuracy"))
