"""Attention-guided visual-token pruning (CleanSight-style, CVPR 2026), a test-time defense.

In the paper: a backdoored VLM's trigger draws an abnormal share of the text-to-image
attention onto the few visual tokens that cover it. CleanSight reads the model's own
attention, flags inputs whose attention concentrates abnormally, and prunes the offending
visual tokens before decoding; no retraining, no trigger knowledge.

Here, per input: the captioner first captions the image as usual; its attention from the
caption's tokens to the image is read in one teacher-forced pass, giving a relevance share
per image patch; an input is *abnormal* when the concentration of that share (``statistic``:
the largest share, or one minus the normalised entropy) is above all but ``flag_rate`` of
clean validation images. Only abnormal inputs are captioned again, with the patches whose
share exceeds ``token_ratio`` times the uniform share (at most ``max_pruned``, at least one)
removed; every other caption is the wrapped captioner's own, unchanged.

Where the attention comes from:

- OpenFlamingo (required): text reaches the image only through the gated cross-attention
  layers, which attend to the perceiver's latents; latents attend to the vision tower's
  patch tokens. Relevance of a patch = sum over latents of (caption-to-latent attention,
  averaged over heads, caption positions and cross-attention layers) x (latent-to-patch
  attention, averaged over heads and perceiver layers, renormalised over patches): a
  two-step attention rollout. ``source="perceiver"`` uses the latent-to-patch part alone.
  Attention is recomputed from the modules' inputs (captured with forward hooks) because
  open_flamingo's modules do not return it. Pruning ``"tokens"`` drops the patch tokens
  from the perceiver's input (a forward pre-hook); ``"patches"`` paints the image patches
  with the image's mean colour.
- transformers image-text-to-text models (best effort): attention from the caption's tokens
  to the image-placeholder tokens (``output_attentions`` with eager attention, averaged over
  layers and heads). Works for single-grid models (LLaVA: one token per patch of one crop);
  tiled models (Idefics3, SmolVLM) are refused with an error. Only ``prune="patches"``.

Patches map to pixels through the CLIP-style "resize the shorter side, centre crop" view.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .base import (DefenseConfig, TestTimeDefense, check_choice, check_int, check_number, high_is_flagged, measure_cost,
                   rgb_images)

STATISTICS = ("max_share", "entropy")
SOURCES = ("rollout", "perceiver")
PRUNE_MODES = ("tokens", "patches")


@dataclass
class AttentionPruningConfig(DefenseConfig):
    """statistic: max_share or entropy (concentration of the patch relevance). source:
    rollout or perceiver (OpenFlamingo). prune: tokens (OpenFlamingo) or patches (any adapter).
    token_ratio: a patch is pruned when its share exceeds token_ratio / number of patches.
    max_pruned: patches pruned per abnormal input at most."""

    statistic: str = "max_share"
    source: str = "rollout"
    prune: str = "tokens"
    token_ratio: float = 2.0
    max_pruned: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_choice("statistic", self.statistic, STATISTICS)
        check_choice("source", self.source, SOURCES)
        check_choice("prune", self.prune, PRUNE_MODES)
        if check_number("token_ratio", self.token_ratio) < 1:
            raise ValueError(f"token_ratio must be >= 1 (a multiple of the uniform share), got {self.token_ratio!r}")
        check_int("max_pruned", self.max_pruned, 1)


# ----------------------------------------------------------------------------- OpenFlamingo attention
def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., n, heads * d) -> (..., heads, n, d), open_flamingo's head layout."""
    return t.view(*t.shape[:-1], heads, -1).transpose(-3, -2)


def _perceiver_attention(m, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Latent-to-patch attention of one PerceiverAttention (b, n_latents, n_patches), heads averaged.
    Keys are patches and latents; the share on patches is renormalised."""
    x, lat = m.norm_media(x), m.norm_latents(latents)
    q = _heads(m.to_q(lat), m.heads) * m.scale
    k = _heads(m.to_kv(torch.cat((x, lat), dim=-2)).chunk(2, dim=-1)[0], m.heads)
    attn = (q @ k.transpose(-1, -2)).softmax(-1)[..., : x.shape[-2]]  # (b, T, h, n_latents, n_patches)
    attn = attn / attn.sum(-1, keepdim=True)
    return attn.mean(2)[:, 0]


def _text_attention(m, x: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
    """Text-to-latent attention of one MaskedCrossAttention (b, T_txt, n_latents), heads averaged
    (one image per sample: every text position after it attends to its latents)."""
    q = _heads(m.to_q(m.norm(x)), m.heads) * m.scale
    k = _heads(m.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)[0], m.heads)
    return (q @ k.transpose(-1, -2)).softmax(-1).mean(1)


@torch.no_grad()
def flamingo_patch_relevance(captioner, images: Sequence[Image.Image], captions: Sequence[str], *, source: str = "rollout",
                             prompt: str | None = None) -> np.ndarray:
    """(B, n_patches) share of the caption's attention on each vision-tower patch token."""
    batch = captioner.collate(images, [c if c.strip() else "." for c in captions], prompt=prompt)
    labels = batch.pop("labels")
    flamingo = captioner.flamingo
    perceiver, text = [], []
    hooks = [attn.register_forward_hook(lambda m, args, out: perceiver.append(_perceiver_attention(m, *args)))
             for attn, _ in flamingo.perceiver.layers]
    hooks += [block.attn.register_forward_hook(lambda m, args, kwargs, out: text.append(_text_attention(m, args[0], args[1])), with_kwargs=True)
              for block in flamingo.lang_encoder.gated_cross_attn_layers if block is not None]
    try:
        captioner(**{k: v.to(captioner.device) for k, v in batch.items()})
    finally:
        for h in hooks:
            h.remove()
    latent_to_patch = torch.stack(perceiver).mean(0)  # (B, L, N)
    if source == "perceiver":
        return latent_to_patch.mean(1).cpu().numpy()
    predicting = (labels[:, 1:] != -100).to(latent_to_patch.device)  # positions whose next token is a caption token
    predicting = torch.cat([predicting, torch.zeros_like(predicting[:, :1])], dim=1).float()
    to_latents = torch.stack(text).mean(0)  # (B, T, L)
    to_latents = (to_latents * predicting[..., None]).sum(1) / predicting.sum(1, keepdim=True).clamp(min=1)
    return torch.einsum("bl,bln->bn", to_latents, latent_to_patch).cpu().numpy()


@contextmanager
def dropped_perceiver_tokens(captioner, keep: torch.Tensor):
    """Within the block the perceiver sees only the patch tokens ``keep`` (B, n_kept) of each image."""

    def drop(module, args):
        x = args[0]  # (b, T, F, v, d)
        index = keep.to(x.device)
        if x.shape[0] != index.shape[0]:  # beams repeat every image
            index = index.repeat_interleave(x.shape[0] // index.shape[0], dim=0)
        index = index[:, None, None, :, None].expand(-1, x.shape[1], x.shape[2], -1, x.shape[4])
        return (torch.gather(x, 3, index), *args[1:])

    hook = captioner.flamingo.perceiver.register_forward_pre_hook(drop)
    try:
        yield
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- transformers attention
def _image_token_id(model) -> int:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise NotImplementedError(f"{type(model).__name__}: no image_token_id in its config")


@torch.no_grad()
def transformers_patch_relevance(captioner, images: Sequence[Image.Image], captions: Sequence[str], *, prompt: str | None = None) -> np.ndarray:
    """(B, n_image_tokens): share of the caption's attention (layers and heads averaged) on each image token."""
    batch = captioner.collate(images, [c if c.strip() else "." for c in captions], prompt=prompt)
    labels = batch.pop("labels")
    model = captioner.model
    before = getattr(model.config, "_attn_implementation", None)
    if hasattr(model, "set_attn_implementation") and before != "eager":
        model.set_attn_implementation("eager")  # sdpa returns no attention weights
    try:
        out = captioner(**batch, output_attentions=True)
    finally:
        if hasattr(model, "set_attn_implementation") and before not in (None, "eager"):
            model.set_attn_implementation(before)
    if not out.attentions or out.attentions[0] is None:
        raise NotImplementedError(f"{type(model).__name__} returned no attention weights")
    attn = torch.stack([a.float().mean(1) for a in out.attentions]).mean(0).cpu()  # (B, T, T)
    is_image = batch["input_ids"] == _image_token_id(model)
    predicting = torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1)
    counts = is_image.sum(1)
    if len(set(counts.tolist())) != 1 or math.isqrt(int(counts[0])) ** 2 != int(counts[0]):
        raise NotImplementedError(f"{type(model).__name__}: image tokens are not one square grid per image "
                                  f"({counts.tolist()}); only single-grid (LLaVA-style) models are supported")
    rows = []
    for i in range(len(images)):
        share = attn[i][predicting[i]][:, is_image[i]].mean(0)
        rows.append((share / share.sum().clamp(min=1e-12)).numpy())
    return np.stack(rows)


# ----------------------------------------------------------------------------- the defense
def concentration(relevance: np.ndarray, statistic: str) -> np.ndarray:
    """Per row: the largest share, or 1 - entropy / log(n) (both high when attention concentrates)."""
    r = np.clip(np.asarray(relevance, dtype=np.float64), 1e-12, None)
    r = r / r.sum(1, keepdims=True)
    if statistic == "max_share":
        return r.max(1)
    return 1.0 - (-(r * np.log(r)).sum(1)) / np.log(r.shape[1])


def patch_box(cell: int, grid: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box of patch ``cell`` (row-major on a ``grid`` x ``grid`` tiling of the centre square)."""
    square = min(width, height)
    ox, oy, side = (width - square) / 2, (height - square) / 2, square / grid
    row, col = divmod(int(cell), grid)
    return (math.floor(ox + col * side), math.floor(oy + row * side), math.ceil(ox + (col + 1) * side), math.ceil(oy + (row + 1) * side))


def paint_patches(image: Image.Image, cells: Sequence[int], grid: int) -> Image.Image:
    """``image`` with the given patches filled with its mean colour."""
    out = image.copy()
    fill = tuple(int(v) for v in np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0).round())
    draw = ImageDraw.Draw(out)
    for cell in cells:
        x0, y0, x1, y1 = patch_box(cell, grid, *image.size)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    return out


class AttentionPruning(TestTimeDefense):
    name = "attention_pruning"
    config_class = AttentionPruningConfig
    card_template = "defense_attention_pruning.md"
    summary = "flag inputs whose caption attention concentrates on few visual tokens; recaption without them"

    threshold: float | None = None

    def _is_flamingo(self, captioner) -> bool:
        return hasattr(captioner, "flamingo")

    def relevance(self, captioner, images, captions, prompt=None) -> np.ndarray:
        cfg, out = self.config, []
        for start in range(0, len(images), cfg.batch_size):
            chunk = (images[start : start + cfg.batch_size], captions[start : start + cfg.batch_size])
            if self._is_flamingo(captioner):
                out.append(flamingo_patch_relevance(captioner, *chunk, source=cfg.source, prompt=prompt))
            else:
                out.append(transformers_patch_relevance(captioner, *chunk, prompt=prompt))
        return np.concatenate(out)

    def calibrate(self, captioner, validation_images) -> dict:
        if not self._is_flamingo(captioner) and self.config.prune == "tokens":
            raise ValueError("prune='tokens' drops perceiver inputs, which only OpenFlamingo has; use prune='patches'")
        images = rgb_images(validation_images)
        if not images:
            raise ValueError("calibrate needs clean validation images")
        self.report = {"defense": self.name, "config": self.config.to_dict(), "split_for_threshold": "validation", "cost": {}}
        with measure_cost(len(images), self.report["cost"]):
            captions = captioner.generate_captions(images, max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size)
            scores = concentration(self.relevance(captioner, images, captions), self.config.statistic)
            self.threshold = high_is_flagged(scores, self.config.flag_rate)
        self.report.update(threshold=float(self.threshold), validation_score_median=float(np.median(scores)))
        return self.report

    def wrap(self, captioner) -> "PrunedCaptioner":
        if self.threshold is None:
            raise ValueError("call calibrate(captioner, validation_images) first: the threshold comes from clean validation images")
        return PrunedCaptioner(self, captioner)

    def pruned(self, relevance: np.ndarray) -> list[np.ndarray]:
        """Per abnormal input: the patches over ``token_ratio`` times the uniform share, largest
        first (at least one, at most ``max_pruned``)."""
        n = relevance.shape[1]
        out = []
        for r in relevance:
            order = np.argsort(-r, kind="stable")
            over = int((r > self.config.token_ratio / n).sum())
            out.append(order[: min(max(over, 1), self.config.max_pruned, n - 1)])
        return out


class PrunedCaptioner:
    """A captioner whose ``generate_captions`` recaptions abnormal inputs without their most
    attended visual tokens; every other caption is the wrapped captioner's own. After each
    call ``last_flags`` says which inputs were abnormal; ``report`` accumulates counts and cost."""

    def __init__(self, defense: AttentionPruning, captioner):
        self.defense, self.captioner = defense, captioner
        self.last_flags: list[bool] = []
        self.report = {"n_images": 0, "n_flagged": 0, "threshold": defense.threshold, "cost": {"wall_seconds": 0.0, "n_samples": 0}}

    def __getattr__(self, name):  # device, prompt, tokenizer... of the wrapped captioner
        return getattr(self.captioner, name)

    def generate_captions(self, images, *, prompt=None, max_new_tokens=20, num_beams=1, batch_size=32, progress=False) -> list[str]:
        if isinstance(images, Image.Image):
            raise TypeError("generate_captions expects a sequence of images, got a single PIL image")
        defense, captioner, cost = self.defense, self.captioner, {}
        images = rgb_images(images)
        common = dict(prompt=prompt, max_new_tokens=max_new_tokens, num_beams=num_beams)
        with measure_cost(len(images), cost):
            captions = captioner.generate_captions(images, batch_size=batch_size, progress=progress, **common)
            relevance = defense.relevance(captioner, images, captions, prompt=prompt) if images else np.zeros((0, 1))
            flags = concentration(relevance, defense.config.statistic) > defense.threshold if images else np.zeros(0, bool)
            flagged = np.flatnonzero(flags)
            if flagged.size:
                cells = defense.pruned(relevance[flagged])
                for i, caption in zip(flagged, self._recaption([images[i] for i in flagged], cells, relevance.shape[1], common)):
                    captions[i] = caption
        self.last_flags = [bool(f) for f in flags]
        self.report["n_images"] += len(images)
        self.report["n_flagged"] += int(flags.sum())
        self.report["cost"]["wall_seconds"] = round(self.report["cost"]["wall_seconds"] + cost["wall_seconds"], 2)
        self.report["cost"]["n_samples"] += len(images)
        self.report["cost"]["seconds_per_1000_samples"] = round(1000 * self.report["cost"]["wall_seconds"] / max(self.report["cost"]["n_samples"], 1), 2)
        self.report["cost"].update({k: cost[k] for k in ("peak_rss_mb", "cuda_peak_mb") if k in cost})
        return captions

    def _recaption(self, images, cells, n_patches, common) -> list[str]:
        grid = math.isqrt(n_patches)
        if self.defense.config.prune == "patches":
            if grid * grid != n_patches:
                raise NotImplementedError(f"{n_patches} visual tokens are not a square grid of patches")
            painted = [paint_patches(img, c, grid) for img, c in zip(images, cells)]
            return self.captioner.generate_captions(painted, batch_size=len(painted), **common)
        out: dict[int, str] = {}
        by_count: dict[int, list[int]] = {}
        for i, c in enumerate(cells):
            by_count.setdefault(len(c), []).append(i)
        for rows in by_count.values():  # one generation per pruned-token count: equal shapes
            keep = torch.stack([torch.tensor(np.setdiff1d(np.arange(n_patches), cells[i])) for i in rows])
            with dropped_perceiver_tokens(self.captioner, keep):
                said = self.captioner.generate_captions([images[i] for i in rows], batch_size=len(rows), **common)
            out.update(zip(rows, said))
        return [out[i] for i in range(len(images))]
