"""LLaVA conversations as token ids with their training labels: the `plain` and `vicuna_v1` templates.

A conversation is rendered as a list of text segments, each marked as target (an assistant answer, trained
on) or context (masked with `IGNORE_INDEX`). Every segment is tokenised on its own and the ids are
concatenated, so labels line up with tokens by construction: upstream LLaVA tokenises the whole prompt and
re-derives answer offsets from separately tokenised pieces, which silently misaligns when a tokenizer merges
across a boundary. The image placeholder becomes `IMAGE_TOKEN_INDEX`; the model splices the visual tokens
in at that position (`piip.models.heads.llava.splice_visual_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from piip.errors import DataError
from piip.models.heads.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE_PLACEHOLDER = "<image>"
HUMAN, ASSISTANT = "human", "gpt"  # the LLaVA JSON `from` values

TemplateName = Literal["plain", "vicuna_v1"]


class ConversationError(DataError):
    """A sample that cannot be rendered; the message names the file and sample id."""


@dataclass(frozen=True)
class Template:
    """How turns become text. `system` opens the prompt; each human turn is `role: text` followed by
    `separator`; each answer is followed by `answer_end` (then `eos` for vicuna_v1)."""

    name: str
    system: str
    roles: tuple[str, str]  # (human, assistant) role names as written in the prompt
    separator: str  # after the system prompt and after each human turn
    answer_end: str  # after each assistant answer (besides eos)
    end_with_eos: bool  # append the tokenizer's eos token to every answer (trained on)


TEMPLATES: dict[str, Template] = {
    # Stage 1 (alignment): image then caption; the human's instruction is dropped, as upstream does.
    "plain": Template("plain", system="", roles=("", ""), separator="", answer_end="\n", end_with_eos=False),
    # Stage 2 and evaluation: Vicuna v1.1 chat format (LLaVA-1.5 `conv_vicuna_v1`).
    "vicuna_v1": Template(
        "vicuna_v1",
        system=(
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions."
        ),
        roles=("USER", "ASSISTANT"),
        separator=" ",
        answer_end="",
        end_with_eos=True,
    ),
}


def template_texts() -> list[str]:
    """Every fixed string the templates write: what a tokenizer built from a vocabulary must cover."""
    texts = []
    for template in TEMPLATES.values():
        texts += [template.system, *template.roles, template.separator, template.answer_end, ":"]
    return [t for t in texts if t.strip()]


@dataclass
class Segment:
    text: str
    target: bool = False  # trained on (an assistant answer)
    image: bool = False  # the image placeholder (text is ignored)


@dataclass
class Turn:
    human: str
    assistant: str | None  # None: the prompt a generation continues from


@dataclass
class Conversation:
    """One LLaVA JSON sample, checked: turns alternate human/assistant and the placeholder count matches."""

    id: str
    turns: list[Turn]
    image: str | None = None

    @classmethod
    def from_llava(cls, sample: dict[str, Any], where: str) -> Conversation:
        """`where` (file name) appears in every error. Turns must alternate human -> gpt; an image needs
        exactly one `<image>` in the human turns, and a text-only sample none."""
        sample_id = str(sample.get("id", "?"))
        messages = sample.get("conversations")
        if not isinstance(messages, list) or not messages:
            raise ConversationError(f"{where}: sample {sample_id}: expected a non-empty 'conversations' list")
        turns: list[Turn] = []
        for i, message in enumerate(messages):
            role = message.get("from") if isinstance(message, dict) else None
            expected = HUMAN if i % 2 == 0 else ASSISTANT
            if role != expected or not isinstance(message.get("value"), str):
                raise ConversationError(
                    f"{where}: sample {sample_id}: message {i} should be from {expected!r} with a string "
                    f"'value', got {message!r}"
                )
            if role == HUMAN:
                turns.append(Turn(message["value"], None))
            else:
                turns[-1].assistant = message["value"]
        for k, turn in enumerate(turns):
            if IMAGE_PLACEHOLDER in (turn.assistant or ""):
                raise ConversationError(
                    f"{where}: sample {sample_id}: message {2 * k + 1} (the answer of turn {k}) holds the "
                    f"{IMAGE_PLACEHOLDER} placeholder; it belongs in a human turn (the image goes with a "
                    "question), so move it there"
                )
        placeholders = sum(t.human.count(IMAGE_PLACEHOLDER) for t in turns)
        image = sample.get("image")
        if image is not None and placeholders != 1:
            raise ConversationError(
                f"{where}: sample {sample_id} has image {image!r} but {placeholders} {IMAGE_PLACEHOLDER} "
                "placeholders in its human turns; expected exactly one"
            )
        if image is None and placeholders:
            raise ConversationError(
                f"{where}: sample {sample_id} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but no "
                "'image'; remove the placeholder or add the image"
            )
        return cls(sample_id, turns, image)

    def has_answer(self, template: Template) -> bool:
        """Whether training has a token to learn from: an answer the template renders as target (`plain`
        renders only the first turn's)."""
        answered = self.turns[:1] if template.name == "plain" else self.turns
        return any(turn.assistant is not None for turn in answered)


def render(conversation: Conversation, template: Template) -> list[list[Segment]]:
    """Segments per turn (index 0 carries the system prompt). A last turn without answer ends with the
    assistant role: the prompt a generation continues from."""
    if template.name == "plain":
        return _render_plain(conversation)
    human_role, assistant_role = template.roles
    turns: list[list[Segment]] = []
    for i, turn in enumerate(conversation.turns):
        segments = [Segment(template.system + template.separator)] if i == 0 else []
        segments += _with_image(f"{human_role}: {_image_first(turn.human)}{template.separator}")
        segments.append(Segment(f"{assistant_role}:"))
        if turn.assistant is not None:
            segments.append(Segment(" " + turn.assistant.strip() + template.answer_end, target=True))
        turns.append(segments)
    return turns


def _render_plain(conversation: Conversation) -> list[list[Segment]]:
    """Image, then the first answer (the caption) as target; upstream drops the instruction text."""
    first = conversation.turns[0]
    segments = [Segment("", image=True)] if conversation.image is not None else []
    if first.assistant is not None:
        segments.append(Segment(first.assistant.strip() + "\n", target=True))
    return [segments]


def _image_first(text: str) -> str:
    """LLaVA-1.5 moves the placeholder to the front of its turn: `<image>\\n` + question."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{rest}"


def _with_image(text: str) -> list[Segment]:
    if IMAGE_PLACEHOLDER not in text:
        return [Segment(text)]
    before, after = text.split(IMAGE_PLACEHOLDER, 1)
    return [s for s in (Segment(before), Segment("", image=True), Segment(after)) if s.image or s.text]


@dataclass
class Encoded:
    """Token ids (`IMAGE_TOKEN_INDEX` where the visual tokens go) and labels of the same length."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # turns were dropped or cut to fit `max_length`

    @property
    def has_image(self) -> bool:
        return IMAGE_TOKEN_INDEX in self.input_ids


def encode(
    conversation: Conversation,
    template: Template,
    tokenizer: Any,
    max_length: int | None,
    visual_tokens: int,
) -> Encoded:
    """Ids and labels of a conversation; the sequence after splicing the visual tokens is at most
    `max_length` long (None: no limit, for generation prompts).

    Truncation keeps whole turns from the start (so every kept answer is complete); only when the first turn
    alone is too long is it cut at the end, which may shorten its answer. A conversation whose image
    placeholder would be cut off raises ConversationError, since training on it would misalign nothing but
    teach the model to answer without its image.
    """
    if max_length is None:
        budget = float("inf")
    else:
        budget = max_length - (visual_tokens - 1 if conversation.image is not None else 0)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    truncated = False
    for i, segments in enumerate(render(conversation, template)):
        turn_ids, turn_labels = _encode_segments(segments, template, tokenizer)
        if len(ids) + len(turn_ids) > budget:
            truncated = True
            if i == 0:
                keep = max(budget - len(ids), 0)
                ids, labels = ids + turn_ids[:keep], labels + turn_labels[:keep]
            break
        ids, labels = ids + turn_ids, labels + turn_labels
    if conversation.image is not None and IMAGE_TOKEN_INDEX not in ids:
        raise ConversationError(
            f"sample {conversation.id}: max_length {max_length} leaves no room for the image placeholder "
            f"and its {visual_tokens} visual tokens; raise task.data.max_length"
        )
    return Encoded(ids, labels, truncated)


def _encode_segments(
    segments: list[Segment], template: Template, tokenizer: Any
) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        if segment.image:
            piece = [IMAGE_TOKEN_INDEX]
        else:
            piece = tokenizer(segment.text, add_special_tokens=False)["input_ids"] if segment.text else []
            if segment.target and template.end_with_eos:
                piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if segment.target else [IGNORE_INDEX] * len(piece)
    return ids, labels


def generation_prompt(
    question: str,
    has_image: bool,
    template: Template,
    tokenizer: Any,
    history: list[tuple[str, str]] | None = None,
) -> list[int]:
    """Ids a greedy generation continues from: earlier (question, answer) turns, the new question, and the
    assistant role with no answer. The image placeholder goes first in the first human turn."""
    pairs = [*(history or []), (question, None)]
    turns = [Turn(q, a) for q, a in pairs]
    if has_image and IMAGE_PLACEHOLDER not in turns[0].human:
        turns[0].human = f"{IMAGE_PLACEHOLDER}\n{turns[0].human}"
    conversation = Conversation("prompt", turns, image="prompt" if has_image else None)
    return encode(conversation, template, tokenizer, max_length=None, visual_tokens=0).input_ids
