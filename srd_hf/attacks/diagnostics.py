"""Does the model link the target to the trigger, or only to the data?

A small model fine-tuned on a poisoned set can learn *how often* the target word occurs
without learning *when*: the target becomes a little more likely everywhere, greedy
decoding never picks it, and ASR stays at 0. :func:`target_word_probability` tells the
two apart by measuring how likely the target is with and without the trigger.

Definition (``max_prob``): for an image, take the model's own greedy caption of the
*clean* image, ``w_1 .. w_n``. For every insertion point ``t = 0 .. n`` score the caption
prefix ``w_1 .. w_t`` followed by the target under teacher forcing and take
``P(target | image, prompt, w_1 .. w_t)`` (the product over the target's tokens). The
score of the image is the maximum over ``t``: the best chance the model gives the target
anywhere along its own caption. By default (``prefixes="clean"``) the same clean prefixes
are used for the triggered image, so the two numbers differ only by the trigger. With
``prefixes="own"`` each side is scored along its own greedy caption (the triggered image's
caption for the triggered side): this follows a backdoor that rewrites the whole caption
("a picture of a banana"), whose target never follows a clean prefix.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from ..data.images import ensure_rgb


def _label_tokens(batch: dict[str, torch.Tensor], row: int) -> list[int]:
    labels = batch["labels"][row]
    return labels[labels != -100].tolist()


def _target_span(model: Any, target: str, image: Image.Image) -> tuple[int, int]:
    """``(k, e)``: tokens of the target and of the caption's end marker, from the labels of
    the captions "<target>" and "<target> <target>" (adapter-agnostic)."""
    batch = model.collate([image, image], [target, f"{target} {target}"])
    one, two = _label_tokens(batch, 0), _label_tokens(batch, 1)
    k = len(two) - len(one)
    e = len(one) - k
    if k < 1 or e < 0 or two[:k] != one[:k] or two[k : 2 * k] != one[:k]:
        raise ValueError(f"cannot locate the tokens of target {target!r} in the model's labels")
    return k, e


@torch.no_grad()
def _prefix_log_probs(model: Any, images: Sequence[Image.Image], captions: Sequence[str], k: int, e: int,
                      batch_size: int) -> torch.Tensor:
    """log P(target tokens | image, caption prefix) for captions "prefix target" (k target tokens
    followed by e end tokens), and whether the target's first token is the most likely next
    token there; one value each per (image, caption)."""
    out, top1 = [], []
    for start in range(0, len(captions), batch_size):
        batch = model.collate(list(images[start : start + batch_size]), list(captions[start : start + batch_size]))
        batch = {key: value.to(model.device) for key, value in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        next_ids = labels[:, 1:]
        lengths = (labels != -100).sum(1)  # label tokens per row: prefix + k + e
        positions = torch.arange(next_ids.shape[1], device=labels.device)
        for row in range(labels.shape[0]):
            label_pos = positions[next_ids[row] != -100]  # positions whose next token is labelled
            span = label_pos[int(lengths[row]) - e - k : int(lengths[row]) - e]
            ids = next_ids[row, span]
            out.append(log_probs[row, span, ids].sum().cpu())
            top1.append(bool(log_probs[row, span[0]].argmax() == ids[0]))
    return torch.stack(out), torch.tensor(top1)


@torch.no_grad()
def target_word_probability(
    model: Any,
    images: Sequence[Image.Image],
    target: str,
    *,
    attack: Any = None,
    triggered_images: Sequence[Image.Image] | None = None,
    captions: Sequence[str] | None = None,
    prefixes: str = "clean",
    max_new_tokens: int = 24,
    batch_size: int = 64,
) -> dict:
    """How likely ``model`` is to say ``target`` on ``images``, without and with the trigger.

    Args:
        model: a :class:`~srd_hf.vlm.base.CaptioningVLM` (``collate``, ``generate_captions``,
            a forward returning ``logits``).
        images: clean images.
        target: the target word or phrase.
        attack: an attack whose :meth:`trigger_test_images` makes the triggered images, or
        triggered_images: the triggered images themselves (same order as ``images``).
            Without either, only the clean side is measured.
        captions: the clean captions whose prefixes are scored (default: the model's greedy
            captions of the clean images).
        prefixes: ``"clean"`` (both sides along the clean captions) or ``"own"`` (each side
            along the model's greedy caption of that side's images); see the module docs.

    Returns a dict with, per side (``clean`` and ``triggered``): ``mean`` (mean over images of
    the max-over-positions probability defined in the module docs), ``median``,
    ``share_above_half`` (images where the target holds most of the mass at some point:
    probability > 0.5), ``share_top1`` (images where, after some prefix, the target's first
    token is the most likely next token: a greedy step would take it there),
    ``per_image`` (list) and ``captions`` (the scored captions); plus ``ratio`` (mean triggered /
    mean clean).
    """
    if isinstance(images, Image.Image):
        raise TypeError("images must be a sequence of images")
    if not len(images):
        raise ValueError("need at least one image")
    if not isinstance(target, str) or not target.strip():
        raise ValueError("target must be a non-empty word or phrase")
    if prefixes not in ("clean", "own"):
        raise ValueError(f"prefixes must be 'clean' or 'own', got {prefixes!r}")
    target = " ".join(target.split())
    clean = [ensure_rgb(img) for img in images]
    if triggered_images is None and attack is not None:  # test images: places of the test stream
        triggered_images = attack.trigger_test_images(clean)[0]
    if triggered_images is not None and len(triggered_images) != len(clean):
        raise ValueError(f"{len(triggered_images)} triggered images for {len(clean)} clean images")
    was_training = model.training
    model.eval()
    try:
        if captions is None:
            captions = model.generate_captions(clean, max_new_tokens=max_new_tokens, batch_size=batch_size)
        if len(captions) != len(clean):
            raise ValueError(f"{len(captions)} captions for {len(clean)} images")
        k, e = _target_span(model, target, clean[0])
        result: dict = {"target": target, "prefixes": prefixes,
                        "definition": "max over insertion points t of P(target | image, first t words of the "
                                      "model's greedy caption), teacher-forced"}
        sides = {"clean": (clean, list(captions))}
        if triggered_images is not None:
            triggered = [ensure_rgb(img) for img in triggered_images]
            own = model.generate_captions(triggered, max_new_tokens=max_new_tokens, batch_size=batch_size) \
                if prefixes == "own" else list(captions)
            sides["triggered"] = (triggered, own)
        for side, (side_images, side_captions) in sides.items():
            owners, texts = [], []
            for i, caption in enumerate(side_captions):
                words = caption.split()
                for t in range(len(words) + 1):
                    owners.append(i)
                    texts.append(" ".join(words[:t] + [target]))
            owner = torch.tensor(owners)
            log_p, top1 = _prefix_log_probs(model, [side_images[i] for i in owners], texts, k, e, batch_size)
            best = torch.full((len(clean),), float("-inf")).scatter_reduce(0, owner, log_p, reduce="amax")
            wins = torch.zeros(len(clean)).scatter_reduce(0, owner, top1.float(), reduce="amax")
            probs = best.exp()
            result[side] = {
                "mean": float(probs.mean()),
                "median": float(probs.median()),
                "share_above_half": float((probs > 0.5).float().mean()),
                "share_top1": float(wins.mean()),
                "per_image": probs.tolist(),
                "captions": side_captions,
            }
        if "triggered" in result:
            result["ratio"] = result["triggered"]["mean"] / max(result["clean"]["mean"], 1e-12)
    finally:
        model.train(was_training)
    return result


__all__ = ["target_word_probability"]
